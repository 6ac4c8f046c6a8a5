"""Routing statistics held as additive counters, and the statistics file that stores them.

A :class:`RoutingStats` maps each direction (``"src-tgt"``) and side (``"enc"`` / ``"dec"``) to named
counters. Encoder counters belong to the source language, decoder counters to the target language.
Every counter is additive, so two files merge by adding their tensors.

Counters (L = MoE layers of that side, E = experts per layer of the unpruned model):

===============  ==========  =================================================================
name             shape       meaning, over the non-padding tokens routed by that side
===============  ==========  =================================================================
``tokens``       [L]         tokens routed (the same in every layer)
``top1``         [L, E]      tokens whose 1st choice is the expert
``top2``         [L, E]      tokens whose 2nd choice is the expert
``gate``         [L, E]      sum of the softmax gate probability
``conf1``        [L, E]      sum of the gate probability where the expert is 1st
``conf2``        [L, E]      sum of the gate probability where the expert is 2nd
``rank``         [L, E]      sum of the expert's rank (1 = highest probability .. E)
===============  ==========  =================================================================

Optional counters (collected with ``--expert-outputs``) may be added with other names and shapes
whose first two dimensions are [L, E] (or [L] for per-layer histograms); merging adds them too,
except names in :data:`MAX_COUNTERS`, which merge by element-wise maximum.

Chunks (collected with ``--chunk-sentences K``): a direction may also hold its counters per chunk of
K sentences, chunk ``c`` = lines ``[cK, (c+1)K)`` of the split (:class:`Chunks`), so that statistics can
be resampled (``nllb-prune stability``). Chunks hold the additive counters of at most two dimensions
([L], [L, E], [L, B]; :func:`is_chunked`), not ``out_sum`` [L, E, D] nor ``coact`` [L, E, E] (too large)
nor maxima (:data:`MAX_COUNTERS`). A direction's counters are the sum of its chunks (checked on load).

File format (safetensors): one float64 tensor per ``{src}-{tgt}/{enc|dec}/{counter}``; string metadata
with ``format`` = :data:`FORMAT`, ``version``, ``topology`` (JSON) and ``info`` (JSON: model identity,
data directory and split, mode, beam, versions, date, ...). Chunked directions add
``chunks/{src}-{tgt}/ids`` (int64 [N], increasing chunk ids), ``chunks/{src}-{tgt}/sentences`` (int64
[N], sentences counted per chunk) and ``chunks/{src}-{tgt}/{enc|dec}/{counter}`` (float64 [N, ...]),
plus the metadata ``chunk_sentences`` (K, one per file). A file with chunks is written as version 2,
one without as version 1 (readable by older toolkits). Written atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from pruning.atomic import atomic_path
from pruning.data.directions import SHORT_SIDE, long_side, split_direction
from pruning.errors import UserError
from pruning.topology import Topology, TopologyError

FORMAT = "nllb-prune-routing-stats"
VERSION = 2
"""Newest format version read; files without chunks are still written as version 1."""
CHUNKS = "chunks"
"""Prefix of the chunk tensors in the file."""
STAT_SIDES = tuple(SHORT_SIDE.values())
BASE_COUNTERS = ("tokens", "top1", "top2", "gate", "conf1", "conf2", "rank")
MAX_COUNTERS = frozenset({"max_abs"})


class StatsError(UserError):
    """A statistics file or request is malformed; the message names the file, key or language."""


def is_chunked(name: str, value: torch.Tensor) -> bool:
    """Whether counter ``name`` is also kept per chunk: additive, and [L], [L, E] or [L, B] (not [L, E, D])."""
    return value.dim() <= 2 and name not in MAX_COUNTERS


@dataclass
class Chunks:
    """One direction's counters per chunk of K sentences (N chunks; chunk ``c`` = lines ``[cK, (c+1)K)``)."""

    ids: torch.Tensor
    """[N] int64: chunk ids, strictly increasing."""
    sentences: torch.Tensor
    """[N] int64: sentences counted in each chunk (K, or fewer in the last chunk of a split)."""
    counters: dict[str, dict[str, torch.Tensor]]
    """``{side: {counter: [N, L] | [N, L, E] | [N, L, B] float64}}``."""

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def totals(self, side: str) -> dict[str, torch.Tensor]:
        """The sum over the chunks of ``side``'s counters (each [L, ...])."""
        return {name: value.sum(0) for name, value in self.counters[side].items()}

    def concat(self, other: "Chunks", *, what: str) -> "Chunks":
        """Both sets of chunks, by increasing id; refuses a chunk id present in both (counted twice)."""
        both = sorted(set(self.ids.tolist()) & set(other.ids.tolist()))
        if both:
            raise StatsError(
                f"{what}: chunk(s) {both[:10]}{' ...' if len(both) > 10 else ''} are in both files: the same sentences "
                "would be counted twice; merge files collected on different sentences (--first-sentence)"
            )
        if set(self.counters) != set(other.counters) or any(set(self.counters[s]) != set(other.counters[s]) for s in self.counters):
            raise StatsError(f"{what}: the chunks of the two files hold different counters; they cannot be merged")
        order = torch.argsort(torch.cat([self.ids, other.ids]))
        return Chunks(
            torch.cat([self.ids, other.ids])[order],
            torch.cat([self.sentences, other.sentences])[order],
            {side: {name: torch.cat([value, other.counters[side][name]])[order] for name, value in named.items()} for side, named in self.counters.items()},
        )


