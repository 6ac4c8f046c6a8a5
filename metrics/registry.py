"""The one registry of expert-importance metrics.

A metric is one pure function from one side's counters (the dict that
:meth:`pruning.stats.counters.RoutingStats.side` returns) to a score per expert, shape [L, E]
(L = MoE layers of that side, E = experts per layer), **higher = keep**. Add one with::

    from metrics import register_metric

    @register_metric("my_metric")
    def my_metric(c):
        \"\"\"One line for ``--help`` and the docs.\"\"\"
        return c["top1"] / c["tokens"][:, None]

:func:`compute_metric` runs a metric with the checks every metric needs (known name, float64
counters, tokens > 0 in every layer, the counters it reads exist, a finite [L, E] result), and puts
the direction and side into the error message.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from pruning.errors import UserError

Counters = Mapping[str, torch.Tensor]
"""One side's counters: ``tokens`` [L] and ``top1``/``top2``/``gate``/``conf1``/``conf2``/``rank`` [L, E]."""

MetricFn = Callable[[Counters], torch.Tensor]


class MetricError(UserError):
    """A metric is unknown or cannot be computed from the given statistics."""


@dataclass(frozen=True)
class Metric:
    """A registered metric: its name, its function and the first line of its docstring."""

    name: str
    fn: MetricFn
    doc: str


_REGISTRY: dict[str, Metric] = {}


def register_metric(name: str) -> Callable[[MetricFn], MetricFn]:
    """Decorator: register ``fn`` as metric ``name`` (a second, different function with the same name is refused)."""

    def decorate(fn: MetricFn) -> MetricFn:
        known = _REGISTRY.get(name)
        if known is not None and known.fn is not fn:
            raise ValueError(f"metric {name!r} is already registered (by {known.fn.__module__}.{known.fn.__qualname__})")
        doc = (inspect.getdoc(fn) or "").strip().splitlines()
        _REGISTRY[name] = Metric(name, fn, doc[0] if doc else "")
        return fn

    return decorate


def metric_names() -> list[str]:
    """Names of the registered metrics, sorted."""
    return sorted(_REGISTRY)


def get_metric(name: str) -> Metric:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MetricError(f"unknown metric {name!r}; known metrics: {', '.join(metric_names())}") from None


def compute_metric(name: str, counters: Counters, *, where: str = "statistics") -> torch.Tensor:
    """Score [L, E] (float64, higher = keep) of metric ``name`` on one side's ``counters``.

    ``where`` names the statistics in error messages (e.g. ``"fra_Latn-eng_Latn/enc"``).
    Raises :class:`MetricError` when a layer has no tokens, a needed counter is missing, or the
    metric returns a wrongly shaped or non-finite result.
    """
    metric = get_metric(name)
    if "tokens" not in counters:
        raise MetricError(f"{where}: no 'tokens' counter; counters present: {sorted(counters)}")
    c = {key: value.to(torch.float64) for key, value in counters.items()}
    tokens = c["tokens"]  # [L]
    empty = [int(i) for i in torch.nonzero(tokens <= 0).flatten()]
    if empty:
        raise MetricError(
            f"{where}: no tokens were routed in MoE layer(s) {empty} (of {tokens.numel()}); metrics are defined over tokens, so this direction cannot be scored"
        )
    try:
        score = metric.fn(c)
    except KeyError as exc:
        raise MetricError(f"{where}: metric {name!r} needs counter {exc.args[0]!r}, which these statistics lack (present: {sorted(counters)})") from None
    n_layers = tokens.shape[0]
    if score.dim() != 2 or score.shape[0] != n_layers:
        raise MetricError(f"metric {name!r} returned shape {tuple(score.shape)}, expected ({n_layers}, experts)")
    if not torch.isfinite(score).all():
        raise MetricError(f"{where}: metric {name!r} gave NaN or infinite scores")
    return score.to(torch.float64)
