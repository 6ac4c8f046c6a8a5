"""Stream a checkpoint of either layout into the HF (safetensors) or fairseq layout (``nllb-prune convert``)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from pruning.checkpoint import keymap
from pruning.checkpoint.reader import TOKENIZER_FILES, CheckpointReader, Entry, open_checkpoint
from pruning.checkpoint.torch_zip import CheckpointError
from pruning.checkpoint.writer import DEFAULT_SHARD_BYTES, ShardWriter, TensorSpec, atomic_directory, write_json

TOKENIZER_SIDE_FILES = (*TOKENIZER_FILES, "special_tokens_map.json", "added_tokens.json")

# (entry, loaded tensor) -> the tensor to write under entry.name
EntryTransform = Callable[[Entry, torch.Tensor], torch.Tensor]


def storage_dtype(name: str, source: torch.dtype, dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype ``name`` is stored in: routers stay fp32 (routing never depends on the dtype), others ``dtype``.

    A quantized export's codes (integers) and scales (``X.weight_scale`` / ``X.weight_min``) keep theirs.
    """
    if keymap.parse_router_key(name) is not None:
        return torch.float32
    if re.search(rf"{keymap.QUANT_COMPANION}$", name):
        return source
    if dtype is None or not source.is_floating_point:
        return source
    return dtype


def cast_for_storage(name: str, tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """Cast to ``dtype``, except routers, which stay fp32 (see :func:`storage_dtype`)."""
    return tensor.to(storage_dtype(name, tensor.dtype, dtype))


def stream_entries(
    reader: CheckpointReader,
    directory: Path,
    *,
    dtype: Optional[torch.dtype],
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    transform: Optional[EntryTransform] = None,
    output_shape: Optional[Callable[[Entry], tuple[int, ...]]] = None,
    skip: Optional[Callable[[Entry], bool]] = None,
    progress: bool = True,
    desc: str = "writing",
) -> list[Path]:
    """Copy reader -> safetensors shards in ``directory`` one tensor at a time; returns the shard paths.

    ``skip``ped entries are never loaded. ``output_shape`` gives the shape ``transform`` will return
    (default: the entry's), so that every shard header is known before the first tensor is loaded.
    """
    entries = [entry for entry in reader.entries() if skip is None or not skip(entry)]
    specs = [
        TensorSpec(entry.name, tuple(output_shape(entry) if output_shape else entry.tensor.shape), storage_dtype(entry.name, entry.tensor.dtype, dtype))
        for entry in entries
    ]
    writer = ShardWriter(directory, specs, max_bytes=max_shard_bytes)
    for entry in tqdm(entries, desc=desc, unit="tensor", disable=not progress):
        tensor = entry.tensor.load()
        if transform is not None:
            tensor = transform(entry, tensor)
        writer.add(entry.name, cast_for_storage(entry.name, tensor, dtype))
        del tensor
    return writer.close()


def write_config(config: Any, directory: Path, *, dtype: Optional[torch.dtype], extra: Optional[dict[str, Any]] = None) -> None:
    data = config.to_dict()
    data["architectures"] = ["NllbMoeForConditionalGeneration"]
    data["model_type"] = "nllb-moe"
    if dtype is not None:
        data["torch_dtype"] = str(dtype).replace("torch.", "")
    data.update(extra or {})
    write_json(directory / "config.json", data)


def copy_tokenizer(reader: CheckpointReader, directory: Path) -> bool:
    """Copy tokenizer files beside the weights (or build HF tokenizer files from a bare SPM model)."""
    source = reader.tokenizer_dir
    if source is None:
        return False
    if (source / "tokenizer_config.json").is_file():
        for name in TOKENIZER_SIDE_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, directory / name)
        return True
    from pruning.checkpoint.tokenizer import load_tokenizer

    load_tokenizer(source).save_pretrained(str(directory))
    return True


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    *,
    dtype: Optional[torch.dtype] = None,
    overwrite: bool = False,
    max_shard_bytes: Optional[int] = None,
    layout: str = "hf",
    progress: bool = True,
) -> Path:
    """Any supported layout -> ``layout``, streaming one tensor at a time, with the tokenizer files.

    ``hf``: safetensors shards + index + config.json; ``fairseq``: ``checkpoint-shared.pt`` + one
    ``checkpoint-rank-{r}.pt`` per expert (:func:`pruning.checkpoint.layouts.write_fairseq`).
    """
    from pruning.checkpoint.layouts import LAYOUTS, write_fairseq

    if layout not in LAYOUTS:
        raise CheckpointError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    reader = open_checkpoint(src)
    out = Path(out)
    if Path(src).resolve() == out.resolve():
        raise CheckpointError(f"--out {out} is the source checkpoint itself")
    if reader.manifest is not None and layout == "fairseq":
        raise CheckpointError(f"{src} is a pruned export: it converts to the HF layout only (a fairseq layout has every expert)")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        if layout == "fairseq":
            write_fairseq(reader, tmp, dtype=dtype, progress=progress)
        else:
            stream_entries(reader, tmp, dtype=dtype, max_shard_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES, progress=progress, desc="converting")
            write_config(reader.config, tmp, dtype=dtype or reader.dtype)
        copy_tokenizer(reader, tmp)
    return out
