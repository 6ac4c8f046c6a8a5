"""Save an in-memory model (e.g. the trained testbed) in the HF layout our readers load."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import torch

from pruning.checkpoint import keymap
from pruning.checkpoint.convert import cast_for_storage, storage_dtype, write_config
from pruning.checkpoint.writer import DEFAULT_SHARD_BYTES, ShardWriter, TensorSpec, atomic_directory
from pruning.model.build import NllbMoeForPruning


def canonical_tensors(model: NllbMoeForPruning) -> Iterator[tuple[str, torch.Tensor]]:
    """Canonical (HF ``NllbMoeModel``) names and tensors; stacked experts unstacked per expert."""
    moe_prefixes = {f"{side}.layers.{layer}.ffn.": (side, layer, moe) for side, layer, moe in model.moe_layers()}
    for name, param in model.model.named_parameters(remove_duplicate=True):
        if any(name.startswith(p) for p in moe_prefixes):
            continue
        yield name, param.detach()
    for side, layer, moe in moe_prefixes.values():
        yield keymap.router_key(side, layer), moe.router.weight.detach()
        for local, expert in enumerate(moe.expert_ids):
            for linear in ("fc1", "fc2"):
                for kind in ("weight", "bias"):
                    tensor = getattr(moe.experts, f"{linear}_{kind}")[local]
                    yield keymap.expert_key(side, layer, expert, linear, kind), tensor.detach()


def save_model(
    model: NllbMoeForPruning,
    out: str | Path,
    *,
    dtype: Optional[torch.dtype] = None,
    tokenizer=None,  # noqa: ANN001 - a transformers tokenizer
    overwrite: bool = False,
    max_shard_bytes: Optional[int] = None,
) -> Path:
    out = Path(out)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        tensors = list(canonical_tensors(model))
        specs = [TensorSpec(name, tuple(t.shape), storage_dtype(name, t.dtype, dtype)) for name, t in tensors]
        writer = ShardWriter(tmp, specs, max_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES)
        for name, tensor in tensors:
            writer.add(name, cast_for_storage(name, tensor, dtype))
        writer.close()
        write_config(model.config, tmp, dtype=dtype or model.model.shared.weight.dtype)
        tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out
