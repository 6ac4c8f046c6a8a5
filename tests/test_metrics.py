"""Expert-importance metrics against hand-computed values, their registry and aggregation."""

from __future__ import annotations

import math

import pytest
import torch

import metrics
from metrics import MetricError, aggregate_metric, compute_metric, metric_names, register_metric
from metrics.registry import _REGISTRY
from tests.selection_fixtures import counters_from_gates, counters_from_gates_fast

# One MoE layer, E = 4 experts, 4 tokens. Ties: token 1 (experts 2 and 3 at 0.1), token 2 (1 and 2 at 0.2),
# token 3 (0, 2, 3 at 0.1), token 4 (all equal): lower id ranks first, as torch.argmax picks the first.
GATES = torch.tensor(
    [
        [0.5, 0.3, 0.1, 0.1],
        [0.6, 0.2, 0.2, 0.0],
        [0.1, 0.7, 0.1, 0.1],
        [0.25, 0.25, 0.25, 0.25],
    ],
    dtype=torch.float64,
)[None]  # [L=1, T=4, E=4]

# Counters worked out by hand from GATES.
HAND_COUNTERS = {
    "tokens": [4.0],
    "top1": [[3, 1, 0, 0]],  # expert 0 first for tokens 1, 2, 4; expert 1 for token 3
    "top2": [[1, 3, 0, 0]],
    "gate": [[1.45, 1.45, 0.65, 0.45]],
    "conf1": [[1.35, 0.7, 0, 0]],  # 0.5 + 0.6 + 0.25; 0.7
    "conf2": [[0.1, 0.75, 0, 0]],  # 0.1; 0.3 + 0.2 + 0.25
    "rank": [[5, 7, 12, 16]],  # 1+1+2+1; 2+2+1+2; 3*4; 4*4
}

# Metric values worked out by hand from HAND_COUNTERS (experts 2 and 3 are never 1st or 2nd).
EXPECTED = {
    "top1": [0.75, 0.25, 0, 0],
    "top2": [0.25, 0.75, 0, 0],
    "topk": [1.0, 1.0, 0, 0],
    "mean": [0.3625, 0.3625, 0.1625, 0.1125],
    "rank": [5 - 1.25, 5 - 1.75, 5 - 3.0, 5 - 4.0],  # E + 1 - average rank: higher = keep
    "conf1": [0.45, 0.7, 0, 0],
    "conf2": [0.1, 0.25, 0, 0],
    "importance": [0.75 * math.exp(0.45), 0.25 * math.exp(0.7), 0, 0],
    "load": [(1.35 + 0.1) / 4, (0.7 + 0.75) / 4, 0, 0],
}


def hand_counters() -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in HAND_COUNTERS.items()}


def test_reference_counters_match_hand_computation() -> None:
    for counters in (counters_from_gates(GATES), counters_from_gates_fast(GATES)):
        for name, value in hand_counters().items():
            torch.testing.assert_close(counters[name], value, msg=name)


def test_fast_counters_match_token_by_token_loop() -> None:
    gates = torch.softmax(torch.randn(3, 17, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64), -1)
    gates[:, 0] = 1 / 9  # a token where every expert ties
    slow, fast = counters_from_gates(gates), counters_from_gates_fast(gates)
    for name in slow:
        torch.testing.assert_close(fast[name], slow[name], msg=name)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_metric_matches_hand_computed_values(name: str) -> None:
    score = compute_metric(name, hand_counters())
    assert score.shape == (1, 4) and score.dtype == torch.float64
    torch.testing.assert_close(score, torch.tensor([EXPECTED[name]], dtype=torch.float64), atol=1e-12, rtol=0)


def test_every_registered_metric_is_covered_by_the_table() -> None:
    assert set(metric_names()) >= set(EXPECTED)
    assert set(EXPECTED) >= {"top1", "top2", "topk", "mean", "rank", "conf1", "conf2", "importance"}


def test_rank_is_oriented_so_that_higher_means_keep() -> None:
    score = compute_metric("rank", hand_counters())[0]
    # expert 0 has the best (lowest) average rank, expert 3 the worst
    assert score.argmax() == 0 and score.argmin() == 3


def test_zero_tokens_is_a_clear_error_naming_the_statistics() -> None:
    counters = hand_counters()
    counters["tokens"] = torch.tensor([0.0])
    with pytest.raises(MetricError, match=r"fra_Latn-eng_Latn/enc: no tokens were routed in MoE layer\(s\) \[0\]"):
        compute_metric("importance", counters, where="fra_Latn-eng_Latn/enc")


def test_missing_counter_and_unknown_metric_are_clear_errors() -> None:
    counters = hand_counters()
    del counters["conf1"]
    with pytest.raises(MetricError, match="needs counter 'conf1'"):
        compute_metric("importance", counters)
    with pytest.raises(MetricError, match="unknown metric 'importnce'; known metrics: conf1, conf2, .*importance"):
        compute_metric("importnce", hand_counters())
    assert issubclass(MetricError, metrics.MetricError) and issubclass(MetricError, ValueError)


