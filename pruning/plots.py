"""Pictures of routing statistics and expert indices (PNG, matplotlib's Agg canvas, no pyplot state).

* :func:`plot_usage_heatmap`: one language's expert usage, MoE layers x experts (encoder rows from
  the directions it is the source of, decoder rows from those it is the target of);
* :func:`plot_experts_per_layer`: experts kept per MoE layer by an index (mean over its entries,
  bars from the fewest to the most);
* :func:`plot_language_similarity`: Jaccard similarity of the languages' kept experts of one side,
  rows and columns in average-linkage order (:func:`average_linkage_order`, numpy only).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from pruning.atomic import atomic_path
from pruning.data.directions import SHORT_SIDE, Side, long_side, split_direction
from pruning.errors import UserError
from pruning.index import ExpertIndex, layer_counts
from pruning.stats.counters import RoutingStats
from pruning.topology import Topology

ANY_LANGUAGE = "X"


class PlotError(UserError):
    """A plot cannot be drawn from the given inputs."""


# ---- numbers behind the pictures --------------------------------------------------------------------
def jaccard_matrix(sets: Sequence[set[int] | frozenset[int]]) -> np.ndarray:
    """Jaccard similarity |a & b| / |a | b| of every pair of ``sets``: [n, n] (1 on the diagonal; two empty sets: 1)."""
    universe = sorted(set().union(*sets)) if sets else []
    column = {item: k for k, item in enumerate(universe)}
    member = np.zeros((len(sets), len(universe)))  # [n, items] 0/1
    for row, items in enumerate(sets):
        member[row, [column[i] for i in items]] = 1.0
    inter = member @ member.T  # [n, n]
    sizes = member.sum(1)  # [n]
    union = sizes[:, None] + sizes[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def average_linkage_order(distance: np.ndarray) -> list[int]:
    """Leaf order of an average-linkage (UPGMA) clustering of a symmetric ``distance`` [n, n].

    Repeatedly merges the two closest clusters (ties: the pair with the lowest indices), the distance
    of a merged cluster to another being the size-weighted mean of its parts' distances; a merged
    cluster lists the leaves of its lower-indexed part first. Similar items end up adjacent.
    """
    d = np.array(distance, dtype=np.float64)
    n = d.shape[0] if d.ndim == 2 else -1
    if d.ndim != 2 or d.shape != (n, n) or not np.isfinite(d).all() or not np.allclose(d, d.T):
        raise PlotError(f"average_linkage_order needs a finite symmetric square matrix, got shape {d.shape}")
    if n <= 2:
        return list(range(n))
    np.fill_diagonal(d, np.inf)
    members: list[list[int]] = [[i] for i in range(n)]
    sizes = np.ones(n)
    for _ in range(n - 1):
        flat = int(np.argmin(d))  # row-major: the first minimum has i < j (d is symmetric)
        i, j = divmod(flat, n)
        i, j = min(i, j), max(i, j)
        merged = (sizes[i] * d[i] + sizes[j] * d[j]) / (sizes[i] + sizes[j])  # [n]
        d[i, :] = merged
        d[:, i] = merged
        d[i, i] = np.inf
        d[j, :] = np.inf
        d[:, j] = np.inf
        members[i] = members[i] + members[j]
        members[j] = []
        sizes[i] += sizes[j]
        sizes[j] = 0
    return next(m for m in members if m)


def language_usage(stats: RoutingStats, lang: str, *, metric: str = "topk") -> np.ndarray:
    """Score of ``metric`` per MoE layer and expert for ``lang``: [num_moe_layers, E] (NaN rows: no statistics)."""
    from metrics import aggregate_metric

    topology = stats.topology
    out = np.full((topology.num_moe_layers, topology.num_experts), np.nan)
    found = False
    for side in ("enc", "dec"):
        position = 0 if side == "enc" else 1
        dirs = [d for d in stats.directions if side in stats.counters[d] and split_direction(d)[position] == lang]
        if not dirs:
            continue
        found = True
        rows = topology.side_moe_indices("encoder" if side == "enc" else "decoder")
        score = aggregate_metric(metric, [(f"{d}/{side}", stats.counters[d][side]) for d in dirs])  # [L_side, E]
        out[rows.start : rows.stop] = score.numpy()
    if not found:
        known = sorted({x for d in stats.directions for x in split_direction(d)} - {ANY_LANGUAGE})
        raise PlotError(f"language {lang!r} has no statistics; known languages: {', '.join(known[:20])}{' ...' if len(known) > 20 else ''}")
    return out


# ---- pictures ---------------------------------------------------------------------------------------
def plot_usage_heatmap(stats: RoutingStats, lang: str, path: str | os.PathLike[str], *, metric: str = "topk") -> Path:
    """Heatmap of ``lang``'s expert usage (``metric`` per MoE layer x expert)."""
    from matplotlib.figure import Figure

    topology = stats.topology
    usage = language_usage(stats, lang, metric=metric)  # [num_moe_layers, E]
    fig = Figure(figsize=(12, 0.35 * topology.num_moe_layers + 1.6))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(usage), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(topology.num_moe_layers), _layer_labels(topology))
    ax.set_xlabel("expert")
    ax.set_title(f"{lang}: {metric} per expert (encoder rows: {lang} as source; decoder rows: {lang} as target)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01)
    fig.tight_layout()
    return _save(fig, path)


def plot_experts_per_layer(index: ExpertIndex, topology: Topology, path: str | os.PathLike[str]) -> Path:
    """Bar chart of experts kept per MoE layer: mean over the index entries, bars from the fewest to the most."""
    from matplotlib.figure import Figure

    per_entry = [layer_counts(ids, topology) for ids in index.entries.values()]
    keys = list(per_entry[0])
    means, lows, highs = [], [], []
    for key in keys:
        counts = [c[key] for c in per_entry if any(c[k] for k in c if k[0] == key[0])]  # entries holding that side
        counts = counts or [0]
        means.append(float(np.mean(counts)))
        lows.append(min(counts))
        highs.append(max(counts))
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    colours = ["tab:green" if side == "encoder" else "tab:blue" for side, _ in keys]
    x = np.arange(len(keys))
    err = np.array([np.subtract(means, lows), np.subtract(highs, means)])
    bars = ax.bar(x, means, color=colours, yerr=err if np.any(err) else None, capsize=3)
    ax.bar_label(bars, labels=[f"{m:.0f}" if lo == hi else f"{m:.1f}" for m, lo, hi in zip(means, lows, highs)], fontsize=8)
    ax.set_xticks(x, _layer_labels(topology), rotation=45)
    ax.set_ylabel("experts kept")
    entries = {"all": "one list", "pair": f"{len(per_entry)} directions", "lang": f"{len(per_entry)} languages"}[index.kind]
    ax.set_title(f"Experts kept per MoE layer ({entries}; green: encoder, blue: decoder)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_language_similarity(index: ExpertIndex, topology: Topology, path: str | os.PathLike[str], *, side: Side = "decoder") -> Path:
    """Jaccard similarity of the languages' kept ``side`` experts, in average-linkage order."""
    from matplotlib.figure import Figure

    if index.kind != "lang":
        raise PlotError(f"language similarity needs a per-language index, this one is of kind {index.kind!r}")
    langs, sets = [], []
    for lang in index.keys:
        ids = {i for i in index.entries[lang] if topology.side_of_id(i) == side}
        if ids:
            langs.append(lang)
            sets.append(ids)
    if len(langs) < 2:
        raise PlotError(f"language similarity needs at least 2 languages with {side} experts, the index has {len(langs)}")
    similarity = jaccard_matrix(sets)  # [n, n]
    order = average_linkage_order(1.0 - similarity)
    ordered = similarity[np.ix_(order, order)]
    n = len(langs)
    size = max(6.0, 0.075 * n + 2)
    font = max(2.5, min(9.0, 600 / max(n, 1) / 2.2))
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.subplots()
    image = ax.imshow(ordered, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    names = [langs[i] for i in order]
    ax.set_xticks(range(n), names, rotation=90, fontsize=font)
    ax.set_yticks(range(n), names, fontsize=font)
    ax.set_title(f"Jaccard similarity of kept {side} experts ({n} languages, average-linkage order)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.01)
    fig.tight_layout()
    return _save(fig, path, dpi=200 if n > 60 else 120)


def _layer_labels(topology: Topology) -> list[str]:
    return [f"{SHORT_SIDE[side]} {layer}" for _, side, layer in topology.iter_moe_layers()]


def _save(fig: object, path: str | os.PathLike[str], *, dpi: int = 120) -> Path:
    """Write the figure as PNG atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)  # type: ignore[attr-defined]
    return Path(path)


# ---- metric agreement and stability (nllb-prune compare-metrics, stability) ---------------------------


def plot_metric_agreement(names: Sequence[str], matrices: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike[str], *, title: str) -> Path:
    """Heatmaps of mean Spearman correlation and mean kept-set Jaccard between metrics, one row per side.

    ``matrices``: ``{"enc"|"dec": (spearman [M, M], jaccard [M, M])}``, M = ``len(names)``.
    """
    from matplotlib.figure import Figure

    if not matrices:
        raise PlotError("metric agreement: no side to draw")
    m = len(names)
    size = max(3.5, 0.45 * m + 1.5)
    fig = Figure(figsize=(2 * size + 1.5, size * len(matrices) + 0.6))
    axes = np.atleast_2d(fig.subplots(len(matrices), 2, squeeze=False))
    for row, (side, (rho, jac)) in enumerate(matrices.items()):
        panels = ((rho, "Spearman correlation of scores", "coolwarm", -1.0), (jac, "Jaccard of kept sets", "viridis", 0.0))
        for col, (values, label, cmap, low) in enumerate(panels):
            ax = axes[row, col]
            image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=low, vmax=1.0, interpolation="nearest")
            ax.set_xticks(range(m), names, rotation=60, ha="right", fontsize=8)
            ax.set_yticks(range(m), names, fontsize=8)
            ax.set_title(f"{long_side(side)}: {label}", fontsize=9)
            if m <= 12:
                for i in range(m):
                    for j in range(m):
                        if np.isfinite(values[i, j]):
                            ax.text(
                                j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=6, color="black" if col == 0 or values[i, j] > 0.5 else "white"
                            )
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_stability(
    curves: dict[str, list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]],
    path: str | os.PathLike[str],
    *,
    threshold: float,
    title: str,
    max_lines: int = 10,
) -> Path:
    """Kept-set Jaccard against calibration sentences: per side a panel, per entry a line (mean) and a band (5-95%).

    ``curves``: ``{"enc"|"dec": [(label, sentences [m], mean [m], p5 [m], p95 [m]), ...]}``; at most
    ``max_lines`` entries are drawn per panel (the title says how many there are).
    """
    from matplotlib.figure import Figure

    if not curves:
        raise PlotError("stability: no curve to draw")
    fig = Figure(figsize=(6.0 * len(curves), 4.2))
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (side, lines) in zip(axes, curves.items()):
        for label, x, mean, low, high in lines[:max_lines]:
            (line,) = ax.plot(x, mean, marker="o", markersize=3, label=label)
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15)
        ax.axhline(threshold, color="grey", linestyle="--", linewidth=1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("calibration sentences (chunks x chunk size)")
        ax.set_ylabel("Jaccard with the kept set of all chunks")
        shown = f" (first {max_lines} of {len(lines)})" if len(lines) > max_lines else ""
        ax.set_title(f"{long_side(side)}{shown}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