@dataclass
class RoutingStats:
    """Counters per direction and side, plus the topology they were collected on (and chunks, if any)."""

    topology: Topology
    counters: dict[str, dict[str, dict[str, torch.Tensor]]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    chunks: dict[str, Chunks] = field(default_factory=dict)
    """Per direction collected with ``--chunk-sentences``: its counters per chunk."""
    chunk_sentences: int | None = None
    """K, sentences per chunk (one per file); None when no direction has chunks."""
    kept_once: list[str] = field(default_factory=list, compare=False)
    """Directions that :meth:`merge` found counted over the same sentences in both inputs and kept once (not saved)."""

    # ---- building ----------------------------------------------------------------------------
    def empty_side(self, side: str) -> dict[str, torch.Tensor]:
        n_layers = self.num_layers(side)
        e = self.topology.num_experts
        out = {name: torch.zeros(n_layers, e, dtype=torch.float64) for name in BASE_COUNTERS}
        out["tokens"] = torch.zeros(n_layers, dtype=torch.float64)
        return out

    def num_layers(self, side: str) -> int:
        return len(self.topology.moe_layers(long_side(side)))

    def add(self, direction: str, side: str, name: str, value: torch.Tensor) -> None:
        """Add ``value`` into counter ``name`` (creating the direction/side/counter if needed)."""
        split_direction(direction)
        sides = self.counters.setdefault(direction, {})
        if side not in sides:
            sides[side] = self.empty_side(side)
        bucket = sides[side]
        value = value.detach().to("cpu", torch.float64)
        if name not in bucket:
            bucket[name] = value.clone()
        elif name in MAX_COUNTERS:
            bucket[name] = torch.maximum(bucket[name], value)
        else:
            if bucket[name].shape != value.shape:
                raise StatsError(f"counter {direction}/{side}/{name}: expected shape {tuple(bucket[name].shape)}, got {tuple(value.shape)}")
            bucket[name] += value

    def merge(self, other: "RoutingStats", *, what: str = "the other statistics") -> "RoutingStats":
        """Add ``other``'s counters into a copy of this one; refuses another model topology.

        A direction both hold over the same sentences (:mod:`pruning.stats.provenance`) is kept once, after
        checking that both counted the same; over disjoint sentences it is summed; any other overlap is refused.
        The directions kept once are listed in the result's :attr:`kept_once`.
        """
        self.topology.check_same_routing(other.topology, what=what)
        self._check_compatible(other, what=what)
        kept_once = self._counted_in_both(other, what=what)
        out = RoutingStats(self.topology, {}, dict(self.info))
        for skip, source in ((set(), self), (set(kept_once), other)):
            for direction, side, name, value in source.items():
                if direction not in skip:
                    out.add(direction, side, name, value)
            for direction, chunks in source.chunks.items():
                if direction not in skip:
                    out.add_chunks(direction, chunks, chunk_sentences=int(source.chunk_sentences or 0), what=what)
        sources = list(self.info.get("merged_from", [self.info])) + list(other.info.get("merged_from", [other.info]))
        out.info = {"merged_from": sources}
        out.kept_once = sorted(set(self.kept_once) | set(kept_once))
        return out

    def _counted_in_both(self, other: "RoutingStats", *, what: str) -> list[str]:
        """The directions ``other`` holds over the same sentences as this one (equal counters checked)."""
        from pruning.stats.provenance import describe_pieces, direction_pieces, overlap_verdict

        same = []
        for direction in sorted(set(self.counters) & set(other.counters)):
            mine, theirs = direction_pieces(self.info, direction), direction_pieces(other.info, direction)
            verdict = overlap_verdict(mine, theirs)
            if verdict == "overlap":
                raise StatsError(
                    f"{what}: direction {direction} was counted over {describe_pieces(theirs)} there and over "
                    f"{describe_pieces(mine)} of the same data in the file(s) before it: the ranges overlap, so no sum counts "
                    "each sentence once; merge files collected on disjoint sentences (--first-sentence, --max-sentences)"
                )
            if verdict == "same":
                different = self._first_difference(other, direction)
                if different:
                    raise StatsError(
                        f"{what}: direction {direction} was counted over the same sentences ({describe_pieces(mine)}) there and "
                        f"in the file(s) before it, but its {different} differs (another model, dtype or mode?); merge only one of them"
                    )
                same.append(direction)
        return same

    def _first_difference(self, other: "RoutingStats", direction: str) -> str:
        """The first counter of ``direction`` whose values differ between the two (``""``: they are equal)."""
        mine, theirs = self.counters[direction], other.counters[direction]
        for side in sorted(set(mine) | set(theirs)):
            for name in sorted(set(mine.get(side, {})) | set(theirs.get(side, {}))):
                a, b = mine.get(side, {}).get(name), theirs.get(side, {}).get(name)
                if a is None or b is None or a.shape != b.shape or not torch.allclose(a, b, rtol=1e-6, atol=1e-6):
                    return f"counter {side}/{name}"
        return ""

    def add_chunks(self, direction: str, chunks: Chunks, *, chunk_sentences: int, what: str = "chunks") -> None:
        """Add ``direction``'s ``chunks`` (concatenated to those it holds; refuses another K or a repeated chunk)."""
        if self.chunk_sentences is not None and self.chunk_sentences != chunk_sentences:
            raise StatsError(
                f"{what}: chunks of {chunk_sentences} sentences cannot join chunks of {self.chunk_sentences} "
                "(--chunk-sentences differs); collect with the same --chunk-sentences"
            )
        self.chunk_sentences = chunk_sentences
        copy = Chunks(chunks.ids.clone(), chunks.sentences.clone(), {s: {n: v.clone() for n, v in named.items()} for s, named in chunks.counters.items()})
        held = self.chunks.get(direction)
        self.chunks[direction] = copy if held is None else held.concat(copy, what=f"{what}: direction {direction}")

    def is_normalised(self) -> bool:
        """Imported from the paper's JSON (per-token shares, not counts); see pruning.stats.paper_json."""
        return any(info.get("normalised") for info in self.info.get("merged_from", [self.info]))

    def _check_compatible(self, other: "RoutingStats", *, what: str) -> None:
        """Refuse sums that would mean nothing: shares with counts, or a direction with different counters."""
        if self.is_normalised() != other.is_normalised():
            raise StatsError(
                f"{what}: cannot merge statistics imported from the paper's JSON (normalised shares) with collected counts; select from each separately"
            )
        if self.chunk_sentences and other.chunk_sentences and self.chunk_sentences != other.chunk_sentences:
            raise StatsError(
                f"{what}: chunks of {other.chunk_sentences} sentences cannot be merged with chunks of {self.chunk_sentences} "
                "(--chunk-sentences differs); resampling needs one chunk size"
            )
        for direction in sorted(set(self.counters) & set(other.counters)):
            if (direction in self.chunks) != (direction in other.chunks):
                raise StatsError(
                    f"{what}: direction {direction} has chunk counters in only one of the files (collected with and "
                    "without --chunk-sentences); its chunks would not add up to its counters"
                )
            for side in sorted(set(self.counters[direction]) & set(other.counters[direction])):
                mine, theirs = set(self.counters[direction][side]), set(other.counters[direction][side])
                if mine != theirs:
                    raise StatsError(
                        f"{what}: direction {direction} ({side}) has counters {sorted(theirs ^ mine)} in only one of the "
                        "files (collected with and without --expert-outputs?); merging would count them over part of the tokens"
                    )

    # ---- reading -----------------------------------------------------------------------------
    @property
    def directions(self) -> list[str]:
        return sorted(self.counters)

    def items(self) -> Iterator[tuple[str, str, str, torch.Tensor]]:
        for direction in sorted(self.counters):
            for side in sorted(self.counters[direction]):
                for name in sorted(self.counters[direction][side]):
                    yield direction, side, name, self.counters[direction][side][name]

    def side(self, direction: str, side: str) -> dict[str, torch.Tensor]:
        try:
            return self.counters[direction][side]
        except KeyError:
            known = ", ".join(self.directions[:20]) + (" ..." if len(self.directions) > 20 else "")
            raise StatsError(f"no {side} statistics for direction {direction!r}; the file has: {known}") from None

    def languages(self) -> dict[str, list[str]]:
        """``{"source": [...], "target": [...]}`` languages present."""
        pairs = [split_direction(d) for d in self.directions]
        return {"source": sorted({s for s, _ in pairs}), "target": sorted({t for _, t in pairs})}

    def validate(self, *, what: str = "statistics") -> None:
        """Raise :class:`StatsError` on NaN/negative counters or wrong shapes."""
        e = self.topology.num_experts
        for direction, side, name, value in self.items():
            n_layers = self.num_layers(side)
            if value.dim() == 0 or value.shape[0] != n_layers:
                raise StatsError(
                    f"{what}: counter {direction}/{side}/{name} has shape {tuple(value.shape)}, expected first dimension {n_layers} (MoE layers of that side)"
                )
            if name in BASE_COUNTERS and name != "tokens" and tuple(value.shape) != (n_layers, e):
                raise StatsError(f"{what}: counter {direction}/{side}/{name} has shape {tuple(value.shape)}, expected ({n_layers}, {e})")
            if torch.isnan(value).any():
                raise StatsError(f"{what}: counter {direction}/{side}/{name} contains NaN")
            if name in BASE_COUNTERS and (value < 0).any():
                raise StatsError(f"{what}: counter {direction}/{side}/{name} contains negative values")
        for direction, chunks in self.chunks.items():
            self._validate_chunks(direction, chunks, what=what)

    def _validate_chunks(self, direction: str, chunks: Chunks, *, what: str) -> None:
        """Chunk ids increasing, one row per chunk, the chunked counters of every side, summing to the direction's."""
        where = f"{what}: chunks of {direction}"
        if direction not in self.counters:
            raise StatsError(f"{where}: the direction has no counters")
        k = self.chunk_sentences
        if not k or k < 1:
            raise StatsError(f"{where}: the file has no chunk size (metadata chunk_sentences), got {k!r}")
        n = len(chunks)
        ids, sentences = chunks.ids, chunks.sentences
        if ids.dim() != 1 or n == 0 or tuple(sentences.shape) != (n,):
            raise StatsError(f"{where}: ids {tuple(ids.shape)} and sentences {tuple(sentences.shape)} must both be [N], N >= 1")
        if (ids < 0).any() or (n > 1 and not bool((ids[1:] > ids[:-1]).all())):
            raise StatsError(f"{where}: chunk ids must be non-negative and strictly increasing, got {ids.tolist()[:10]}")
        if (sentences < 1).any() or (sentences > k).any():
            raise StatsError(f"{where}: every chunk must count 1 to {k} sentences, got {sentences.tolist()[:10]}")
        if set(chunks.counters) != set(self.counters[direction]):
            raise StatsError(f"{where}: sides {sorted(chunks.counters)}, the direction has {sorted(self.counters[direction])}")
        for side, named in self.counters[direction].items():
            expected = {name for name, value in named.items() if is_chunked(name, value)}
            if set(chunks.counters[side]) != expected:
                raise StatsError(f"{where} ({side}): counters {sorted(chunks.counters[side])}, expected {sorted(expected)}")
            for name, value in chunks.counters[side].items():
                total = named[name]
                if tuple(value.shape) != (n, *total.shape):
                    raise StatsError(f"{where}: {side}/{name} has shape {tuple(value.shape)}, expected {(n, *total.shape)}")
                if torch.isnan(value).any() or (name in BASE_COUNTERS and (value < 0).any()):
                    raise StatsError(f"{where}: {side}/{name} contains NaN or negative values")
                if not torch.allclose(value.sum(0), total, rtol=1e-9, atol=1e-9):
                    diff = float((value.sum(0) - total).abs().max())
                    raise StatsError(f"{where}: {side}/{name} summed over the chunks differs from the direction's counter (max abs diff {diff:.3g})")

    # ---- file I/O ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (temporary name in the same directory, then rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{d}/{s}/{n}": v.contiguous() for d, s, n, v in self.items()}
        for direction, chunks in sorted(self.chunks.items()):
            tensors[f"{CHUNKS}/{direction}/ids"] = chunks.ids.to(torch.int64).contiguous()
            tensors[f"{CHUNKS}/{direction}/sentences"] = chunks.sentences.to(torch.int64).contiguous()
            for side, named in chunks.counters.items():
                tensors.update({f"{CHUNKS}/{direction}/{side}/{name}": v.contiguous() for name, v in named.items()})
        metadata = {
            "format": FORMAT,
            "version": str(VERSION if self.chunks else 1),
            "topology": json.dumps(self.topology.to_dict(), sort_keys=True),
            "info": json.dumps(self.info, sort_keys=True, default=str),
        }
        if self.chunks:
            metadata["chunk_sentences"] = str(self.chunk_sentences)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "RoutingStats":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise StatsError(f"statistics file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                if metadata.get("format") != FORMAT:
                    raise StatsError(f"{path} is not a routing statistics file (metadata format={metadata.get('format')!r}, expected {FORMAT!r})")
                if int(metadata.get("version", -1)) > VERSION:
                    raise StatsError(f"{path} has format version {metadata['version']}, this toolkit reads <= {VERSION}")
                topology = Topology.from_dict(json.loads(metadata["topology"]))
                stats = cls(topology, {}, json.loads(metadata.get("info", "{}")))
                chunk_parts: dict[str, dict[str, Any]] = {}
                for key in handle.keys():
                    if key.startswith(f"{CHUNKS}/"):
                        _read_chunk_key(key, handle.get_tensor(key), chunk_parts, path)
                        continue
                    direction, side, name = _split_key(key, path)
                    stats.counters.setdefault(direction, {}).setdefault(side, {})[name] = handle.get_tensor(key)
                stats.chunks = _assemble_chunks(chunk_parts, path)
                if stats.chunks:
                    stats.chunk_sentences = int(metadata.get("chunk_sentences", "0"))
        except (OSError, json.JSONDecodeError, KeyError, ValueError) as exc:
            raise StatsError(f"cannot read statistics file {path}: {exc}") from exc
        except Exception as exc:  # safetensors raises its own error types for truncated files
            if isinstance(exc, (StatsError, TopologyError)):
                raise
            raise StatsError(f"cannot read statistics file {path}: {exc}") from exc
        stats.validate(what=str(path))
        return stats


def _split_key(key: str, path: Path) -> tuple[str, str, str]:
    parts = key.split("/")
    if len(parts) != 3 or parts[1] not in STAT_SIDES:
        raise StatsError(f"{path}: tensor {key!r} is not named '{{src}}-{{tgt}}/{{enc|dec}}/{{counter}}'")
    split_direction(parts[0])
    return parts[0], parts[1], parts[2]


def _read_chunk_key(key: str, value: torch.Tensor, parts: dict[str, dict[str, Any]], path: Path) -> None:
    """File one ``chunks/...`` tensor into ``parts[direction]`` (``ids``, ``sentences`` or ``(side, name)``)."""
    fields = key.split("/")
    if len(fields) == 3 and fields[2] in ("ids", "sentences"):
        split_direction(fields[1])
        parts.setdefault(fields[1], {})[fields[2]] = value
    elif len(fields) == 4 and fields[2] in STAT_SIDES:
        split_direction(fields[1])
        parts.setdefault(fields[1], {}).setdefault("counters", {}).setdefault(fields[2], {})[fields[3]] = value
    else:
        raise StatsError(f"{path}: tensor {key!r} is not named '{CHUNKS}/{{src}}-{{tgt}}/ids', '.../sentences' or '.../{{enc|dec}}/{{counter}}'")


def _assemble_chunks(parts: dict[str, dict[str, Any]], path: Path) -> dict[str, Chunks]:
    out = {}
    for direction, found in sorted(parts.items()):
        missing = [name for name in ("ids", "sentences", "counters") if name not in found]
        if missing:
            raise StatsError(f"{path}: chunks of {direction} lack {', '.join(missing)}")
        out[direction] = Chunks(found["ids"], found["sentences"], found["counters"])
    return out


def merge_files(paths: Iterable[str | os.PathLike[str]]) -> RoutingStats:
    """Merge several statistics files (all of one topology) into one; a file given twice is refused."""
    paths = [Path(p) for p in paths]
    seen: dict[Any, Path] = {}
    for path in paths:
        key = _file_key(path)
        if key in seen:
            raise StatsError(f"{path} is given twice (also as {seen[key]}): its counters would be added to themselves")
        seen[key] = path
    merged: RoutingStats | None = None
    for path in paths:
        stats = RoutingStats.load(path)
        merged = stats if merged is None else merged.merge(stats, what=str(path))
    if merged is None:
        raise StatsError("no statistics files given to merge")
    return merged


def _file_key(path: Path) -> Any:
    """What names one file however it is spelled (device and inode; the absolute path if it does not exist)."""
    try:
        stat = path.stat()
    except OSError:
        return os.path.abspath(path)
    return (stat.st_dev, stat.st_ino)
