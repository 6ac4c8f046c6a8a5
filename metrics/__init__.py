"""Expert-importance metrics: pure functions from routing counters to one score per expert.

Public API: :func:`register_metric`, :func:`compute_metric`, :func:`aggregate_metric`,
:func:`metric_names`, :func:`get_metric`, :class:`MetricError`. The built-in metrics
(:mod:`metrics.builtin`) are registered on import. Every score is [L, E], higher = keep.
"""

from metrics import builtin as _builtin  # noqa: F401  (registers the built-in metrics)
from metrics import outputs as _outputs  # noqa: F401  (registers the expert-output metrics)
from metrics import router as _router  # noqa: F401  (registers the data-free router-weight metric)
from metrics.aggregate import AGGREGATIONS, Aggregation, aggregate_metric, sum_counters
from metrics.registry import Counters, Metric, MetricError, compute_metric, get_metric, metric_names, register_metric

__all__ = [
    "AGGREGATIONS",
    "Aggregation",
    "Counters",
    "Metric",
    "MetricError",
    "aggregate_metric",
    "compute_metric",
    "get_metric",
    "metric_names",
    "register_metric",
    "sum_counters",
]
