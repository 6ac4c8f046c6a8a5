"""Routing statistics built from simulated router outputs, for the metric/selection/plot tests.

The counters are computed the straightforward way, token by token, from softmax gate probabilities,
so they are an independent reference for what the collector writes.
"""

from __future__ import annotations

import torch

from pruning.stats.counters import RoutingStats
from pruning.topology import NLLB_MOE_54B, Topology


def counters_from_gates(gates: torch.Tensor) -> dict[str, torch.Tensor]:
    """One side's counters from gate probabilities ``gates`` [L, T, E] (rows sum to 1), token by token."""
    n_layers, n_tokens, n_experts = gates.shape
    out = {name: torch.zeros(n_layers, n_experts, dtype=torch.float64) for name in ("top1", "top2", "gate", "conf1", "conf2", "rank")}
    out["tokens"] = torch.full((n_layers,), float(n_tokens), dtype=torch.float64)
    for layer in range(n_layers):
        for token in range(n_tokens):
            g = gates[layer, token].to(torch.float64)
            order = sorted(range(n_experts), key=lambda e: (-float(g[e]), e))
            first, second = order[0], order[1]
            out["top1"][layer, first] += 1
            out["top2"][layer, second] += 1
            out["conf1"][layer, first] += g[first]
            out["conf2"][layer, second] += g[second]
            out["gate"][layer] += g
            for position, e in enumerate(order):
                out["rank"][layer, e] += position + 1
    return out


def language_bias(lang: str, n_layers: int, n_experts: int) -> torch.Tensor:
    """A fixed per-language logit bias [L, E] (deterministic from the name)."""
    seed = sum(ord(ch) * (i + 1) for i, ch in enumerate(lang))
    return torch.randn(n_layers, n_experts, generator=torch.Generator().manual_seed(seed)) * 2.0


def simulated_stats(
    directions: list[str],
    *,
    topology: Topology = NLLB_MOE_54B,
    tokens: int = 24,
    seed: int = 0,
) -> RoutingStats:
    """Statistics whose routing depends on the source language (encoder) and the target language (decoder)."""
    gen = torch.Generator().manual_seed(seed)
    stats = RoutingStats(topology, {}, {"made_by": "tests.selection_fixtures"})
    e = topology.num_experts
    for d_index, direction in enumerate(directions):
        src, tgt = direction.split("-")
        for side, lang in (("enc", src), ("dec", tgt)):
            n_layers = stats.num_layers(side)
            n_tok = tokens + d_index  # directions of different sizes
            logits = language_bias(lang + side, n_layers, e)[:, None, :] + torch.randn(n_layers, n_tok, e, generator=gen)
            gates = torch.softmax(logits.to(torch.float64), dim=-1)  # [L, T, E]
            for name, value in counters_from_gates_fast(gates).items():
                stats.add(direction, side, name, value)
    return stats


def counters_from_gates_fast(gates: torch.Tensor) -> dict[str, torch.Tensor]:
    """Vectorised :func:`counters_from_gates` (checked equal to it in test_metrics)."""
    n_layers, n_tokens, n_experts = gates.shape
    # sort by (-gate, id): stable sort on -gate keeps id order for ties
    order = torch.sort(-gates, dim=-1, stable=True).indices  # [L, T, E]
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(1, n_experts + 1).expand_as(order))  # [L, T, E], 1 = best
    first, second = order[..., 0], order[..., 1]  # [L, T]
    one1 = torch.nn.functional.one_hot(first, n_experts).to(torch.float64)  # [L, T, E]
    one2 = torch.nn.functional.one_hot(second, n_experts).to(torch.float64)
    return {
        "tokens": torch.full((n_layers,), float(n_tokens), dtype=torch.float64),
        "top1": one1.sum(1),
        "top2": one2.sum(1),
        "gate": gates.sum(1),
        "conf1": (one1 * gates).sum(1),
        "conf2": (one2 * gates).sum(1),
        "rank": ranks.to(torch.float64).sum(1),
    }
