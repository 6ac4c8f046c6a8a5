"""The built-in metrics (the pruning paper's, plus top-k activity and router-weighted load).

Definitions over the non-padding tokens of the statistics, per expert of a MoE layer
(T = ``tokens`` [L], every other counter [L, E]); every score is oriented so that higher = keep:

=============  ===========================================  ===================================
name           score                                        meaning
=============  ===========================================  ===================================
top1           top1 / T                                     share of tokens whose 1st choice it is ("activity")
top2           top2 / T                                     share of tokens whose 2nd choice it is
topk           (top1 + top2) / T                            share routed to it at all (top-k activity, k = 2)
mean           gate / T                                     average gate probability
rank           (E + 1) - rank / T                           average rank flipped: the paper's rank is 1 (best) .. E
                                                            (worst); this is E for an expert always ranked 1st
                                                            and 1 for one always ranked last
conf1          conf1 / top1 (0 if never 1st)                average gate probability when it is 1st
conf2          conf2 / top2 (0 if never 2nd)                average gate probability when it is 2nd
importance     top1/T * exp(conf1/top1)                     the paper's importance = top1 * exp(conf1)
load           (conf1 + conf2) / T                          router-weighted load: gate mass it receives as
                                                            one of the token's two experts, per token
=============  ===========================================  ===================================
"""

from __future__ import annotations

import torch

from metrics.registry import Counters, register_metric


def _per_token(c: Counters, name: str) -> torch.Tensor:
    return c[name] / c["tokens"][:, None]  # [L, E] / [L, 1]


def mean_where_counted(c: Counters, total: str, count: str) -> torch.Tensor:
    """``c[total] / c[count]`` where ``c[count] > 0``, else 0."""
    n = c[count]
    return torch.where(n > 0, c[total] / n.clamp(min=1e-300), torch.zeros_like(n))


@register_metric("top1")
def top1(c: Counters) -> torch.Tensor:
    """Share of tokens whose 1st choice is the expert (the paper's top-1 activity)."""
    return _per_token(c, "top1")


@register_metric("top2")
def top2(c: Counters) -> torch.Tensor:
    """Share of tokens whose 2nd choice is the expert (the paper's top2)."""
    return _per_token(c, "top2")


@register_metric("topk")
def topk(c: Counters) -> torch.Tensor:
    """Share of tokens routed to the expert as 1st or 2nd choice (top-k activity, k = 2)."""
    return (c["top1"] + c["top2"]) / c["tokens"][:, None]


@register_metric("mean")
def mean(c: Counters) -> torch.Tensor:
    """Average gate probability of the expert over all tokens."""
    return _per_token(c, "gate")


@register_metric("rank")
def rank(c: Counters) -> torch.Tensor:
    """E + 1 - average rank: the paper's rank (1 = best) flipped so that higher = keep."""
    num_experts = c["rank"].shape[1]
    return (num_experts + 1) - _per_token(c, "rank")


@register_metric("conf1")
def conf1(c: Counters) -> torch.Tensor:
    """Average gate probability over the tokens where the expert is 1st (0 if never)."""
    return mean_where_counted(c, "conf1", "top1")


@register_metric("conf2")
def conf2(c: Counters) -> torch.Tensor:
    """Average gate probability over the tokens where the expert is 2nd (0 if never)."""
    return mean_where_counted(c, "conf2", "top2")


@register_metric("importance")
def importance(c: Counters) -> torch.Tensor:
    """top1 * exp(conf1): the pruning paper's importance."""
    return top1(c) * torch.exp(conf1(c))


@register_metric("load")
def load(c: Counters) -> torch.Tensor:
    """Router-weighted load: gate probability the expert receives as 1st or 2nd choice, per token."""
    return (c["conf1"] + c["conf2"]) / c["tokens"][:, None]
