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

File format (safetensors): one float64 tensor per ``{src}-{tgt}/{enc|dec}/{counter}``; string metadata
with ``format`` = :data:`FORMAT`, ``version``, ``topology`` (JSON) and ``info`` (JSON: model identity,
data directory and split, mode, beam, versions, date, ...). Written atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from pruning.atomic import atomic_path
from pruning.errors import UserError
from pruning.topology import Topology, TopologyError

FORMAT = "nllb-prune-routing-stats"
VERSION = 1
STAT_SIDES = ("enc", "dec")
BASE_COUNTERS = ("tokens", "top1", "top2", "gate", "conf1", "conf2", "rank")
MAX_COUNTERS = frozenset({"max_abs"})


class StatsError(UserError):
    """A statistics file or request is malformed; the message names the file, key or language."""


def direction_key(src: str, tgt: str) -> str:
    return f"{src}-{tgt}"


def split_direction(direction: str) -> tuple[str, str]:
    parts = direction.split("-")
    if len(parts) != 2 or not all(parts):
        raise StatsError(f"a direction must look like 'src-tgt' (e.g. 'fra_Latn-eng_Latn'), got {direction!r}")
    return parts[0], parts[1]


@dataclass
class RoutingStats:
    """Counters per direction and side, plus the topology they were collected on."""

    topology: Topology
    counters: dict[str, dict[str, dict[str, torch.Tensor]]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    # ---- building ----------------------------------------------------------------------------
    def empty_side(self, side: str) -> dict[str, torch.Tensor]:
        n_layers = self.num_layers(side)
        e = self.topology.num_experts
        out = {name: torch.zeros(n_layers, e, dtype=torch.float64) for name in BASE_COUNTERS}
        out["tokens"] = torch.zeros(n_layers, dtype=torch.float64)
        return out

    def num_layers(self, side: str) -> int:
        full = {"enc": "encoder", "dec": "decoder"}.get(side)
        if full is None:
            raise StatsError(f"side must be one of {STAT_SIDES}, got {side!r}")
        return len(self.topology.moe_layers(full))  # type: ignore[arg-type]

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
                raise StatsError(
                    f"counter {direction}/{side}/{name}: expected shape {tuple(bucket[name].shape)}, "
                    f"got {tuple(value.shape)}"
                )
            bucket[name] += value

    def merge(self, other: "RoutingStats", *, what: str = "the other statistics") -> "RoutingStats":
        """Add ``other``'s counters into a copy of this one; refuses another model topology."""
        self.topology.check_same_routing(other.topology, what=what)
        self._check_compatible(other, what=what)
        out = RoutingStats(self.topology, {}, dict(self.info))
        for source in (self, other):
            for direction, side, name, value in source.items():
                out.add(direction, side, name, value)
        sources = list(self.info.get("merged_from", [self.info])) + list(other.info.get("merged_from", [other.info]))
        out.info = {"merged_from": sources}
        return out

    def is_normalised(self) -> bool:
        """Imported from the paper's JSON (per-token shares, not counts); see pruning.stats.paper_json."""
        return any(info.get("normalised") for info in self.info.get("merged_from", [self.info]))

    def _check_compatible(self, other: "RoutingStats", *, what: str) -> None:
        """Refuse sums that would mean nothing: shares with counts, or a direction with different counters."""
        if self.is_normalised() != other.is_normalised():
            raise StatsError(
                f"{what}: cannot merge statistics imported from the paper's JSON (normalised shares) with "
                "collected counts; select from each separately"
            )
        for direction in sorted(set(self.counters) & set(other.counters)):
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
                    f"{what}: counter {direction}/{side}/{name} has shape {tuple(value.shape)}, "
                    f"expected first dimension {n_layers} (MoE layers of that side)"
                )
            if name in BASE_COUNTERS and name != "tokens" and tuple(value.shape) != (n_layers, e):
                raise StatsError(
                    f"{what}: counter {direction}/{side}/{name} has shape {tuple(value.shape)}, expected ({n_layers}, {e})"
                )
            if torch.isnan(value).any():
                raise StatsError(f"{what}: counter {direction}/{side}/{name} contains NaN")
            if name in BASE_COUNTERS and (value < 0).any():
                raise StatsError(f"{what}: counter {direction}/{side}/{name} contains negative values")

    # ---- file I/O ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (temporary name in the same directory, then rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{d}/{s}/{n}": v.contiguous() for d, s, n, v in self.items()}
        metadata = {
            "format": FORMAT,
            "version": str(VERSION),
            "topology": json.dumps(self.topology.to_dict(), sort_keys=True),
            "info": json.dumps(self.info, sort_keys=True, default=str),
        }
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
                    raise StatsError(
                        f"{path} is not a routing statistics file (metadata format={metadata.get('format')!r}, "
                        f"expected {FORMAT!r})"
                    )
                if int(metadata.get("version", -1)) > VERSION:
                    raise StatsError(f"{path} has format version {metadata['version']}, this toolkit reads <= {VERSION}")
                topology = Topology.from_dict(json.loads(metadata["topology"]))
                stats = cls(topology, {}, json.loads(metadata.get("info", "{}")))
                for key in handle.keys():
                    direction, side, name = _split_key(key, path)
                    stats.counters.setdefault(direction, {}).setdefault(side, {})[name] = handle.get_tensor(key)
        except (OSError, json.JSONDecodeError, KeyError) as exc:
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


def merge_files(paths: Iterable[str | os.PathLike[str]]) -> RoutingStats:
    """Merge several statistics files (all of one topology) into one."""
    merged: RoutingStats | None = None
    for path in paths:
        stats = RoutingStats.load(path)
        merged = stats if merged is None else merged.merge(stats, what=str(path))
    if merged is None:
        raise StatsError("no statistics files given to merge")
    return merged
