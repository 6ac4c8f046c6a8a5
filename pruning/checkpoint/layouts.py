"""Write a checkpoint in the two released torch-zip layouts, streaming one tensor at a time.

- :func:`write_fairseq`: ``{prefix}-shared.pt`` (every non-expert tensor, the token embedding under its
  three tied fairseq names, a ``cfg`` holding the model settings, optionally an optimizer state) and
  ``{prefix}-rank-{r}.pt`` holding expert ``r`` of every MoE layer as local expert 0, as the NLLB-200
  release does (``nllb-prune convert --layout fairseq``).
- :func:`write_hf_bin`: ``pytorch_model-000NN-of-000MM.bin`` shards of at most ``max_shard_bytes`` and
  ``pytorch_model.bin.index.json``, names with or without ``model.`` (the ``facebook/nllb-moe-54b`` files).

Both take a :class:`~pruning.checkpoint.reader.CheckpointReader` (any layout, or synthetic entries) and
hold only the tensor being written. The safetensors HF layout is :mod:`pruning.checkpoint.convert`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from pruning.checkpoint import keymap
from pruning.checkpoint.convert import cast_for_storage, storage_dtype
from pruning.checkpoint.reader import CheckpointReader, Entry
from pruning.checkpoint.torch_zip import TensorPlaceholder, TorchZipWriter
from pruning.checkpoint.writer import DEFAULT_SHARD_BYTES, plan_shards, write_json

LAYOUTS = ("hf", "fairseq")
"""``hf``: safetensors shards (what exports use); ``fairseq``: shared + rank files."""


def fairseq_cfg(config: Any) -> dict[str, Any]:
    """The model settings a fairseq ``cfg`` carries that our reader takes back (heads, positions, EOM, ...)."""
    return {
        "model": {
            "encoder_attention_heads": config.encoder_attention_heads,
            "decoder_attention_heads": config.decoder_attention_heads,
            "encoder_embed_dim": config.d_model,
            "max_source_positions": config.max_position_embeddings,
            "max_target_positions": config.max_position_embeddings,
            "moe_expert_count": config.num_experts,
            "moe_eom": config.moe_token_dropout,
            "moe_eval_capacity_token_fraction": config.moe_eval_capacity_token_fraction,
            "no_scale_embedding": not config.scale_embedding,
        }
    }


def write_fairseq(
    reader: CheckpointReader,
    directory: Path,
    *,
    prefix: str = "checkpoint",
    dtype: Optional[torch.dtype] = None,
    cfg: Any = None,
    optimizer_numel: int = 0,
    progress: bool = True,
) -> list[Path]:
    """Write ``reader``'s model as fairseq ``{prefix}-shared.pt`` + one rank file per expert; returns the files.

    ``cfg`` (default :func:`fairseq_cfg`) is pickled as given (the release pickles an omegaconf object).
    ``optimizer_numel`` > 0 adds a ``last_optimizer_state`` of two fp32 tensors of that many zeros, which
    a reader must never read.
    """
    cfg = fairseq_cfg(reader.config) if cfg is None else cfg
    shared_entries, by_rank = _split_experts(reader)
    model: dict[str, TensorPlaceholder] = {}
    produce: dict[int, Callable[[], torch.Tensor]] = {}  # id(placeholder) -> its tensor, loaded when written
    for entry in shared_entries:
        holder = _placeholder(entry, dtype)
        names = keymap.FAIRSEQ_SHARED_NAMES if entry.name == keymap.SHARED else (keymap.to_fairseq(entry.name),)
        model.update(dict.fromkeys(names, holder))
        produce[id(holder)] = _loader(entry, dtype)
    for side in ("encoder", "decoder"):
        version = TensorPlaceholder(f"{side}.version", (1,), torch.float32)
        model[version.name] = version
        produce[id(version)] = lambda: torch.tensor([3.0])
    obj: dict[str, Any] = {"model": model, "cfg": cfg, "args": None, "extra_state": {"epoch": 1}, "optimizer_history": []}
    if optimizer_numel:
        moments = {k: TensorPlaceholder(f"optimizer.{k}", (optimizer_numel,), torch.float32) for k in ("exp_avg", "exp_avg_sq")}
        produce.update({id(h): (lambda: torch.zeros(optimizer_numel)) for h in moments.values()})
        obj["last_optimizer_state"] = {"state": {0: moments}, "param_groups": [{"lr": 0.0}]}
    shared_path = directory / f"{prefix}-shared.pt"
    files = [shared_path]
    writer = TorchZipWriter(shared_path, obj)
    total = len(writer.order) + sum(len(v) for v in by_rank.values())
    with tqdm(total=total, desc="writing fairseq", unit="tensor", disable=not progress) as bar:
        for holder in writer.order:
            writer.add(produce[id(holder)]())
            bar.update()
        writer.close()
        for rank, entries in sorted(by_rank.items()):
            path = directory / f"{prefix}-rank-{rank}.pt"
            state = {keymap.to_fairseq(e.name): _placeholder(e, dtype) for e in entries}
            writer = TorchZipWriter(path, {"model": state, "cfg": cfg, "optimizer_history": [], "extra_state": {}})
            for entry in entries:
                writer.add(_loader(entry, dtype)())
                bar.update()
            writer.close()
            files.append(path)
    return files


def write_hf_bin(
    reader: CheckpointReader,
    directory: Path,
    *,
    dtype: Optional[torch.dtype] = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    model_prefix: bool = True,
    progress: bool = True,
) -> list[Path]:
    """Write ``pytorch_model-000NN-of-000MM.bin`` torch-zip shards and their index; returns the shard paths.

    With ``model_prefix`` names start with ``model.`` and the tied ``lm_head.weight`` is stored beside
    ``model.shared.weight`` (one storage), as ``transformers`` saves ``NllbMoeForConditionalGeneration``.
    """
    entries = {entry.name: entry for entry in reader.entries()}
    holders = [_placeholder(entry, dtype) for entry in entries.values()]
    shards = plan_shards(holders, max_shard_bytes)
    weight_map: dict[str, str] = {}
    paths = []
    with tqdm(total=len(holders), desc="writing pytorch_model.bin", unit="tensor", disable=not progress) as bar:
        for i, shard in enumerate(shards, start=1):
            path = directory / f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
            state: dict[str, TensorPlaceholder] = {}
            for holder in shard:
                state[("model." if model_prefix else "") + holder.name] = holder
                if model_prefix and holder.name == keymap.SHARED:
                    state["lm_head.weight"] = holder
            writer = TorchZipWriter(path, state)
            for holder in shard:
                writer.add(_loader(entries[holder.name], dtype)())
                bar.update()
            writer.close()
            weight_map.update(dict.fromkeys(state, path.name))
            paths.append(path)
    total = sum(holder.nbytes for holder in holders)
    write_json(directory / "pytorch_model.bin.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return paths


def _placeholder(entry: Entry, dtype: Optional[torch.dtype]) -> TensorPlaceholder:
    return TensorPlaceholder(entry.name, tuple(entry.tensor.shape), storage_dtype(entry.name, entry.tensor.dtype, dtype))


def _loader(entry: Entry, dtype: Optional[torch.dtype]) -> Callable[[], torch.Tensor]:
    return lambda: cast_for_storage(entry.name, entry.tensor.load(), dtype)


def _split_experts(reader: CheckpointReader) -> tuple[list[Entry], dict[int, list[Entry]]]:
    """Non-expert entries, and each expert index's entries (every MoE layer), in reader order."""
    shared: list[Entry] = []
    by_rank: dict[int, list[Entry]] = {}
    for entry in reader.entries():
        key = keymap.parse_expert_key(entry.name)
        if key is None:
            shared.append(entry)
        else:
            by_rank.setdefault(key.expert, []).append(entry)
    return shared, by_rank
