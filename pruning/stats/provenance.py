"""Which sentences a statistics file counted: the data it read, and per direction the lines it used.

``nllb-prune stats`` records in the file's ``info``: ``data.files``, the sha256 of every FLORES file it
read (``{"fra_Latn.dev": digest}``, the data's fingerprint), ``data.split``, ``data.first_sentence`` and,
per direction, ``sentences`` (how many lines from ``first_sentence`` it counted). A merged file keeps one
such ``info`` per source (``merged_from``). From them:

* ``--resume`` refuses another dataset under the same file: a file of a language whose digest differs
  from the one recorded (other sentences behind the same name, or another ``--data``);
* ``merge-stats`` knows, per direction, the pieces of data it counts: the sentence range
  ``[first, first + n)`` of one dataset (the two files' digests and the split). Two inputs holding a
  direction over the same pieces counted the same sentences: they must hold equal counters, and one is
  kept (a direction collected by ``make collect-stats`` for both of its languages); pieces over disjoint
  ranges of one dataset are summed (chunks of a corpus, ``--first-sentence``); any other overlap is
  refused, since no sum of the two would count each sentence once.

Files from before the fingerprint (no ``data.files``) name their data by directory and split instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional

from pruning.data.directions import split_direction
from pruning.model.identity import model_identity
from pruning.stats.counters import StatsError
from pruning.versions import versions


# ---- the data a run reads ------------------------------------------------------------------------
def data_fingerprint(flores: Any, *, split: str, languages: Iterable[str]) -> dict[str, str]:
    """``{"fra_Latn.dev": sha256}`` of the FLORES file of each language in ``split``."""
    from pruning.manifest import sha256_file

    return {flores.path(lang, split).name: sha256_file(flores.path(lang, split)) for lang in sorted(set(languages))}


def check_same_data(info: dict[str, Any], files: dict[str, str], *, data_dir: str, path: Path) -> None:
    """Refuse to resume ``path`` (whose ``info`` is given) with FLORES files other than those it counted."""
    for source in info.get("merged_from", [info]):
        recorded = (source.get("data") or {}).get("files") or {}
        differ = sorted(name for name, digest in files.items() if name in recorded and recorded[name] != digest)
        if differ:
            old_dir = (source.get("data") or {}).get("dir")
            raise StatsError(
                f"--resume: {path} was collected on other sentences: {', '.join(differ[:6])} of --data {data_dir} "
                f"differ from the file(s) it counted (sha256){'; it read ' + str(old_dir) if old_dir else ''}; "
                "collect into another --out (and merge-stats the files), or resume with the data it was collected on"
            )


def record_data(info: dict[str, Any], files: dict[str, str]) -> None:
    """Add the digests of files read for the first time into a resumed file's ``info`` (a file from before
    the fingerprint is left without one: its earlier directions' data is unknown)."""
    data = info.get("data")
    if isinstance(data, dict) and isinstance(data.get("files"), dict):
        data["files"].update({name: digest for name, digest in files.items() if name not in data["files"]})


# ---- what a direction of a file counted ----------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """A range of lines ``[first, stop)`` of one dataset over which a direction was counted."""

    dataset: tuple[Any, ...]
    """The data's identity: (split, source file digest, target file digest), or (directory, split)."""
    first: int
    stop: Optional[int]
    """None: unknown (a file from before ``sentences`` was recorded): to the end of the split."""

    def overlaps(self, other: "Piece") -> bool:
        if self.dataset != other.dataset:
            return False
        self_stop = self.stop if self.stop is not None else float("inf")
        other_stop = other.stop if other.stop is not None else float("inf")
        return self.first < other_stop and other.first < self_stop

    def describe(self) -> str:
        return f"lines {self.first}..{'end' if self.stop is None else self.stop - 1}"


def direction_pieces(info: dict[str, Any], direction: str) -> Optional[frozenset[Piece]]:
    """The pieces a file's direction counted (one per source ``info`` holding it); None when unknown."""
    pieces = set()
    for source in info.get("merged_from", [info]):
        piece = _piece(source, direction)
        if piece is None:
            if direction in (source.get("sentences") or {}) or "data" not in source:
                return None  # a source without the data's identity: nothing can be said
            continue
        pieces.add(piece)
    return frozenset(pieces) or None


