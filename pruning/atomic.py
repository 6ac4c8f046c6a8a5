"""Small file I/O shared by the rooms.

Writes are atomic: write to a temporary sibling, then rename. A reader never sees half a file, and an
interrupted or failed write (disk full, Ctrl-C) leaves the previous file untouched. A renamed file gets
the mode a plain ``open`` would have given it (0666 less the umask): some writers (safetensors) create
their files 0600. JSON reads turn every failure into the caller's named error, with the file (and line
and column for syntax errors).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def apply_umask(path: str | os.PathLike[str]) -> None:
    """Give a file written by another library the mode ``open`` gives new files: 0666 less the umask."""
    os.chmod(path, 0o666 & ~current_umask())


def current_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set, then restore
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def read_json(path: str | os.PathLike[str], *, error: type[Exception], what: str) -> Any:
    """Parse a JSON file; a missing, unreadable or malformed file raises ``error`` naming ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {what} {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise error(f"{what} {path} is not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from exc
