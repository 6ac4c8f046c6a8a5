"""Run a command and measure it as the rehearsal reports it: wall time, peak anonymous memory, bytes read.

Memory is the peak over time of the SUM of ``RssAnon`` (``/proc/PID/status``) over the command's whole
process tree (torchrun and its workers included), sampled every ``interval`` seconds; each process's own
peak is kept too. Bytes read are each process's last ``read_bytes`` (``/proc/PID/io``: bytes fetched
from storage, page cache misses included, mmap faults included), summed. The page cache is dropped
before the command (``/proc/sys/vm/drop_caches``, as root) so that every byte the command needs is
read from disk and counted; where that is not allowed the figure says so.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence


@dataclass
class Measurement:
    command: str
    returncode: int
    wall_s: float
    peak_rss_anon_bytes: int
    """Peak of the sum of RssAnon over the process tree."""
    per_process_peak_rss_anon_bytes: dict[str, int]
    """``pid:command`` -> that process's own peak RssAnon."""
    read_bytes: int
    """Sum over the tree of /proc/PID/io read_bytes (last sample of each process)."""
    cache_dropped: bool
    samples: int
    output_tail: str = field(repr=False, default="")

    def to_dict(self) -> dict:
        return asdict(self)


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            found += [int(c) for c in text]
    except OSError:
        pass
    return found


def process_tree(root: int) -> list[int]:
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += _children(pid)
    return tree


def _rss_anon(pid: int) -> Optional[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return 0


def _read_bytes(pid: int) -> Optional[int]:
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _name(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = "?"
    return f"{pid}:{cmd[:120]}"


def measure(
    argv: Sequence[str], *, env: Optional[dict[str, str]] = None, interval: float = 0.05, drop_cache: bool = True, log: Optional[Path] = None
) -> Measurement:
    """Run ``argv`` to completion while sampling its process tree."""
    dropped = drop_page_cache() if drop_cache else False
    out = open(log, "wb") if log else subprocess.DEVNULL
    start = time.perf_counter()
    process = subprocess.Popen(list(argv), env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT)
    peak_total, samples = 0, 0
    per_peak: dict[int, int] = {}
    last_read: dict[int, int] = {}
    names: dict[int, str] = {}
    while process.poll() is None:
        total = 0
        for pid in process_tree(process.pid):
            rss = _rss_anon(pid)
            if rss is None:
                continue
            total += rss
            per_peak[pid] = max(per_peak.get(pid, 0), rss)
            read = _read_bytes(pid)
            if read is not None:
                last_read[pid] = read
            if pid not in names:
                names[pid] = _name(pid)
        peak_total = max(peak_total, total)
        samples += 1
        time.sleep(interval)
    wall = time.perf_counter() - start
    if log:
        out.close()  # type: ignore[union-attr]
    tail = Path(log).read_text(errors="replace")[-3000:] if log else ""
    return Measurement(
        command=" ".join(argv),
        returncode=process.returncode,
        wall_s=round(wall, 2),
        peak_rss_anon_bytes=peak_total,
        per_process_peak_rss_anon_bytes={names[p]: v for p, v in per_peak.items()},
        read_bytes=sum(last_read.values()),
        cache_dropped=dropped,
        samples=samples,
        output_tail=tail,
    )


def gb(nbytes: float) -> float:
    return round(nbytes / 1e9, 3)
