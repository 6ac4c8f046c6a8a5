"""Expert-output metrics, from the counters that ``nllb-prune stats ... --expert-outputs`` collects.

Over the tokens dispatched to the expert (n = ``routed`` [L, E]; ``y`` = the expert's raw output for a
token, before the combine weight and expert-output masking; docs/statistics.md), higher = keep:

================  ==========================================  =========================================
name              score                                       reference
================  ==========================================  =========================================
frequency         (top1 + top2) / tokens                      share of tokens routed to the expert
ean               out_norm / n = mean ||y||                   expert activation norm
reap              gate_norm / n = mean gate prob x ||y||      REAP, arXiv 2510.13999
man               out_norm / n = mean ||y||                   MAN, arXiv 2606.15716
msan              out_norm_sq / n = mean ||y||^2              MSAN, arXiv 2606.15716
output_variance   mean ||y||^2 - ||mean y||^2                 MoNE, arXiv 2507.00390
================  ==========================================  =========================================

An expert never routed to scores 0. A data-free router-weight criterion needs the checkpoint, not
statistics, and is not here.
"""

from __future__ import annotations

import torch

from metrics.builtin import mean_where_counted, topk
from metrics.registry import Counters, MetricError, register_metric

OUTPUT_METRICS = frozenset({"ean", "reap", "man", "msan", "output_variance"})
"""The metrics that need the ``--expert-outputs`` counters (routing-only statistics cannot score them)."""


def needs_expert_outputs(name: str) -> bool:
    """Whether metric ``name`` reads counters that only ``--expert-outputs`` collects."""
    return name in OUTPUT_METRICS


_HOW = "collect them with `nllb-prune stats ... --expert-outputs` (key expert_outputs=true in conf/collect_stats.yaml)"


def _need(c: Counters, *names: str) -> None:
    missing = [name for name in names if name not in c]
    if missing:
        raise MetricError(
            f"these statistics have no expert-output counters ({', '.join(missing)} missing): they were collected without --expert-outputs; {_HOW}"
        )


def _per_routed(c: Counters, name: str) -> torch.Tensor:
    """``c[name] / routed`` per expert [L, E], 0 where the expert got no token."""
    _need(c, "routed", name)
    return mean_where_counted(c, name, "routed")


@register_metric("frequency")
def frequency(c: Counters) -> torch.Tensor:
    """Share of tokens routed to the expert, 1st or 2nd choice: the same number as ``topk`` under the name peers use."""
    return topk(c)


@register_metric("ean")
def ean(c: Counters) -> torch.Tensor:
    """Expert activation norm: mean L2 norm of the expert's output over its routed tokens (needs --expert-outputs)."""
    return _per_routed(c, "out_norm")


@register_metric("reap")
def reap(c: Counters) -> torch.Tensor:
    """REAP (arXiv 2510.13999): mean over routed tokens of gate probability x output norm (needs --expert-outputs)."""
    return _per_routed(c, "gate_norm")


@register_metric("man")
def man(c: Counters) -> torch.Tensor:
    """MAN (arXiv 2606.15716): mean activation norm over routed tokens, the same number as ``ean`` (needs --expert-outputs)."""
    return ean(c)


@register_metric("msan")
def msan(c: Counters) -> torch.Tensor:
    """MSAN (arXiv 2606.15716): mean squared norm of the expert's output over its routed tokens (needs --expert-outputs)."""
    return _per_routed(c, "out_norm_sq")


@register_metric("output_variance")
def output_variance(c: Counters) -> torch.Tensor:
    """Output variance (MoNE, arXiv 2507.00390): mean ||y||^2 - ||mean y||^2 over routed tokens (needs --expert-outputs)."""
    _need(c, "routed", "out_norm_sq", "out_sum")
    n = c["routed"]  # [L, E]
    safe = n.clamp(min=1e-300)[..., None]  # [L, E, 1]
    mean_sq = (c["out_sum"] / safe).pow(2).sum(-1)  # [L, E]
    variance = (_per_routed(c, "out_norm_sq") - mean_sq).clamp(min=0.0)  # rounding can dip below 0
    return torch.where(n > 0, variance, torch.zeros_like(n))
