"""The expert index: which experts to keep, in the pruning paper's ``experts.json`` format.

Ids are the paper's global expert ids (:meth:`pruning.topology.Topology.global_id`: encoder MoE
layers first). Three JSON forms, all read and written here:

* a plain list ``[ids]``: the same experts for every direction (kind ``"all"``);
* ``{"src-tgt": [ids]}``: one entry per direction (kind ``"pair"``);
* ``{"lang": [ids]}``: one entry per language (kind ``"lang"``); a direction ``src-tgt`` uses the
  encoder ids of ``src``'s entry and the decoder ids of ``tgt``'s entry. An entry may hold only one
  side when the language only had statistics as a source (encoder ids) or as a target (decoder ids).

:func:`experts_for_direction` resolves any form for one direction into
``{(side, layer): [expert indices]}``; :func:`union_for_directions` does it for several at once.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

from pruning.atomic import read_json, write_text
from pruning.data.directions import SIDES, Direction, Side, split_direction
from pruning.errors import UserError
from pruning.topology import NLLB_MOE_54B, Topology

IndexKind = Literal["all", "pair", "lang"]
ALL_KEY = "*"
"""The single entry key of an index of kind ``"all"``."""
DEFAULT_MIN_PER_LAYER = 4
"""The fewest experts a kept MoE layer may hold (the pruning paper's minimum)."""

LayerExperts = dict[tuple[Side, int], list[int]]
"""``{(side, transformer layer index): sorted expert indices within that layer}``."""


class ExpertIndexError(UserError):
    """An expert index is malformed or does not cover a requested language or direction."""


@dataclass(frozen=True)
class ExpertIndex:
    """Kept experts: ``entries`` maps a language, a direction or :data:`ALL_KEY` to sorted global ids."""

    kind: IndexKind
    entries: Mapping[str, tuple[int, ...]]

    @classmethod
    def for_all(cls, ids: Iterable[int]) -> "ExpertIndex":
        return cls("all", {ALL_KEY: tuple(sorted(ids))})

    @classmethod
    def from_entries(cls, kind: IndexKind, entries: Mapping[str, Iterable[int]]) -> "ExpertIndex":
        return cls(kind, {key: tuple(sorted(ids)) for key, ids in sorted(entries.items())})

    @property
    def keys(self) -> list[str]:
        return sorted(self.entries)

    def to_json_data(self) -> list[int] | dict[str, list[int]]:
        if self.kind == "all":
            return list(self.entries[ALL_KEY])
        return {key: list(self.entries[key]) for key in sorted(self.entries)}

    @classmethod
    def from_json_data(cls, data: Any, *, what: str = "expert index") -> "ExpertIndex":
        """Parse the JSON value of an ``experts.json`` (structure only; see :func:`validate_index`)."""
        if isinstance(data, list):
            return cls.for_all(_id_list(data, what=what, key=None))
        if not isinstance(data, dict):
            raise ExpertIndexError(f"{what}: expected a list of expert ids or an object of lists, got {type(data).__name__}")
        if not data:
            raise ExpertIndexError(f"{what}: the index is empty")
        pairs = sorted(k for k in data if "-" in k)
        langs = sorted(k for k in data if "-" not in k)
        if pairs and langs:
            raise ExpertIndexError(
                f"{what}: mixes direction keys ({pairs[0]!r}, ...) and language keys ({langs[0]!r}, ...); "
                f"an index is either per direction ('src-tgt') or per language"
            )
        kind: IndexKind = "pair" if pairs else "lang"
        if kind == "pair":
            for key in pairs:
                Direction.parse(key, what=f"{what}: key")
        entries = {key: _id_list(value, what=what, key=key) for key, value in data.items()}
        return cls.from_entries(kind, entries)


# ---- files ---------------------------------------------------------------------------------------
def read_index(path: str | os.PathLike[str]) -> ExpertIndex:
    """Read an ``experts.json`` (structure checked; call :func:`validate_index` for the topology checks)."""
    data = read_json(path, error=ExpertIndexError, what="expert index")
    return ExpertIndex.from_json_data(data, what=str(path))


def write_index(index: ExpertIndex, path: str | os.PathLike[str]) -> Path:
    """Write ``index`` as JSON, one entry per line, atomically (temporary name, then rename)."""
    path = Path(path)
    data = index.to_json_data()
    if isinstance(data, list):
        text = json.dumps(data) + "\n"
    else:
        lines = [f"  {json.dumps(key)}: {json.dumps(ids)}" for key, ids in data.items()]
        text = "{\n" + ",\n".join(lines) + "\n}\n"
    return write_text(path, text)


# ---- checks --------------------------------------------------------------------------------------
def layer_counts(ids: Iterable[int], topology: Topology = NLLB_MOE_54B) -> dict[tuple[Side, int], int]:
    """Number of ``ids`` in each MoE layer, ``{(side, layer): count}`` in global order (zeros included)."""
    counts = {(side, layer): 0 for _, side, layer in topology.iter_moe_layers()}
    for gid in ids:
        ref = topology.expert_ref(gid)
        counts[(ref.side, ref.layer)] += 1
    return counts


def validate_index(
    index: ExpertIndex,
    topology: Topology = NLLB_MOE_54B,
    *,
    min_per_layer: int = DEFAULT_MIN_PER_LAYER,
    per_layer: Mapping[Side, int] | None = None,
    what: str = "expert index",
) -> None:
    """Raise :class:`ExpertIndexError` on ids out of range, duplicates, or a MoE layer under ``min_per_layer``.

    Entries of kind ``"all"`` and ``"pair"`` must cover both sides; a language entry may hold one side
    only (see the module docstring), but each side it holds must have ``min_per_layer`` in every layer.
    ``per_layer`` (e.g. ``{"encoder": 36, "decoder": 12}``) also requires exactly that many in every
    layer of the side.
    """
    n = topology.num_total_experts
    for key in index.keys:
        ids = index.entries[key]
        label = f"{what}: entry {key!r}" if index.kind != "all" else what
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ExpertIndexError(f"{label} has expert id(s) {bad[:5]} outside 0..{n - 1} (this topology has {n} experts)")
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ExpertIndexError(f"{label} repeats expert id(s) {dup[:5]}")
        counts = layer_counts(ids, topology)
        for side in SIDES:
            side_counts = {layer: c for (s, layer), c in counts.items() if s == side}
            if index.kind == "lang" and not any(side_counts.values()):
                continue
            for layer, count in side_counts.items():
                if per_layer is not None and side in per_layer and count != per_layer[side]:
                    raise ExpertIndexError(f"{label} keeps {count} expert(s) in {side} layer {layer}, expected {per_layer[side]}")
                if count < min_per_layer:
                    raise ExpertIndexError(f"{label} keeps {count} expert(s) in {side} layer {layer}; every kept MoE layer needs at least {min_per_layer}")
    if index.kind == "lang" and all(not ids for ids in index.entries.values()):
        raise ExpertIndexError(f"{what}: every language entry is empty")


def side_counts(ids: Iterable[int], topology: Topology = NLLB_MOE_54B) -> dict[Side, int]:
    """Number of ``ids`` per side."""
    out: dict[Side, int] = {"encoder": 0, "decoder": 0}
    for (side, _), count in layer_counts(ids, topology).items():
        out[side] += count
    return out


# ---- resolving -----------------------------------------------------------------------------------
def direction_ids(index: ExpertIndex, src: str, tgt: str, topology: Topology = NLLB_MOE_54B) -> list[int]:
    """Sorted global ids kept for direction ``src-tgt`` (any index kind)."""
    if index.kind == "all":
        return list(index.entries[ALL_KEY])
    if index.kind == "pair":
        key = f"{src}-{tgt}"
        if key not in index.entries:
            raise ExpertIndexError(f"direction {key!r} is not in the expert index; {_known('directions', index.keys)}")
        return list(index.entries[key])
    enc = [i for i in _lang_entry(index, src, role="source") if topology.side_of_id(i) == "encoder"]
    dec = [i for i in _lang_entry(index, tgt, role="target") if topology.side_of_id(i) == "decoder"]
    if not enc:
        raise ExpertIndexError(f"language {src!r} has no encoder experts in the expert index (it had no statistics as a source)")
    if not dec:
        raise ExpertIndexError(f"language {tgt!r} has no decoder experts in the expert index (it had no statistics as a target)")
    return sorted(enc + dec)


def experts_for_direction(index: ExpertIndex, src: str, tgt: str, topology: Topology = NLLB_MOE_54B) -> LayerExperts:
    """``{(side, layer): sorted expert indices}`` kept for ``src-tgt``, every MoE layer present."""
    return _by_layer(direction_ids(index, src, tgt, topology), topology)


def union_for_directions(index: ExpertIndex, directions: Iterable[str | tuple[str, str]], topology: Topology = NLLB_MOE_54B) -> LayerExperts:
    """Like :func:`experts_for_direction`, the union over ``directions`` (``"src-tgt"`` or ``(src, tgt)``)."""
    ids: set[int] = set()
    count = 0
    for direction in directions:
        src, tgt = _split(direction)
        ids.update(direction_ids(index, src, tgt, topology))
        count += 1
    if not count:
        raise ExpertIndexError("no directions given")
    return _by_layer(sorted(ids), topology)


def _by_layer(ids: Iterable[int], topology: Topology) -> LayerExperts:
    out: LayerExperts = {(side, layer): [] for _, side, layer in topology.iter_moe_layers()}
    for gid in ids:
        ref = topology.expert_ref(gid)
        out[(ref.side, ref.layer)].append(ref.expert)
    return {key: sorted(value) for key, value in out.items()}


def _lang_entry(index: ExpertIndex, lang: str, *, role: str) -> tuple[int, ...]:
    if lang not in index.entries:
        close = difflib.get_close_matches(lang, index.keys, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ExpertIndexError(f"{role} language {lang!r} is not in the expert index{hint}; {_known('languages', index.keys)}")
    return index.entries[lang]


def _known(what: str, keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    more = f" ... ({len(keys)} in all)" if len(keys) > limit else ""
    return f"it has {what}: {shown}{more}"


def _split(direction: str | tuple[str, str]) -> tuple[str, str]:
    return direction if isinstance(direction, tuple) else split_direction(direction)


def _id_list(value: Any, *, what: str, key: str | None) -> tuple[int, ...]:
    where = f"{what}: entry {key!r}" if key is not None else what
    if not isinstance(value, list):
        raise ExpertIndexError(f"{where} must be a list of expert ids, got {type(value).__name__}")
    bad = [v for v in value if not isinstance(v, int) or isinstance(v, bool)]
    if bad:
        raise ExpertIndexError(f"{where} must hold integer expert ids, got {bad[:3]!r}")
    return tuple(value)
