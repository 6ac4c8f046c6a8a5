"""nllb-prune: language-specific expert pruning for NLLB-200 MoE.

Public API (small on purpose):

- :func:`load_model` — an NLLB-MoE model (full, a subset of experts, or a pruned export) from either
  checkpoint layout, with its tokenizer.
- :class:`pruning.topology.Topology` — the model's shape and the paper's expert ids.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_model(*args: Any, **kwargs: Any):  # noqa: ANN201 - re-exported, see pruning.model.loading
    from pruning.model.loading import load_model as _load_model

    return _load_model(*args, **kwargs)


def load_tokenizer(*args: Any, **kwargs: Any):  # noqa: ANN201
    from pruning.checkpoint.tokenizer import load_tokenizer as _load_tokenizer

    return _load_tokenizer(*args, **kwargs)


__all__ = ["load_model", "load_tokenizer", "__version__"]
