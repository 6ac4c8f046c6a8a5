"""Stream a checkpoint of either layout into HF-layout safetensors shards (``nllb-prune convert``)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from pruning.checkpoint import keymap
from pruning.checkpoint.reader import TOKENIZER_FILES, CheckpointReader, Entry, open_checkpoint
from pruning.checkpoint.torch_zip import CheckpointError
from pruning.checkpoint.writer import ShardWriter, atomic_directory, write_json

TOKENIZER_SIDE_FILES = (*TOKENIZER_FILES, "special_tokens_map.json", "added_tokens.json")

# (entry) -> tensor to write under entry.name, or None to skip the entry
EntryTransform = Callable[[Entry, torch.Tensor], Optional[torch.Tensor]]


def cast_for_storage(name: str, tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """Cast to ``dtype``, except routers, which stay fp32 so that routing never depends on the dtype."""
    if keymap.parse_router_key(name) is not None:
        return tensor.float()
    if dtype is None or not tensor.is_floating_point():
        return tensor
    return tensor.to(dtype)


def stream_entries(
    reader: CheckpointReader,
    writer: ShardWriter,
    *,
    dtype: Optional[torch.dtype],
    transform: Optional[EntryTransform] = None,
    skip: Optional[Callable[[Entry], bool]] = None,
    progress: bool = True,
    desc: str = "writing",
) -> int:
    """Copy reader -> writer one tensor at a time; returns the number of tensors written."""
    written = 0
    for entry in tqdm(list(reader.entries()), desc=desc, unit="tensor", disable=not progress):
        if skip is not None and skip(entry):
            continue  # never loaded
        tensor = entry.tensor.load()
        if transform is not None:
            tensor = transform(entry, tensor)
            if tensor is None:
                continue
        writer.add(entry.name, cast_for_storage(entry.name, tensor, dtype))
        written += 1
        del tensor
    return written


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
    from pruning.model.loading import load_tokenizer

    load_tokenizer(source).save_pretrained(str(directory))
    return True


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    *,
    dtype: Optional[torch.dtype] = None,
    overwrite: bool = False,
    max_shard_bytes: Optional[int] = None,
    progress: bool = True,
) -> Path:
    """Any supported layout -> HF-layout safetensors shards + index + config + tokenizer, streaming."""
    reader = open_checkpoint(src)
    out = Path(out)
    if Path(src).resolve() == out.resolve():
        raise CheckpointError(f"--out {out} is the source checkpoint itself")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, **({"max_bytes": max_shard_bytes} if max_shard_bytes else {}))
        stream_entries(reader, writer, dtype=dtype, progress=progress, desc="converting")
        writer.close()
        write_config(reader.config, tmp, dtype=dtype or reader.dtype)
        copy_tokenizer(reader, tmp)
    return out