def test_register_a_metric_in_one_function() -> None:
    @register_metric("test_top1_squared")
    def top1_squared(c):  # type: ignore[no-untyped-def]
        """Square of the top-1 share (test only)."""
        return (c["top1"] / c["tokens"][:, None]) ** 2

    try:
        assert "test_top1_squared" in metric_names()
        assert metrics.get_metric("test_top1_squared").doc == "Square of the top-1 share (test only)."
        torch.testing.assert_close(compute_metric("test_top1_squared", hand_counters()), torch.tensor([[0.5625, 0.0625, 0, 0]], dtype=torch.float64))
        with pytest.raises(ValueError, match="already registered"):
            register_metric("test_top1_squared")(lambda c: c["top1"])
    finally:
        _REGISTRY.pop("test_top1_squared", None)


def test_metric_returning_a_bad_shape_or_nan_is_refused() -> None:
    register_metric("test_bad_shape")(lambda c: c["top1"][0])
    register_metric("test_nan")(lambda c: c["top1"] * float("nan"))
    try:
        with pytest.raises(MetricError, match="returned shape"):
            compute_metric("test_bad_shape", hand_counters())
        with pytest.raises(MetricError, match="NaN"):
            compute_metric("test_nan", hand_counters())
    finally:
        _REGISTRY.pop("test_bad_shape", None)
        _REGISTRY.pop("test_nan", None)


def _direction(top1: list[float], conf1: list[float], tokens: float) -> dict[str, torch.Tensor]:
    zeros = torch.zeros(1, len(top1), dtype=torch.float64)
    return {
        "tokens": torch.tensor([tokens], dtype=torch.float64),
        "top1": torch.tensor([top1], dtype=torch.float64),
        "conf1": torch.tensor([conf1], dtype=torch.float64),
        "top2": zeros,
        "gate": zeros,
        "conf2": zeros,
        "rank": zeros,
    }


def test_aggregate_by_tokens_sums_counters_and_mean_averages_scores() -> None:
    a = _direction([9, 1], [4.5, 0.2], tokens=10)  # top1 shares 0.9 / 0.1, conf1 0.5 / 0.2
    b = _direction([0, 2], [0, 1.6], tokens=2)  # shares 0 / 1, conf1 0 / 0.8
    by_tokens = aggregate_metric("importance", [("a", a), ("b", b)], how="tokens")
    # summed: tokens 12, top1 [9, 3], conf1 [4.5, 1.8] -> shares [0.75, 0.25], conf1 [0.5, 0.6]
    expected_tokens = torch.tensor([[0.75 * math.exp(0.5), 0.25 * math.exp(0.6)]], dtype=torch.float64)
    torch.testing.assert_close(by_tokens, expected_tokens)
    by_mean = aggregate_metric("importance", [("a", a), ("b", b)], how="mean")
    expected_mean = torch.tensor([[(0.9 * math.exp(0.5) + 0) / 2, (0.1 * math.exp(0.2) + 1.0 * math.exp(0.8)) / 2]], dtype=torch.float64)
    torch.testing.assert_close(by_mean, expected_mean)
    # one direction: both aggregations are the metric itself
    for how in ("tokens", "mean"):
        torch.testing.assert_close(aggregate_metric("top1", [("a", a)], how=how), torch.tensor([[0.9, 0.1]], dtype=torch.float64))


def test_mean_aggregation_names_a_direction_without_tokens() -> None:
    a = _direction([1, 1], [0.5, 0.5], tokens=2)
    empty = _direction([0, 0], [0, 0], tokens=0)
    with pytest.raises(MetricError, match="eng_Latn-zul_Latn/dec: no tokens"):
        aggregate_metric("top1", [("fra_Latn-zul_Latn/dec", a), ("eng_Latn-zul_Latn/dec", empty)], how="mean")
    # by tokens the empty direction simply adds nothing
    torch.testing.assert_close(aggregate_metric("top1", [("a", a), ("b", empty)], how="tokens"), torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    with pytest.raises(MetricError, match="--aggregate must be one of tokens, mean"):
        aggregate_metric("top1", [("a", a)], how="median")  # type: ignore[arg-type]


def test_sum_counters_takes_the_maximum_of_max_counters():
    from metrics.aggregate import sum_counters

    a = {"top1": torch.tensor([[1.0, 2.0]]), "max_abs": torch.tensor([[3.0, 1.0]])}
    b = {"top1": torch.tensor([[4.0, 0.0]]), "max_abs": torch.tensor([[2.0, 5.0]])}
    out = sum_counters([a, b])
    assert out["top1"].tolist() == [[5.0, 2.0]]
    assert out["max_abs"].tolist() == [[3.0, 5.0]]