def _piece(source: dict[str, Any], direction: str) -> Optional[Piece]:
    data = source.get("data")
    sentences = (source.get("sentences") or {}).get(direction)
    if not isinstance(data, dict) or sentences is None:
        return None
    src, tgt = split_direction(direction)
    split = data.get("split")
    files = data.get("files") or {}
    names = (f"{src}.{split}", f"{tgt}.{split}")
    if all(name in files for name in names):
        dataset: tuple[Any, ...] = (split, files[names[0]], files[names[1]])
    else:
        dataset = (data.get("dir"), split)
    first = int(data.get("first_sentence") or 0)
    return Piece(dataset, first, first + int(sentences))


def overlap_verdict(mine: Optional[frozenset[Piece]], theirs: Optional[frozenset[Piece]]) -> str:
    """``"same"`` (one set of sentences, keep one), ``"disjoint"`` (sum them) or ``"overlap"`` (refuse)."""
    if mine is None or theirs is None:
        return "disjoint"  # files without the data's identity: summed, as before the fingerprint
    if mine == theirs:
        return "same"
    if any(a.overlaps(b) for a in mine for b in theirs):
        return "overlap"
    return "disjoint"


def describe_pieces(pieces: Optional[frozenset[Piece]]) -> str:
    if not pieces:
        return "unknown sentences"
    return ", ".join(sorted(piece.describe() for piece in pieces))


# ---- what made the counters (the file's info), and whether a run may add to it ----------------
def collection_info(options: Any, model: Any, *, expert_parallel: int, data_parallel: int, data_root: Path) -> dict[str, Any]:
    """What made these counters (stored in the file's ``info``)."""
    identity = model_identity(model)
    identity["path"] = os.path.abspath(options.model)
    info: dict[str, Any] = {
        "model": identity,
        "data": {"dir": os.path.abspath(data_root), "split": options.split, "max_sentences": options.max_sentences, "first_sentence": options.first_sentence},
        "chunk_sentences": options.chunk_size,
        "mode": options.mode,
        "counted": "teacher-forced reference" if options.mode == "teacher" else "teacher-forced beam-search hypothesis",
        "beam": options.beam if options.mode == "beam" else None,
        "max_new_tokens": options.max_new_tokens if options.mode == "beam" else None,
        "batch_tokens": options.batch_tokens,
        "dispatch": getattr(model, "dispatch_name", options.dispatch),
        "expert_outputs": options.expert_outputs,
        "sentences": {},
        "processes": {"expert_parallel": expert_parallel, "data_parallel": data_parallel},
        "versions": versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return info


_RESUME_KEYS = (
    ("model", "config_sha256"),
    ("model", "router_fingerprint"),
    ("data", "split"),
    ("data", "max_sentences"),
    ("data", "first_sentence"),
    ("mode",),
    ("beam",),
    ("max_new_tokens",),
    ("expert_outputs",),
    ("chunk_sentences",),
)
_RESUME_DEFAULTS: dict[tuple[str, ...], Any] = {("data", "first_sentence"): 0}
"""What a file from before an option was collected with (no key in its info)."""


def check_resumable(previous: dict[str, Any], current: dict[str, Any], *, path: Path) -> None:
    """Refuse to add counters to a file collected with other settings (another model, split, mode, beam ...)."""
    infos = previous.get("merged_from", [previous])
    for info in infos:
        diffs = []
        for keys in _RESUME_KEYS:
            old, new = _dig(info, keys), _dig(current, keys)
            if keys == ("expert_outputs",):  # files from before the option have no key: collected without
                old, new = bool(old), bool(new)
            if old is None:
                old = _RESUME_DEFAULTS.get(keys)
            if old != new:
                diffs.append(f"{'.'.join(keys)}: file {old!r}, this run {new!r}")
        if diffs:
            raise StatsError(
                f"--resume: {path} was collected with other settings ({'; '.join(diffs)}); "
                f"write to another --out (and merge later with nllb-prune merge-stats) or drop --resume"
            )


def _dig(info: dict[str, Any], keys: tuple[str, ...]) -> Any:
    value: Any = info
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value
