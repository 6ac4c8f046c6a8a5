"""The pruning paper's gate-statistics JSON (its ``stats-*.json``): import and export.

Format: ``{"src-tgt": {"top1": [N], "top2": [N], "conf1": [N], "conf2": [N], "mean": [N], "rank": [N]}}``
with N = every expert of the model in global-id order (1,536 for NLLB-200: the encoder's MoE layers,
then the decoder's). Values are per-token quantities over the direction's non-padding tokens:
top1/top2 = share of tokens where the expert ranks 1st/2nd, conf1/conf2 = average gate probability
over those tokens (0 if never), mean = average gate probability, rank = average rank (1 = best .. E).

Per-language aggregates use the literal language ``X`` ("any language"): ``X-fra_Latn`` holds the
statistics of every source translated into French, ``fra_Latn-X`` of French translated into every
target. This is how the companion code (naver/nllb-pruning) reads its 202-language file: when a
direction is missing it averages the keys ``src-*`` for the encoder and ``*-tgt`` for the decoder,
which for that file are ``src-X`` and ``X-tgt``. Selection here follows the same rule
(:mod:`pruning.select`): a language's encoder experts come from directions whose source is that
language, its decoder experts from directions whose target it is.

Import gives a :class:`~pruning.stats.counters.RoutingStats` of *normalised counters*: ``tokens`` = 1
in every layer and every other counter divided by the direction's token count (``top1`` = share,
``conf1`` = conf1 * top1, ``gate`` = mean, ``rank`` = average rank, ...). Every metric of
:mod:`metrics` is a ratio of counters, so it gives on these exactly what it gives on the raw counters;
only the relative weight of directions is lost (the file has no token counts), so ``--aggregate tokens``
weighs every direction equally. Never merge normalised statistics with collected ones.

Export writes our counters in that format, one key per direction (and optionally the per-language
aggregates ``src-X`` / ``X-tgt``, counters summed over directions). A side without statistics is
written as zeros, and an all-zero half is read back as absent.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import torch

from pruning.atomic import read_json, write_text
from pruning.data.directions import split_direction
from pruning.stats.counters import RoutingStats, StatsError
from pruning.topology import NLLB_MOE_54B, Topology

PAPER_QUANTITIES = ("top1", "top2", "conf1", "conf2", "mean", "rank")
ANY_LANGUAGE = "X"
"""The language of the paper's per-language aggregate keys (``X-tgt``, ``src-X``)."""
PAPER_FORMAT = "nllb-pruning-paper-json"
_SHARE_TOLERANCE = 1e-3


# ---- import --------------------------------------------------------------------------------------
def read_paper_json(path: str | os.PathLike[str], *, topology: Topology = NLLB_MOE_54B) -> RoutingStats:
    """Read a paper ``stats-*.json`` as normalised counters (see the module docstring)."""
    data = read_json(path, error=StatsError, what="statistics file")
    return paper_data_to_stats(data, topology=topology, what=str(path))


def paper_data_to_stats(data: Any, *, topology: Topology = NLLB_MOE_54B, what: str = "paper statistics") -> RoutingStats:
    """Normalised :class:`RoutingStats` from the parsed JSON value ``data``."""
    if not isinstance(data, dict) or not data:
        raise StatsError(f"{what}: expected a non-empty object {{'src-tgt': {{'top1': [...], ...}}}}")
    stats = RoutingStats(topology, {}, {"format": PAPER_FORMAT, "source": what, "normalised": True})
    # An all-zero half (e.g. the encoder half of a key exported from decoder-only statistics) is read as
    # "no statistics for that side"; a half with data must pass the checks of _check_side.
    for key in sorted(data):
        _check_key(key, what=what)
        quantities = _read_quantities(data[key], topology=topology, what=f"{what}: {key!r}")
        for side, rows in _split_sides(topology).items():
            # each quantity [N] -> this side's block [L, E]
            q = {name: values[rows].reshape(-1, topology.num_experts) for name, values in quantities.items()}
            if not any(bool(v.any()) for v in q.values()):
                continue  # an all-zero half: no statistics for that side (written so by export)
            _check_side(q, topology=topology, what=f"{what}: {key!r} ({'encoder' if side == 'enc' else 'decoder'} half)")
            stats.counters.setdefault(key, {})[side] = _normalised_counters(q)
    stats.validate(what=what)
    return stats


