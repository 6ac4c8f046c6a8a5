"""Read tensors from a ``torch.save`` zip file lazily, without ever running pickled code.

The pickle inside (``<archive>/data.pkl``) is read by a restricted unpickler: it rebuilds tensors and
plain containers (dict, list, tuple, OrderedDict, ...); any other class (fairseq's ``cfg``, an
``argparse.Namespace``, optimizer classes, or a payload such as ``os.system``) becomes an inert
:class:`Opaque` placeholder that records its arguments and state but is never called or imported.
Tensor storages are not read until :meth:`LazyTensor.load`, so a shared file's huge optimizer
state costs nothing but its small pickle records.
"""

from __future__ import annotations

import collections
import functools
import io
import math
import mmap
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pruning.errors import UserError


class CheckpointError(UserError):
    """A checkpoint file is missing, truncated, malformed or does not match the expected model."""


class Opaque:
    """Stand-in for any class the restricted unpickler refuses to import. Never executes anything.

    ``find_class`` returns a fresh subclass per refused global (pickle's NEWOBJ needs a type);
    building one only records its arguments, state and items.
    """

    qualname = "?"
    args: tuple[Any, ...]
    state: Any
    items: list[Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> "Opaque":
        obj = super().__new__(cls)
        obj.args = args
        obj.state = None
        obj.items = []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, item: Any) -> None:  # pickle APPENDS on list subclasses
        self.items.append(item)

    def extend(self, items: Any) -> None:
        self.items.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:  # pickle SETITEMS on dict subclasses
        self.items.append((key, value))

    def __repr__(self) -> str:
        return f"Opaque({self.qualname})"


def _opaque_class(qualname: str) -> type[Opaque]:
    return type("Opaque", (Opaque,), {"qualname": qualname})


@dataclass(frozen=True)
class StorageRef:
    """A storage inside the archive, not yet read."""

    archive_name: str
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class LazyTensor:
    """A tensor whose bytes stay on disk until :meth:`load`."""

    path: Path
    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel() * self.dtype.itemsize

    def load(self) -> torch.Tensor:
        """The tensor, its bytes mapped from the file (no copy; pages count as file-backed, not anonymous memory).

        Storages of compressed members (never written by ``torch.save``) are read into memory instead.
        """
        member = f"{self.storage.archive_name}/data/{self.storage.key}"
        expected = self.storage.numel * self.storage.dtype.itemsize
        try:
            stat = self.path.stat()
            archive = _open_zip(str(self.path), (stat.st_mtime_ns, stat.st_size))
            info = archive.getinfo(member)
            if info.file_size != expected:
                raise CheckpointError(f"{self.path}: storage {member!r} has {info.file_size} bytes, expected {expected}")
            if info.compress_type == zipfile.ZIP_STORED:
                start = _member_data_offset(str(self.path), (stat.st_mtime_ns, stat.st_size), member)
                if start + expected > stat.st_size:
                    raise CheckpointError(f"{self.path}: storage {member!r} ends past the end of the file (truncated?)")
                flat = map_bytes(self.path, start, expected).view(self.storage.dtype) if expected else torch.empty(0, dtype=self.storage.dtype)
            else:
                raw = archive.read(member)
                flat = torch.frombuffer(bytearray(raw), dtype=self.storage.dtype) if raw else torch.empty(0, dtype=self.storage.dtype)
        except (zipfile.BadZipFile, KeyError, OSError, EOFError) as exc:
            raise CheckpointError(f"{self.path}: cannot read tensor storage {member!r} ({exc})") from exc
        return torch.as_strided(flat, self.shape, self.stride, self.offset)


_SMALL_READ_BYTES = 1 << 20
"""Below this, a tensor is read into memory: mapping many tiny tensors costs more than copying them."""


def map_bytes(path: Path, start: int, nbytes: int) -> torch.Tensor:
    """uint8 [nbytes]: bytes ``start .. start+nbytes`` of ``path``, copy-on-write mapped (read into memory when small).

    A mapped tensor costs no anonymous memory until written to; copying it into a model parameter or a
    cast reads the pages straight from the page cache. The kernel is told to read exactly this range
    (``MADV_WILLNEED``) and nothing around it (``MADV_RANDOM``): its default read-around on page faults
    (``read_ahead_kb``, often MBs) would otherwise read the neighbouring tensors, the pruned experts
    next to a kept one included.
    """
    if nbytes < _SMALL_READ_BYTES:
        with open(path, "rb") as handle:
            handle.seek(start)
            raw = handle.read(nbytes)
        if len(raw) != nbytes:
            raise CheckpointError(f"{path}: expected {nbytes} bytes at offset {start}, the file ends after {len(raw)} (truncated?)")
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    base = start - start % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), length=start + nbytes - base, offset=base, access=mmap.ACCESS_COPY)
    if hasattr(mapped, "madvise"):
        mapped.madvise(mmap.MADV_RANDOM)
        # the kernel caps one WILLNEED at its readahead window (a few MB): ask window by window, so that
        # every page is queued for reading in large requests before the first fault (a fault under
        # MADV_RANDOM would read one page at a time)
        for offset in range(0, len(mapped), _WILLNEED_STEP):
            mapped.madvise(mmap.MADV_WILLNEED, offset, min(_WILLNEED_STEP, len(mapped) - offset))
    return torch.frombuffer(mapped, dtype=torch.uint8, offset=start - base, count=nbytes)


