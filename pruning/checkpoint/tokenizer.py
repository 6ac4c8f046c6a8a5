"""The NLLB tokenizer stored beside a checkpoint's weights (either layout, or an export)."""

from __future__ import annotations

from pathlib import Path

from pruning.atomic import read_json
from pruning.checkpoint.torch_zip import CheckpointError


def load_tokenizer(directory: str | Path):  # noqa: ANN201 - a transformers tokenizer
    """The NLLB tokenizer stored beside the weights (sentencepiece model and/or HF tokenizer files)."""
    from transformers import AutoTokenizer, NllbTokenizer

    directory = Path(directory)
    config = directory / "tokenizer_config.json"
    spm = directory / "sentencepiece.bpe.model"
    try:
        if spm.is_file():
            import sentencepiece

            sentencepiece.SentencePieceProcessor(model_file=str(spm))  # transformers answers a corrupt file with False
        if config.is_file():
            if not isinstance(read_json(config, error=CheckpointError, what="tokenizer config"), dict):
                raise CheckpointError(f"tokenizer config {config} is not a JSON object of settings")
            tokenizer = AutoTokenizer.from_pretrained(str(directory), use_fast=False)
            if not hasattr(tokenizer, "convert_tokens_to_ids"):
                raise CheckpointError(f"{directory}: transformers made no tokenizer of tokenizer_config.json (it returned {tokenizer!r})")
            return tokenizer
        if spm.is_file():
            return NllbTokenizer(vocab_file=str(spm))
    except CheckpointError:
        raise
    except Exception as exc:  # sentencepiece and transformers raise many types for a corrupt file
        files = " and ".join(f.name for f in (config, spm) if f.is_file())
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0]}" if str(exc) else type(exc).__name__
        raise CheckpointError(f"{directory}: cannot load the tokenizer from {files} ({reason})") from exc
    raise CheckpointError(f"{directory}: no tokenizer files (sentencepiece.bpe.model or tokenizer_config.json)")
