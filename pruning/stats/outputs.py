"""Expert-output counters (``nllb-prune stats --expert-outputs``): what each expert computes, not only where tokens go.

Dimension legend: T tokens of one layer call, K = 2 choices, N dispatched assignments of the call,
R router rows of the layer (its kept experts), E experts of the unpruned layer, D d_model.

The counters need each expert's output per assignment, which the layer never keeps (the dispatch sums
them). :func:`tap_dispatch` wraps a layer's dispatch, whose result is returned as is (the layer output
is bit-identical). The model's dispatches (``loop``, ``grouped``, expert-parallel) take an ``observe``
callback and hand it the raw outputs they compute anyway: no second expert pass. Any other dispatch is
followed by a second pass of the dispatched assignments through their experts
(:meth:`StackedExperts.expert_forward`).

Every counter is over the dispatched (non-padding, within capacity) assignments; the output ``y`` is
the expert's raw output for that token, BEFORE the combine weight and BEFORE expert-output-masking
scaling (``1 - eom``). Counters are indexed by the original expert id.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from pruning.model.moe import TOP_K, Dispatch, Observer, Routing, StackedExperts

OUTPUT_COUNTERS = ("routed", "out_norm", "out_norm_sq", "gate_norm", "weight_norm", "max_abs")
"""Per-expert [E] counters of one layer call (stacked as [C, E]); ``out_sum`` [E, D] and ``coact`` [E, E] apart."""
EXTRA_COUNTERS = ("out_sum", "coact")
GATE_RATIO_HIST = "gate_ratio_hist"
"""Per layer [B]: real tokens by bin of p2 / p1 (2nd over 1st choice's softmax probability), B = :data:`GATE_RATIO_BINS`."""
GATE_RATIO_BINS = 20
ALL_OUTPUT_COUNTERS = OUTPUT_COUNTERS + EXTRA_COUNTERS + (GATE_RATIO_HIST,)

OutputsCallback = Observer
"""``(routing, expert [N] local row, token [N], k [N] choice, y [N, D])`` of one layer call."""


def gate_ratio_histogram(routing: Routing, *, bins: int = GATE_RATIO_BINS) -> torch.Tensor:
    """[bins] float64: real tokens by ``p2 / p1`` in ``[0, 1]``, bin ``b`` = ``[b/bins, (b+1)/bins)`` (1.0 in the last).

    p1, p2 are the softmax probabilities of the 1st and 2nd choice before capacity (a layer with one
    active expert has no 2nd choice: its tokens are not counted). A histogram near 1 means the router
    hesitates between two experts; near 0, the 2nd expert adds little.
    """
    real = routing.token_mask
    if routing.probs.shape[1] < 2:
        return torch.zeros(bins, dtype=torch.float64, device=routing.probs.device)
    p = routing.probs.gather(1, routing.expert_idx)[real].to(torch.float64)  # [Tr, K]
    ratio = p[:, 1] / p[:, 0].clamp(min=1e-300)  # [Tr]
    index = (ratio * bins).floor().clamp(0, bins - 1).long()
    return torch.bincount(index, minlength=bins).to(torch.float64)


def dispatched_assignments(routing: Routing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(expert [N] local row, token [N], k [N] choice 0/1)`` of the dispatched assignments, sorted by expert."""
    num_tokens = routing.expert_idx.shape[0]
    device = routing.expert_idx.device
    flat_expert = routing.expert_idx.reshape(-1)  # [T*K]
    flat_token = torch.arange(num_tokens, device=device).repeat_interleave(TOP_K)  # [T*K]
    flat_k = torch.arange(TOP_K, device=device).repeat(num_tokens)  # [T*K]
    keep = routing.dispatched.reshape(-1)
    flat_expert, flat_token, flat_k = flat_expert[keep], flat_token[keep], flat_k[keep]
    order = torch.argsort(flat_expert, stable=True)
    return flat_expert[order], flat_token[order], flat_k[order]


def assignment_outputs(x: torch.Tensor, expert: torch.Tensor, token: torch.Tensor, experts: StackedExperts) -> torch.Tensor:
    """[N, D]: expert ``expert[i]``'s output for token ``token[i]`` (``expert`` sorted), one call per expert."""
    y = x.new_zeros(expert.shape[0], x.shape[1])  # [N, D]
    counts = torch.bincount(expert, minlength=experts.num_experts).tolist()
    start = 0
    for e, n in enumerate(counts):
        if n:
            y[start : start + n] = experts.expert_forward(e, x[token[start : start + n]])
            start += n
    return y


def tap_dispatch(dispatch: Dispatch, callback: OutputsCallback, *, enabled: Callable[[], bool]) -> Dispatch:
    """``dispatch`` unchanged, plus (while ``enabled()``) the per-assignment expert outputs to ``callback``.

    A dispatch that takes ``observe`` (the model's own, the expert-parallel one) hands over the outputs it
    computes anyway; any other is followed by a second pass of the dispatched assignments through their experts.
    """
    if "observe" in inspect.signature(dispatch).parameters:

        def observed(x: torch.Tensor, routing: Routing, experts: StackedExperts) -> torch.Tensor:
            if not enabled():
                return dispatch(x, routing, experts)
            with torch.no_grad():
                return dispatch(x, routing, experts, observe=callback)

        observed.wrapped = dispatch  # type: ignore[attr-defined]
        return observed

    def tapped(x: torch.Tensor, routing: Routing, experts: StackedExperts) -> torch.Tensor:
        out = dispatch(x, routing, experts)  # [T, D], returned untouched
        if enabled():
            with torch.no_grad():
                expert, token, k = dispatched_assignments(routing)
                callback(routing, expert, token, k, assignment_outputs(x, expert, token, experts))
        return out

    tapped.wrapped = dispatch  # type: ignore[attr-defined]
    return tapped


def output_counters(
    routing: Routing, expert: torch.Tensor, token: torch.Tensor, k: torch.Tensor, y: torch.Tensor, *, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Counters of one layer call by original expert id: ``([C, E] float64, out_sum [E, D], coact [E, E])``.

    C follows :data:`OUTPUT_COUNTERS`: routed (assignments), sums of ||y||, ||y||^2, gate prob x ||y||,
    combine weight x ||y||, and the max |y| element. ``coact[a, b]`` counts tokens dispatched to both
    a and b (a != b; symmetric, zero diagonal).
    """
    device = y.device
    ids = routing.expert_ids.to(device)[expert]  # [N] original ids
    y64 = y.to(torch.float64)  # [N, D]
    norm = y64.norm(dim=-1)  # [N]
    prob = routing.probs[token, expert].to(torch.float64)  # [N]
    weight = routing.weights[token, k].to(torch.float64)  # [N]
    zeros = torch.zeros(num_experts, dtype=torch.float64, device=device)
    rows = [
        zeros.index_add(0, ids, torch.ones_like(norm)),
        zeros.index_add(0, ids, norm),
        zeros.index_add(0, ids, norm * norm),
        zeros.index_add(0, ids, prob * norm),
        zeros.index_add(0, ids, weight * norm),
        zeros.scatter_reduce(0, ids, y64.abs().amax(dim=-1), reduce="amax", include_self=True),
    ]
    out_sum = torch.zeros(num_experts, y.shape[1], dtype=torch.float64, device=device).index_add(0, ids, y64)  # [E, D]
    both = routing.dispatched.all(dim=1)  # [T]: tokens dispatched to two experts
    pair = routing.expert_ids.to(device)[routing.expert_idx[both]]  # [Tb, 2] original ids
    coact = torch.zeros(num_experts * num_experts, dtype=torch.float64, device=device)
    ones = torch.ones(pair.shape[0], dtype=torch.float64, device=device)
    coact.index_add_(0, pair[:, 0] * num_experts + pair[:, 1], ones)
    coact.index_add_(0, pair[:, 1] * num_experts + pair[:, 0], ones)
    return torch.stack(rows), out_sum, coact.reshape(num_experts, num_experts)
