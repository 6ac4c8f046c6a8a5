"""Data-free router-weight metric: read the checkpoint's router rows, no statistics needed.

The router of a MoE layer is a linear map ``logits = W x`` with ``W`` [E, D]; row ``w_e`` is expert e's
routing direction. Two experts whose rows point the same way receive nearly the same tokens, so one
of them is redundant (STUN, arXiv 2409.06211, clusters experts by such router-weight distances):

==================  ==========================================================  ==========================
name                score of expert e in its layer                              reference
==================  ==========================================================  ==========================
router_distinct     min over e' != e of (1 - cos(w_e, w_e'))                    STUN, arXiv 2409.06211
==================  ==========================================================  ==========================

Higher = keep: an expert whose row nearly duplicates another's scores near 0 (both of a close pair
score low, so a selection keeps at least the other experts first); a row orthogonal to every other
scores 1. A zero row has cosine 0 to every row (score 1). Scores lie in [0, 2].

The rows are counter ``router_rows`` [L, E, D] of one side, which statistics files do not hold:
:func:`pruning.checkpoint.reader.read_router_rows` reads them from a checkpoint through the lazy reader (routers only; no expert
weight is loaded) and :func:`router_counters` gives each side's counters for :func:`metrics.compute_metric`.
``nllb-prune select --router-model CKPT`` does both. A pruned export is refused: its routers hold
only the kept experts' rows, so the distances would be over a different set of experts than the
index's ids describe (give the unpruned checkpoint).
"""

from __future__ import annotations

import torch

from metrics.registry import Counters, MetricError, register_metric
from pruning.checkpoint.reader import RouterRows

ROUTER_ROWS = "router_rows"
ROUTER_METRICS = frozenset({"router_distinct"})
"""The metrics that read the checkpoint's router rows (``--router-model``) instead of statistics."""


def needs_router_rows(name: str) -> bool:
    """Whether metric ``name`` scores the checkpoint's router rows (data-free; needs ``--router-model``)."""
    return name in ROUTER_METRICS


def data_free_hint(name: str) -> str:
    return f"{name} is data-free: it scores the checkpoint's router rows, which statistics do not hold; give --router-model CKPT"


@register_metric("router_distinct")
def router_distinct(c: Counters) -> torch.Tensor:
    """STUN (arXiv 2409.06211): 1 - cosine similarity of the expert's router row to the nearest other row of its layer (data-free, --router-model)."""
    if ROUTER_ROWS not in c:
        raise MetricError(data_free_hint("router_distinct"))
    rows = c[ROUTER_ROWS].to(torch.float64)  # [L, E, D]
    if rows.dim() != 3 or rows.shape[1] < 2:
        raise MetricError(f"router_distinct needs router rows [layers, experts >= 2, d_model], got shape {tuple(rows.shape)}")
    unit = rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-300)  # [L, E, D]; a zero row stays zero
    cosine = unit @ unit.transpose(1, 2)  # [L, E, E]
    cosine.diagonal(dim1=1, dim2=2).fill_(-torch.inf)  # an expert is not its own neighbour
    return (1.0 - cosine.amax(dim=-1)).clamp(min=0.0)  # [L, E]; clamp: rounding can give -1e-16


def router_counters(router: RouterRows) -> dict[str, dict[str, torch.Tensor]]:
    """Each side's counters for a router metric: ``router_rows`` [L, E, D] and ``tokens`` = 1 per layer [L].

    ``tokens`` is there only because :func:`metrics.compute_metric` checks every layer has some; a router
    metric does not read it.
    """
    return {side: {ROUTER_ROWS: rows, "tokens": torch.ones(rows.shape[0], dtype=torch.float64)} for side, rows in router.rows.items()}
