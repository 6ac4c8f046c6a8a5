"""Claiming an output before the work: its location is writable, and no other run writes it meanwhile.

Every command that writes an output (a file, an export directory, a folder of plots) wraps its work in
:func:`claim_output`, which

1. checks the location: an existing output must be of the expected kind (a file for ``--out
   stats.safetensors``, a directory for an export), the nearest existing parent must be a directory, and
   a file can be created there; so an unwritable ``--out`` fails before any work, not after it;
2. locks ``OUT.lock``, a file beside the output: an exclusive, non-blocking ``fcntl.flock``, the file
   holding the holder's pid, host, command and start time (JSON). A second run on the same output stops
   at once with an error that names the holder. The kernel releases a lock when its process ends, however
   it ends, so a lock file left by a killed run is stale: it is taken over, with a warning naming the run
   that left it;
3. removes the partial outputs that killed runs leave beside the output (``.OUT.partial-PID``,
   ``.OUT.tmp-PID``, ``.OUT.old-PID``) when their process is gone, with a warning.

The lock file is removed when the ``with`` block ends, whether the work succeeded or failed; so are the
parent directories the claim created, when the work failed and left them empty. On a network file system
the lock is as good as its ``flock``: NFSv4 takes it on the server, a mount with ``local_lock=flock`` only
on each client.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

from pruning.errors import UserError

OutputKind = Literal["file", "directory", "folder"]
"""``file``: written to a temporary sibling, then renamed; ``directory``: a whole directory renamed into
place (an export); ``folder``: a directory that files are written into (plots, reports)."""

PARTIAL_PATTERN = r"\.{name}\.(?:partial|tmp|old)-(\d+)"
"""Temporary siblings of an output (:mod:`pruning.atomic`, :mod:`pruning.checkpoint.writer`), by pid."""


class OutputError(UserError):
    """An output cannot be written there, or another run is writing it."""


def lock_path(output: str | os.PathLike[str]) -> Path:
    """``OUT.lock`` beside ``output`` (``scores.tsv`` -> ``scores.tsv.lock``, ``pruned/`` -> ``pruned.lock``)."""
    path = Path(os.path.abspath(output))
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def claim_output(
    output: str | os.PathLike[str],
    *,
    command: str,
    flag: str = "--out",
    kind: OutputKind = "file",
    companions: Sequence[str | os.PathLike[str]] = (),
    inputs: Sequence[tuple[str, str | os.PathLike[str]]] = (),
) -> Iterator[Path]:
    """Check ``output``'s location, lock it for ``command``, clean stale partials; yield the output path.

    ``companions`` are outputs written together with ``output`` under its lock (``evaluate``'s hypotheses
    and summary beside its TSV): their stale partials are cleaned too. ``inputs`` are ``(flag, path)`` of
    the files the command reads: the output may not be one of them.
    """
    path = Path(output)
    for name, item in inputs:
        if same_file(path, Path(item)):
            raise OutputError(f"{flag} {path} is also an input ({name} {item}): write it elsewhere, inputs are never overwritten")
    created = check_location(path, flag=flag, kind=kind)
    try:
        with output_lock(path, command=command, flag=flag):
            for item in (path, *map(Path, companions)):
                remove_stale_partials(item)
            yield path
    except BaseException:
        remove_empty(created)  # a failed run leaves no empty directories behind
        raise


def same_file(a: Path, b: Path) -> bool:
    """Whether two spellings name one file (one that exists; else the same absolute path)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


# ---- the location ------------------------------------------------------------------------------
def check_location(path: Path, *, flag: str, kind: OutputKind) -> list[Path]:
    """Raise :class:`OutputError` unless ``path`` can be written as a ``kind``; return the parent
    directories it created, outermost first."""
    if path.is_dir() and kind == "file":
        raise OutputError(f"{flag} {path} is a directory; expected the name of a file to write")
    if path.exists() and not path.is_dir() and kind != "file":
        raise OutputError(f"{flag} {path} is a file; expected a directory to write")
    existing = next(p for p in (path.parent, *path.parent.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise OutputError(f"{flag} {path}: {existing} is a file, not a directory")
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()][::-1]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{flag} {path}: cannot create the directory {path.parent} ({exc.strerror or exc})") from None
    try:
        _probe(path.parent, flag=flag, path=path)
        if kind == "folder" and path.is_dir():
            _probe(path, flag=flag, path=path)
    except OutputError:
        remove_empty(created)
        raise
    return created


def remove_empty(directories: list[Path]) -> None:
    """Remove the directories a failed run created (outermost first in ``directories``) while they are empty."""
    for directory in reversed(directories):
        try:
            directory.rmdir()
        except OSError:
            break


def _probe(directory: Path, *, flag: str, path: Path) -> None:
    """Create and remove a file in ``directory``: the one test that also holds for root and read-only mounts."""
    probe = directory / f".nllb-prune-probe-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{flag} {path}: cannot write in {directory} ({exc.strerror or exc})") from None


# ---- the lock ------------------------------------------------------------------------------------
@contextlib.contextmanager
def output_lock(output: str | os.PathLike[str], *, command: str, flag: str = "--out") -> Iterator[Path]:
    """Hold ``OUT.lock`` (see the module doc) while the block runs; yield the lock file's path."""
    path = lock_path(output)
    fd = _acquire(path, output=Path(output), command=command, flag=flag)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # unlinked while still locked: a waiting opener sees another inode and retries
        os.close(fd)


def _acquire(path: Path, *, output: Path, command: str, flag: str) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise OutputError(f"{flag} {output}: cannot create the lock file {path} ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputError(
                f"{flag} {output} is being written by {describe_holder(holder)} (lock {path}); wait for it to end, or choose another {flag}"
            ) from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the previous holder removed the file between our open and our lock: start again
    previous = _read_holder(fd)
    if previous:
        warn(f"taking over the lock {path} left by {describe_holder(previous)}, which ended without releasing it")
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": f"nllb-prune {command}",
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "output": str(output),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe_holder(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process (it has not written its name yet)"
    return f"{holder.get('command', 'a process')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')})"


# ---- partial outputs of killed runs ----------------------------------------------------------------
def remove_stale_partials(output: str | os.PathLike[str]) -> list[Path]:
    """Remove ``.OUT.partial-PID`` / ``.tmp-PID`` / ``.old-PID`` beside ``output`` whose process is gone."""
    import shutil

    path = Path(os.path.abspath(output))
    if not path.parent.is_dir():
        return []
    pattern = re.compile(PARTIAL_PATTERN.format(name=re.escape(path.name)))
    removed = []
    for sibling in sorted(path.parent.iterdir()):
        match = pattern.fullmatch(sibling.name)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        pid = int(match.group(1))
        if process_alive(pid):
            warn(f"left {sibling} in place: process {pid} is still running (remove it by hand if it is not writing {path.name})")
            continue
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)
        warn(f"removed {sibling}, a partial output left by process {pid}, which is gone")
        removed.append(sibling)
    return removed


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
