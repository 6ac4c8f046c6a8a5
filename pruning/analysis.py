"""How much do criteria agree, and how stable is a kept set: ``nllb-prune compare-metrics`` and ``stability``.

Dimension legend: L MoE layers of a side, E experts per layer, S bootstrap samples, N chunks of a
direction (``stats --chunk-sentences``), M metrics.

Scores and kept sets come from the selection code: the entries (language, direction or one global
list) and their statistics from :func:`pruning.select.plan_units`, scores aggregated over directions
by :func:`metrics.aggregate_metric` (``--aggregate``), counts from :func:`pruning.select.plan_keep`,
kept sets from :func:`pruning.select.select_masks` / :func:`pruning.select.select_per_layer`.

* :func:`compare_metrics`: for every pair of metrics, per entry, side and MoE layer, the Spearman rank
  correlation of the expert scores (:func:`spearman`, average ranks for ties) and the Jaccard
  similarity of the kept sets (:func:`jaccard`).
* :func:`stability`: for m = 1 .. N chunks, S bootstrap samples of m chunks (with replacement); each
  sample's counters are summed, scored and selected; its kept set (all MoE layers of a side, as
  (layer, expert) pairs) is compared by Jaccard with the kept set of all chunks.

Bootstrap samples are scored in one call per m by stacking the samples along the layer dimension
([S, L, ...] -> [S*L, ...]): every registered metric scores each layer from that layer's counters
only, which this relies on.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from metrics import MetricError, aggregate_metric, compute_metric, metric_names
from metrics.outputs import needs_expert_outputs
from pruning.data.directions import long_side
from pruning.errors import UserError
from pruning.select import KeepPlan, SelectOptions, Unit, plan_keep, plan_units, select_masks, select_per_layer
from pruning.stats.counters import RoutingStats


class AnalysisError(UserError):
    """An analysis cannot run on the given statistics or settings."""


# ---- numbers --------------------------------------------------------------------------------------
def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dimension, 1 = smallest; tied values share the mean of their positions.

    ``values`` [..., E] -> float64 [..., E]; e.g. ``[10, 20, 20, 5]`` -> ``[2, 3.5, 3.5, 1]``.
    """
    rows = values.detach().to(torch.float64).cpu().numpy().reshape(-1, values.shape[-1])  # [R, E]
    out = np.empty_like(rows)
    for r, row in enumerate(rows):
        order = np.argsort(row, kind="stable")
        ordered = row[order]
        starts = np.concatenate([[0], np.flatnonzero(ordered[1:] != ordered[:-1]) + 1])  # first position of each tie group
        ends = np.concatenate([starts[1:], [len(row)]])
        out[r, order] = np.repeat((starts + 1 + ends) / 2, ends - starts)  # mean of positions start+1 .. end
    return torch.from_numpy(out.reshape(values.shape))


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation along the last dimension: ``a``, ``b`` [..., E] -> float64 [...].

    The Pearson correlation of the average ranks; NaN where either side has one value only (no order).
    """
    if a.shape != b.shape:
        raise AnalysisError(f"spearman: shapes differ, {tuple(a.shape)} and {tuple(b.shape)}")
    ra, rb = average_ranks(a), average_ranks(b)
    da, db = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    denominator = (da.square().sum(-1) * db.square().sum(-1)).sqrt()
    return torch.where(denominator > 0, (da * db).sum(-1) / denominator.clamp(min=1e-300), torch.full_like(denominator, float("nan")))


def jaccard(a: torch.Tensor, b: torch.Tensor, *, dims: int = 1) -> torch.Tensor:
    """|a & b| / |a | b| of bool masks over their last ``dims`` dimensions (two empty sets: 1).

    ``a``, ``b`` [..., E] (``dims=1``: per layer) or [..., L, E] (``dims=2``: a side's whole kept set).
    """
    reduce = tuple(range(-dims, 0))
    inter = (a & b).sum(reduce).to(torch.float64)
    union = (a | b).sum(reduce).to(torch.float64)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


# ---- statistics ----------------------------------------------------------------------------------
def restrict_directions(stats: RoutingStats, directions: Sequence[str]) -> RoutingStats:
    """``stats`` with only ``directions`` (all when empty); an unknown direction is an error listing the known ones."""
    if not directions:
        return stats
    unknown = [d for d in directions if d not in stats.counters]
    if unknown:
        known = stats.directions
        raise AnalysisError(
            f"--directions: {', '.join(unknown)} not in the statistics; they have {', '.join(known[:20])}"
            + (f" ... ({len(known)} in all)" if len(known) > 20 else "")
        )
    keep = list(dict.fromkeys(directions))
    return RoutingStats(
        stats.topology,
        {d: stats.counters[d] for d in keep},
        stats.info,
        {d: stats.chunks[d] for d in keep if d in stats.chunks},
        stats.chunk_sentences,
    )


def computable_metrics(stats: RoutingStats, requested: Sequence[str]) -> tuple[list[str], list[str]]:
    """(metrics to compare, notes): ``requested``, or every registered metric the file can score.

    Without ``requested``, each metric is tried on one direction's counters; those that cannot score
    statistics of this kind (expert-output metrics on a routing-only file, data-free metrics) are left
    out with a note saying why.
    """
    if requested:
        return list(dict.fromkeys(requested)), []
    direction = stats.directions[0]
    side = sorted(stats.counters[direction])[0]
    usable, skipped = [], {}
    for name in metric_names():
        try:
            compute_metric(name, stats.counters[direction][side], where=f"{direction}/{side}")
            usable.append(name)
        except MetricError as exc:
            skipped[name] = str(exc)
    notes = []
    outputs = [n for n in skipped if needs_expert_outputs(n)]
    if outputs:
        notes.append(f"skipped {', '.join(outputs)}: the statistics have no expert-output counters (collect with --expert-outputs)")
    notes += [f"skipped {name}: {reason}" for name, reason in skipped.items() if name not in outputs]
    return usable, notes


def _unit_scores(stats: RoutingStats, unit: Unit, metric: str, how: str) -> dict[str, torch.Tensor]:
    """``{side: [L, E]}`` scores of ``metric`` for one entry, aggregated over its directions like ``select``."""
    return {
        side: aggregate_metric(metric, [(f"{d}/{side}", stats.counters[d][side]) for d in dirs], how=how)  # type: ignore[arg-type]
        for side, dirs in unit.sources.items()
        if dirs
    }


# ---- compare-metrics -----------------------------------------------------------------------------
@dataclass
class Agreement:
    """Per entry, side and MoE layer, for each pair of metrics: Spearman correlation and kept-set Jaccard."""

    metrics: list[str]
    rows: list[dict[str, Any]]
    """``{"unit", "side", "layer", "metric_a", "metric_b", "spearman", "jaccard"}`` (``layer``: the model's layer number)."""
    plan: KeepPlan
    notes: list[str] = field(default_factory=list)

    def matrices(self, side: str) -> tuple[np.ndarray, np.ndarray]:
        """[M, M] mean Spearman and mean Jaccard over entries and layers of ``side`` (1 on the diagonal)."""
        m = len(self.metrics)
        rho, jac = np.eye(m), np.eye(m)
        index = {name: i for i, name in enumerate(self.metrics)}
        for a, b in itertools.combinations(self.metrics, 2):
            picked = [r for r in self.rows if r["side"] == side and r["metric_a"] == a and r["metric_b"] == b]
            i, j = index[a], index[b]
            rho[i, j] = rho[j, i] = _nanmean([r["spearman"] for r in picked])
            jac[i, j] = jac[j, i] = _nanmean([r["jaccard"] for r in picked])
        return rho, jac

    @property
    def sides(self) -> list[str]:
        return [s for s in ("enc", "dec") if any(r["side"] == s for r in self.rows)]


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def compare_metrics(stats: RoutingStats, options: SelectOptions, metrics: Sequence[str], *, progress: bool = True) -> Agreement:
    """Agreement of every pair of ``metrics`` on ``stats`` (``options``: entries, counts and aggregation as for ``select``)."""
    if len(metrics) < 2:
        raise AnalysisError(f"compare-metrics needs at least two metrics, got {list(metrics)}")
    stats.validate()
    topology = stats.topology
    plan = plan_keep(topology, options)
    units = plan_units(stats, options)
    rows: list[dict[str, Any]] = []
    for unit in tqdm(units, desc="compare-metrics", unit="entry", disable=not progress or len(units) < 10):
        scores = {m: _unit_scores(stats, unit, m, options.aggregate) for m in metrics}  # {metric: {side: [L, E]}}
        masks = {m: select_masks(scores[m], plan, options, what=f"{unit.key} ({m})") for m in metrics}  # bool [L, E]
        for a, b in itertools.combinations(metrics, 2):
            for side in scores[a]:
                rho = spearman(scores[a][side], scores[b][side])  # [L]
                jac = jaccard(masks[a][side], masks[b][side])  # [L]
                layers = topology.moe_layers(long_side(side))
                for row, layer in enumerate(layers):
                    rows.append(
                        {
                            "unit": unit.key,
                            "side": side,
                            "layer": layer,
                            "metric_a": a,
                            "metric_b": b,
                            "spearman": float(rho[row]),
                            "jaccard": float(jac[row]),
                        }
                    )
    return Agreement(list(metrics), rows, plan)


# ---- stability -----------------------------------------------------------------------------------
@dataclass
class Stability:
    """Kept-set Jaccard against the number of calibration sentences, per entry and side."""

    rows: list[dict[str, Any]]
    """``{"unit", "side", "chunks", "sentences", "sentences_mean", "mean", "p5", "p95"}`` per m = 1 .. N."""
    enough: list[dict[str, Any]]
    """``{"unit", "side", "chunks", "sentences"}``: smallest m (x K) from which the mean stays >= the threshold; None if never."""
    chunk_sentences: int
    threshold: float
    notes: list[str] = field(default_factory=list)


def stability(
    stats: RoutingStats,
    options: SelectOptions,
    *,
    samples: int = 200,
    seed: int = 0,
    threshold: float = 0.9,
    progress: bool = True,
) -> Stability:
    """Bootstrap the chunks of every entry of ``stats`` (see the module docstring)."""
    if samples < 1:
        raise AnalysisError(f"--samples must be at least 1, got {samples}")
    stats.validate()
    if not stats.chunks:
        raise AnalysisError(
            "the statistics have no chunk counters: collect them with `nllb-prune stats ... --chunk-sentences K` "
            "(e.g. K = 50: FLORES dev gives 20 chunks), then run stability on that file"
        )
    notes = []
    unchunked = [d for d in stats.directions if d not in stats.chunks]
    if unchunked:
        notes.append(f"left out {len(unchunked)} direction(s) without chunks: {', '.join(unchunked[:5])}{' ...' if len(unchunked) > 5 else ''}")
        stats = restrict_directions(stats, [d for d in stats.directions if d in stats.chunks])
    plan = plan_keep(stats.topology, options)
    units = plan_units(stats, options)
    k = int(stats.chunk_sentences or 0)
    rows: list[dict[str, Any]] = []
    for unit in tqdm(units, desc="stability", unit="entry", disable=not progress or len(units) < 2):
        rows.extend(_unit_stability(stats, unit, plan, options, samples=samples, seed=seed, chunk_sentences=k))
    return Stability(rows, _enough(rows, threshold=threshold), k, threshold, notes)


def _unit_stability(
    stats: RoutingStats,
    unit: Unit,
    plan: KeepPlan,
    options: SelectOptions,
    *,
    samples: int,
    seed: int,
    chunk_sentences: int,
) -> list[dict[str, Any]]:
    ids, sentences = _shared_chunks(stats, unit)  # [N], [N]
    n = len(ids)
    full = _sample_masks(stats, unit, plan, options, torch.ones(1, n, dtype=torch.float64))  # {side: [1, L, E]}
    generator = torch.Generator().manual_seed(seed)  # every entry draws the same chunk indices
    rows = []
    for m in range(1, n + 1):
        drawn = torch.randint(n, (samples, m), generator=generator)  # [S, m] chunk indices, with replacement
        weights = torch.zeros(samples, n, dtype=torch.float64).scatter_add_(1, drawn, torch.ones(samples, m, dtype=torch.float64))  # [S, N]
        masks = _sample_masks(stats, unit, plan, options, weights)  # {side: [S, L, E]}
        for side, mask in masks.items():
            similarity = jaccard(mask, full[side].expand_as(mask), dims=2).numpy()  # [S]
            rows.append(
                {
                    "unit": unit.key,
                    "side": side,
                    "chunks": m,
                    "sentences": m * chunk_sentences,
                    "sentences_mean": float((weights @ sentences).mean()),
                    "mean": float(similarity.mean()),
                    "p5": float(np.percentile(similarity, 5)),
                    "p95": float(np.percentile(similarity, 95)),
                }
            )
    return rows


def _shared_chunks(stats: RoutingStats, unit: Unit) -> tuple[list[int], torch.Tensor]:
    """The chunk ids every direction of ``unit`` holds (they must agree) and their sentences per chunk (float64 [N])."""
    dirs = sorted({d for dirs in unit.sources.values() for d in dirs})
    first = stats.chunks[dirs[0]]
    for d in dirs[1:]:
        if stats.chunks[d].ids.tolist() != first.ids.tolist():
            raise AnalysisError(
                f"{unit.key}: directions {dirs[0]} and {d} hold different chunks ({first.ids.tolist()[:8]} vs "
                f"{stats.chunks[d].ids.tolist()[:8]}); resampling needs the same sentences in every direction of an entry"
            )
    return first.ids.tolist(), first.sentences.to(torch.float64)


def _sample_masks(stats: RoutingStats, unit: Unit, plan: KeepPlan, options: SelectOptions, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Kept sets ``{side: bool [S, L, E]}`` of the counters ``weights`` [S, N] x chunks, per sample."""
    samples = weights.shape[0]
    scores: dict[str, torch.Tensor] = {}
    for side, dirs in unit.sources.items():
        if not dirs:
            continue
        sides = [(f"{d}/{side} (chunks)", _stacked(weights, stats.chunks[d].counters[side])) for d in dirs]
        try:
            flat = aggregate_metric(options.metric, sides, how=options.aggregate)  # type: ignore[arg-type]  # [S*L, E]
        except MetricError as exc:
            raise AnalysisError(
                f"{exc} (chunks hold the [L] and [L, E] counters, not out_sum, coact or max_abs, so metric {options.metric!r} cannot be resampled)"
                if "needs counter" in str(exc)
                else str(exc)
            ) from None
        scores[side] = flat.reshape(samples, -1, flat.shape[-1])  # [S, L, E]
    if plan.per_layer is not None:  # the default strategy: every sample and layer at once
        out = {}
        for side, k in zip(("enc", "dec"), plan.per_layer):
            if side in scores:
                s, layers, e = scores[side].shape
                out[side] = select_per_layer(scores[side].reshape(s * layers, e), per_layer=k).reshape(s, layers, e)
        return out
    per_sample = [select_masks({side: v[i] for side, v in scores.items()}, plan, options, what=unit.key) for i in range(samples)]
    return {side: torch.stack([m[side] for m in per_sample]) for side in scores}


def _stacked(weights: torch.Tensor, chunk_counters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Counters of S weighted sums of chunks, samples stacked along the layer dimension: [N, L, ...] -> [S*L, ...]."""
    out = {}
    for name, value in chunk_counters.items():
        n, layers, *rest = value.shape
        summed = (weights @ value.reshape(n, -1)).reshape(weights.shape[0], layers, *rest)  # [S, L, ...]
        out[name] = summed.reshape(weights.shape[0] * layers, *rest)
    return out


def _enough(rows: list[dict[str, Any]], *, threshold: float) -> list[dict[str, Any]]:
    """Per entry and side: the smallest m from which the mean Jaccard stays >= ``threshold`` for every larger m."""
    out = []
    keys = list(dict.fromkeys((r["unit"], r["side"]) for r in rows))
    for unit, side in keys:
        curve = sorted((r for r in rows if r["unit"] == unit and r["side"] == side), key=lambda r: r["chunks"])
        reached = None
        for r in reversed(curve):
            if r["mean"] < threshold:
                break
            reached = r
        out.append(
            {
                "unit": unit,
                "side": side,
                "chunks": reached["chunks"] if reached else None,
                "sentences": reached["sentences"] if reached else None,
                "of_chunks": curve[-1]["chunks"],
            }
        )
    return out


def rows_tsv(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    """A header line and one tab-separated line per row (floats with 6 decimals), newline-terminated."""

    def cell(value: Any) -> str:
        return f"{value:.6f}" if isinstance(value, float) else str(value)

    return "\n".join(["\t".join(columns)] + ["\t".join(cell(row[c]) for c in columns) for row in rows]) + "\n"


def print_report(lines: Sequence[str], written: Sequence[Any]) -> int:
    """What an analysis command prints: its summary, then the files it wrote."""
    for line in lines:
        print(line)
    for path in written:
        print(f"wrote {path}")
    return 0
