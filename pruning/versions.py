"""The versions that made a number: recorded in statistics files, evaluation summaries and results."""

from __future__ import annotations


def versions(*extra: str) -> dict[str, str]:
    """nllb-prune, torch and transformers, plus the ``extra`` packages (e.g. ``"sacrebleu"``)."""
    import importlib

    import torch
    import transformers

    from pruning import __version__

    found = {"nllb-prune": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
    for name in extra:
        found[name] = getattr(importlib.import_module(name), "__version__", "unknown")
    return found
