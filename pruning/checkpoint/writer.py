"""Write HF-layout safetensors shards, an index and side files, atomically.

:func:`atomic_directory` gives a temporary sibling directory that is renamed to the destination only
when everything inside was written; on any error (disk full, Ctrl-C) it is removed, so a reader never
sees a partial checkpoint. :class:`ShardWriter` streams tensors into shards of bounded size, writing each tensor as it comes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional, Protocol, Sequence, TypeVar

import torch

from pruning.atomic import write_text
from pruning.checkpoint.torch_zip import CheckpointError

DEFAULT_SHARD_BYTES = 4 * 2**30


@contextlib.contextmanager
def atomic_directory(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` on success; ``out`` must not exist unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"output directory {out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    """What will be written under ``name``: known before any byte of the tensor is."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class ShardWriter:
    """Stream tensors straight into ``model-XXXXX-of-YYYYY.safetensors`` shards of at most ``max_bytes``.

    Every tensor's name, shape and dtype are given up front (``specs``, in writing order), so each shard's
    safetensors header is written before its first tensor and every :meth:`add` writes the tensor's bytes
    at once: nothing is buffered, whatever the shard size. Memory is the tensor being written (and its
    cast), never a shard. With a single shard the file is ``model.safetensors`` and no index is written.
    """

    def __init__(self, directory: str | Path, specs: Sequence[TensorSpec], *, max_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory = Path(directory)
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise CheckpointError(f"tensor(s) {twice[:5]} would be written twice")
        if not specs:
            raise CheckpointError("no tensors were written")
        self._shards = plan_shards(list(specs), max_bytes)
        self._paths = _shard_names(self.directory, len(self._shards))
        self._next = 0  # index into the flat order of specs
        self._order = [(i, spec) for i, shard in enumerate(self._shards) for spec in shard]
        self._handle: Optional[BinaryIO] = None
        self._open_shard = -1
        self.total_bytes = sum(spec.nbytes for spec in specs)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; it must match the next spec (name, shape and dtype)."""
        if self._next >= len(self._order):
            raise CheckpointError(f"tensor {name!r} was not announced to the writer (all {len(self._order)} written)")
        shard, spec = self._order[self._next]
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise CheckpointError(f"writer expected {spec.name} {spec.dtype} {list(spec.shape)} next, got {name} {tensor.dtype} {list(tensor.shape)}")
        if shard != self._open_shard:
            self._start_shard(shard)
        assert self._handle is not None
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self._handle.write(data.view(torch.uint8).numpy().data)
        self._next += 1
        if self._next == len(self._order) or self._order[self._next][0] != shard:
            self._finish_shard()

    def _start_shard(self, shard: int) -> None:
        self._finish_shard()
        self._handle = open(self._paths[shard], "wb")
        self._handle.write(safetensors_header(self._shards[shard]))
        self._open_shard = shard

    def _finish_shard(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def close(self) -> list[Path]:
        """Check every announced tensor was written, write the index (several shards); returns the shard paths."""
        self._finish_shard()
        if self._next != len(self._order):
            missing = [spec.name for _, spec in self._order[self._next :]]
            raise CheckpointError(f"{len(missing)} announced tensor(s) were never written: {missing[:5]}")
        if len(self._paths) > 1:
            weight_map = {spec.name: self._paths[i].name for i, spec in self._order}
            write_json(self.directory / "model.safetensors.index.json", {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        return list(self._paths)


def safetensors_header(specs: Sequence[TensorSpec]) -> bytes:
    """The 8-byte length and the JSON header of a safetensors file holding ``specs`` back to back, in order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        if spec.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {spec.name}: dtype {spec.dtype} cannot be stored in safetensors")
        header[spec.name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to a multiple of 8 bytes
    return struct.pack("<Q", len(text)) + text


Sized = TypeVar("Sized", bound="HasBytes")


class HasBytes(Protocol):
    @property
    def nbytes(self) -> int: ...


def plan_shards(specs: Sequence[Sized], max_bytes: int) -> list[list[Sized]]:
    """Consecutive specs, a new shard whenever the next tensor would push the current one past ``max_bytes``."""
    shards: list[list[Sized]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _shard_names(directory: Path, count: int) -> list[Path]:
    if count == 1:
        return [directory / "model.safetensors"]
    return [directory / f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
