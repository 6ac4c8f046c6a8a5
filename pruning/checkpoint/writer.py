"""Write HF-layout safetensors shards, an index and side files, atomically.

:func:`atomic_directory` gives a temporary sibling directory that is renamed to the destination only
when everything inside was written; on any error (disk full, Ctrl-C) it is removed, so a reader never
sees a partial checkpoint. :class:`ShardWriter` streams tensors into shards of bounded size.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch

from pruning.atomic import apply_umask, write_text
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


class ShardWriter:
    """Stream named tensors into ``model-XXXXX-of-YYYYY.safetensors`` shards of at most ``max_bytes``.

    Holds at most one shard's tensors in memory. With a single shard the file is ``model.safetensors``
    and no index is written.
    """

    def __init__(self, directory: str | Path, *, max_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._shards):
            raise CheckpointError(f"tensor {name!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        path = self.directory / f"shard-{len(self._shards) + 1:05d}.safetensors.partial"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        apply_umask(path)  # safetensors creates its files 0600
        self._shards.append((path, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

    def close(self) -> list[Path]:
        """Flush, give shards their final names, write the index; returns the shard paths."""
        self._flush()
        if not self._shards:
            raise CheckpointError("no tensors were written")
        if len(self._shards) == 1:
            final = self.directory / "model.safetensors"
            os.replace(self._shards[0][0], final)
            return [final]
        count = len(self._shards)
        weight_map: dict[str, str] = {}
        finals = []
        for i, (path, names) in enumerate(self._shards, start=1):
            final = self.directory / f"model-{i:05d}-of-{count:05d}.safetensors"
            os.replace(path, final)
            finals.append(final)
            weight_map.update({n: final.name for n in names})
        write_json(self.directory / "model.safetensors.index.json", {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        return finals