_WILLNEED_STEP = 8 << 20
"""Bytes per MADV_WILLNEED request (a multiple of the page size)."""


@functools.lru_cache(maxsize=4096)
def _member_data_offset(path: str, stamp: tuple[int, int], member: str) -> int:
    """Absolute offset of a stored member's data: its local header's fixed 30 bytes, name and extra field."""
    info = _open_zip(path, stamp).getinfo(member)
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"no local file header for {member!r} at offset {info.header_offset}")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length


@functools.lru_cache(maxsize=8)
def _open_zip(path: str, stamp: tuple[int, int]) -> zipfile.ZipFile:
    """Reuse the archive's parsed directory across the many tensors of one file."""
    return zipfile.ZipFile(path)


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

# The only globals rebuilt for real: plain containers and torch's tensor-rebuild entry points.
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("torch", "Size"): torch.Size,
}


def _rebuild_tensor(storage: StorageRef, offset: int, size: Any, stride: Any, *_: Any) -> "LazyTensorRecord":
    return LazyTensorRecord(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


@dataclass(frozen=True)
class LazyTensorRecord:
    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, archive_name: str):
        super().__init__(file)
        self.archive_name = archive_name

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch" and name in {"float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "bool", "int8", "int16"}:
            return getattr(torch, name)
        if module == "torch.storage" and name == "UntypedStorage":
            return torch.uint8
        return _opaque_class(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid[:5]
        dtype = storage_type if isinstance(storage_type, torch.dtype) else torch.uint8
        return StorageRef(self.archive_name, str(key), dtype, int(numel))


def read_pickle(path: str | Path) -> Any:
    """Unpickle ``path``'s object with tensors as :class:`LazyTensor` (restricted, nothing executed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not pickles:
                raise CheckpointError(f"{path}: not a torch zip checkpoint (no data.pkl inside)")
            archive_name = pickles[0].rsplit("/", 1)[0] if "/" in pickles[0] else ""
            with archive.open(pickles[0]) as handle:
                obj = _RestrictedUnpickler(handle, archive_name).load()
    except zipfile.BadZipFile as exc:
        raise CheckpointError(
            f"{path}: not a readable torch zip checkpoint ({exc}); the file may be truncated, or saved with "
            "the legacy (pre-1.6) torch format, which this toolkit does not read"
        ) from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: malformed checkpoint pickle ({exc})") from exc
    return _attach_path(obj, path)


def _attach_path(obj: Any, path: Path) -> Any:
    if isinstance(obj, LazyTensorRecord):
        return LazyTensor(path, obj.storage, obj.offset, obj.shape, obj.stride)
    if isinstance(obj, dict):
        return (
            type(obj)((k, _attach_path(v, path)) for k, v in obj.items())
            if isinstance(obj, collections.OrderedDict)
            else {k: _attach_path(v, path) for k, v in obj.items()}
        )
    if isinstance(obj, list):
        return [_attach_path(v, path) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_attach_path(v, path) for v in obj)
    return obj


def find_in_opaque(obj: Any, key: str, *, depth: int = 0) -> Any:
    """Search plain data (dicts, lists, :class:`Opaque` state/args) for ``key``; None if absent.

    Used to read e.g. ``encoder_attention_heads`` out of a fairseq ``cfg``/``args`` object without
    importing omegaconf or fairseq.
    """
    if depth > 12:
        return None
    if isinstance(obj, dict):
        if key in obj and not isinstance(obj[key], (dict, list, Opaque)):
            return _unwrap(obj[key])
        if key in obj and isinstance(obj[key], Opaque):
            value = _unwrap(obj[key])
            if value is not None and not isinstance(value, Opaque):
                return value
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif isinstance(obj, Opaque):
        children = [obj.state, list(obj.args), obj.items]
    else:
        return None
    for child in children:
        found = find_in_opaque(child, key, depth=depth + 1)
        if found is not None:
            return found
    return None


def _unwrap(value: Any) -> Any:
    """omegaconf stores leaves as ValueNode objects whose state holds ``_val``."""
    if isinstance(value, Opaque):
        state = value.state
        if isinstance(state, dict):
            inner = state.get("_val", state.get("__dict__", {}).get("_val") if isinstance(state.get("__dict__"), dict) else None)
            return inner
        return None
    return value


# ---- writing ---------------------------------------------------------------------------------------
_STORAGE_CLASS_NAMES = {dtype: name for name, dtype in _STORAGE_DTYPES.items()}
_ALIGNMENT = 64
"""torch.save aligns every storage record to 64 bytes, so that ``torch.load(mmap=True)`` can map it."""
_ZIP64_RECORD_BYTES = 2**31
"""Records from this size on get zip64 local headers (zipfile needs them from 4 GiB; torch's reader takes both)."""


@dataclass(frozen=True, eq=False)
class TensorPlaceholder:
    """Stands for a tensor in the object a :class:`TorchZipWriter` pickles; its bytes come later.

    One placeholder object used at several places pickles as one tensor (fairseq stores its tied
    embedding three times, as the same storage).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class _PlaceholderPickler(pickle.Pickler):
    """Pickles placeholders as ``torch._utils._rebuild_tensor_v2(storage, 0, shape, stride, False, {})``."""

    def __init__(self, file: Any):
        super().__init__(file, protocol=2)
        self.order: list[TensorPlaceholder] = []
        self._keys: dict[int, str] = {}

    def reducer_override(self, obj: Any) -> Any:
        if not isinstance(obj, TensorPlaceholder):
            return NotImplemented
        import torch._utils

        if id(obj) not in self._keys:
            self._keys[id(obj)] = str(len(self.order))
            self.order.append(obj)
        stride = tuple(math.prod(obj.shape[i + 1 :]) for i in range(len(obj.shape)))
        storage = _StorageRecord(self._keys[id(obj)], obj.dtype, math.prod(obj.shape))
        return torch._utils._rebuild_tensor_v2, (storage, 0, obj.shape, stride, False, collections.OrderedDict())

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageRecord):
            return ("storage", getattr(torch, _STORAGE_CLASS_NAMES[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


@dataclass(frozen=True)
class _StorageRecord:
    key: str
    dtype: torch.dtype
    numel: int


class TorchZipWriter:
    """Write a ``torch.save``-compatible zip whose tensors are streamed in one at a time.

    ``obj`` is pickled first with :class:`TensorPlaceholder` objects where tensors go (any other object
    is pickled as ``torch.save`` would); then :meth:`add` writes each placeholder's bytes, in the order
    :attr:`order` gives, as its own 64-byte-aligned stored record. Only the tensor being written is in
    memory. ``torch.load`` (``mmap=True`` included) and :func:`read_pickle` read the result.
    """

    def __init__(self, path: str | Path, obj: Any, *, archive: str = "archive"):
        self.path = Path(path)
        self.archive = archive
        pickled = io.BytesIO()
        pickler = _PlaceholderPickler(pickled)
        pickler.dump(obj)
        self.order: list[TensorPlaceholder] = pickler.order
        self._next = 0
        self._zip = zipfile.ZipFile(self.path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._record("data.pkl", pickled.getvalue())
        self._record(".format_version", b"1")
        self._record(".storage_alignment", str(_ALIGNMENT).encode())
        self._record("byteorder", b"little")

    def add(self, tensor: torch.Tensor) -> None:
        """Write the next placeholder's tensor (checked against its shape and dtype)."""
        if self._next >= len(self.order):
            raise CheckpointError(f"{self.path}: more tensors written than the {len(self.order)} the pickle holds")
        spec = self.order[self._next]
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise CheckpointError(f"{self.path}: {spec.name} must be {spec.dtype} {list(spec.shape)}, got {tensor.dtype} {list(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        self._record(f"data/{self._next}", data.view(torch.uint8).numpy().data if data.numel() else b"", big=spec.nbytes >= _ZIP64_RECORD_BYTES)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.order):
            self._zip.close()
            raise CheckpointError(f"{self.path}: {len(self.order) - self._next} tensor(s) of the pickle were never written")
        self._record("version", b"3\n")
        self._record(".data/serialization_id", str(int.from_bytes(os.urandom(16), "little")).encode())
        self._zip.close()

    def _record(self, name: str, data: Any, *, big: bool = False) -> None:
        info = zipfile.ZipInfo(f"{self.archive}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        header_end = self._zip.fp.tell() + 30 + len(info.filename.encode()) + (20 if big else 0)  # type: ignore[union-attr]
        padding = -(header_end + 4) % _ALIGNMENT  # an extra field of 4 + padding bytes puts the data on the boundary
        info.extra = b"FB" + struct.pack("<H", padding) + b"Z" * padding
        with self._zip.open(info, "w", force_zip64=big) as handle:
            handle.write(data)
