"""Scores over several directions: aggregate by tokens (sum counters, then score) or by mean.

* ``tokens`` (the default): add the counters of every direction, then compute the metric once, so a
  direction weighs as much as it has tokens. This is what statistics collected over many sources
  at once give (the paper's 202-language statistics ``X-tgt`` / ``src-X`` were gathered that way).
* ``mean``: compute the metric on each direction, then take the unweighted mean (the paper's
  companion code averages per-direction values this way when it combines several directions).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from metrics.registry import Counters, MetricError, compute_metric
from pruning.stats.counters import MAX_COUNTERS

Aggregation = Literal["tokens", "mean"]
AGGREGATIONS: tuple[Aggregation, ...] = ("tokens", "mean")


def sum_counters(sides: Sequence[Counters]) -> dict[str, torch.Tensor]:
    """Combine the counters present in every one of ``sides``: sums, except maxima (``MAX_COUNTERS``)."""
    common = set(sides[0])
    for side in sides[1:]:
        common &= set(side)
    out = {}
    for name in sorted(common):
        stacked = torch.stack([s[name].to(torch.float64) for s in sides])
        out[name] = stacked.amax(0) if name in MAX_COUNTERS else stacked.sum(0)
    return out


def aggregate_metric(
    name: str,
    sides: Sequence[tuple[str, Counters]],
    *,
    how: Aggregation = "tokens",
) -> torch.Tensor:
    """Score [L, E] of metric ``name`` over ``sides`` = ``[(label, counters), ...]`` (label for errors)."""
    if not sides:
        raise MetricError(f"no statistics to compute metric {name!r} from")
    if how == "tokens":
        if len(sides) == 1:
            label, counters = sides[0]
            return compute_metric(name, counters, where=label)
        labels = [label for label, _ in sides]
        where = f"{len(sides)} directions summed ({', '.join(labels[:3])}{' ...' if len(labels) > 3 else ''})"
        return compute_metric(name, sum_counters([c for _, c in sides]), where=where)
    if how == "mean":
        scores = [compute_metric(name, counters, where=label) for label, counters in sides]  # each [L, E]
        return torch.stack(scores).mean(0)
    raise MetricError(f"--aggregate must be one of {', '.join(AGGREGATIONS)}, got {how!r}")