def _normalised_counters(q: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Counters divided by the token count, from the six per-token quantities (each [L, E])."""
    return {
        "tokens": torch.ones(q["top1"].shape[0], dtype=torch.float64),
        "top1": q["top1"],
        "top2": q["top2"],
        "gate": q["mean"],
        "rank": q["rank"],
        "conf1": q["conf1"] * q["top1"],
        "conf2": q["conf2"] * q["top2"],
    }


def _check_key(key: Any, *, what: str) -> None:
    if not isinstance(key, str):
        raise StatsError(f"{what}: key {key!r} is not a direction 'src-tgt'")
    split_direction(key, what=f"{what}: key")


def _read_quantities(entry: Any, *, topology: Topology, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(entry, dict):
        raise StatsError(f"{what} must be an object of lists {list(PAPER_QUANTITIES)}, got {type(entry).__name__}")
    missing = [q for q in PAPER_QUANTITIES if q not in entry]
    if missing:
        raise StatsError(f"{what} lacks {missing}; each direction needs {list(PAPER_QUANTITIES)}")
    n = topology.num_total_experts
    out = {}
    for name in PAPER_QUANTITIES:
        values = entry[name]
        if not isinstance(values, list) or len(values) != n:
            got = f"{len(values)} values" if isinstance(values, list) else type(values).__name__
            raise StatsError(
                f"{what}/{name} has {got}, expected {n} (one per expert of a model with "
                f"{topology.num_moe_layers} MoE layers of {topology.num_experts} experts): statistics of another topology?"
            )
        try:
            tensor = torch.tensor(values, dtype=torch.float64)  # [N]
        except (TypeError, ValueError):
            raise StatsError(f"{what}/{name} must hold numbers") from None
        if not torch.isfinite(tensor).all():
            raise StatsError(f"{what}/{name} contains NaN or infinite values")
        if (tensor < 0).any():
            raise StatsError(f"{what}/{name} contains negative values (first at expert id {int(torch.nonzero(tensor < 0)[0])})")
        out[name] = tensor
    return out


def _check_side(q: dict[str, torch.Tensor], *, topology: Topology, what: str) -> None:
    """Shares and probabilities at most 1, average rank at most E, top1 shares summing to 1 per layer."""
    for name in ("top1", "top2", "conf1", "conf2", "mean"):
        if (q[name] > 1 + _SHARE_TOLERANCE).any():
            raise StatsError(f"{what}/{name} has values above 1 ({float(q[name].max()):.4g}): expected shares and probabilities")
    if (q["rank"] > topology.num_experts + _SHARE_TOLERANCE).any():
        raise StatsError(f"{what}/rank has values above {topology.num_experts} (the number of experts per layer)")
    layer_sums = q["top1"].sum(1)  # [L]; every token has exactly one 1st choice
    empty = [i for i, s in enumerate(layer_sums.tolist()) if s <= 0]
    if empty:
        raise StatsError(f"{what}: top1 is zero for every expert of MoE layer(s) {empty}: no tokens?")
    if (layer_sums > 1 + _SHARE_TOLERANCE).any():
        raise StatsError(f"{what}/top1 sums to {float(layer_sums.max()):.4g} in a layer, expected 1 (shares, not counts)")


def _split_sides(topology: Topology) -> dict[str, slice]:
    """Slices of the global-id vector belonging to each side."""
    e = topology.num_experts
    enc, dec = topology.side_moe_indices("encoder"), topology.side_moe_indices("decoder")
    return {"enc": slice(enc.start * e, enc.stop * e), "dec": slice(dec.start * e, dec.stop * e)}


# ---- export --------------------------------------------------------------------------------------
def paper_quantities(counters: dict[str, torch.Tensor], *, where: str = "statistics") -> dict[str, torch.Tensor]:
    """The six per-token quantities (each [L, E]) of one side's counters, the paper's orientation."""
    from metrics import compute_metric  # the paper's rank is raw (lower = better), unlike our "rank" metric

    out = {name: compute_metric(name, counters, where=where) for name in ("top1", "top2", "conf1", "conf2", "mean")}
    out["rank"] = counters["rank"].to(torch.float64) / counters["tokens"].to(torch.float64)[:, None]
    return out


def stats_to_paper_data(stats: RoutingStats, *, directions: bool = True, languages: bool = False) -> dict[str, dict[str, list[float]]]:
    """JSON value of ``stats`` in the paper's format: per direction, and/or ``src-X`` / ``X-tgt`` aggregates."""
    from metrics import sum_counters

    groups: dict[str, list[str]] = {}
    if directions:
        groups.update({d: [d] for d in stats.directions})
    if languages:
        pairs = [(d, *split_direction(d)) for d in stats.directions]
        for lang in sorted({s for _, s, _ in pairs} - {ANY_LANGUAGE}):
            groups[f"{lang}-{ANY_LANGUAGE}"] = [d for d, s, _ in pairs if s == lang]
        for lang in sorted({t for _, _, t in pairs} - {ANY_LANGUAGE}):
            groups[f"{ANY_LANGUAGE}-{lang}"] = [d for d, _, t in pairs if t == lang]
    out: dict[str, dict[str, list[float]]] = {}
    for key in sorted(groups):
        halves = []
        for side in ("enc", "dec"):
            sides = [stats.counters[d][side] for d in groups[key] if side in stats.counters[d]]
            if not sides:  # no statistics for this side: an all-zero half, which import reads as absent
                n_layers = stats.num_layers(side)
                halves.append({name: torch.zeros(n_layers, stats.topology.num_experts) for name in PAPER_QUANTITIES})
                continue
            counters = sides[0] if len(sides) == 1 else sum_counters(sides)
            halves.append(paper_quantities(counters, where=f"{key}/{side}"))
        out[key] = {name: [_num(v) for v in torch.cat([h[name].flatten() for h in halves]).tolist()] for name in PAPER_QUANTITIES}
    return out


def write_paper_json(stats: RoutingStats, path: str | os.PathLike[str], *, directions: bool = True, languages: bool = False) -> Path:
    """Write ``stats`` as a paper ``stats-*.json``, atomically."""
    stats.validate(what="statistics to export")
    data = stats_to_paper_data(stats, directions=directions, languages=languages)
    return write_text(path, json.dumps(data))


def _num(value: float) -> float | int:
    return int(value) if value == 0 or (math.isfinite(value) and value == int(value) and abs(value) < 2**53) else value


# ---- either format -------------------------------------------------------------------------------
def load_statistics(path: str | os.PathLike[str], *, topology: Topology = NLLB_MOE_54B) -> RoutingStats:
    """Our statistics file (``.safetensors``) or the paper's JSON (``.json``; read for ``topology``)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        return read_paper_json(path, topology=topology)
    return RoutingStats.load(path)


def is_normalised(stats: RoutingStats) -> bool:
    """Whether ``stats`` came from the paper's JSON (per-token quantities, not token counts)."""
    return bool(stats.info.get("normalised"))


def languages_of(directions: Iterable[str]) -> list[str]:
    """Real languages appearing in ``directions`` (the aggregate language ``X`` left out)."""
    langs: set[str] = set()
    for d in directions:
        langs.update(split_direction(d))
    return sorted(langs - {ANY_LANGUAGE})
