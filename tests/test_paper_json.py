"""The paper's gate-statistics JSON: export of our counters, import as normalised counters."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from metrics import compute_metric, metric_names
from metrics.outputs import needs_expert_outputs
from metrics.router import needs_router_rows
from pruning.data.directions import DirectionError
from pruning.select import SelectOptions, select_experts
from pruning.stats.counters import RoutingStats, StatsError
from pruning.stats.paper_json import (
    PAPER_QUANTITIES,
    is_normalised,
    load_statistics,
    read_paper_json,
    stats_to_paper_data,
    write_paper_json,
)
from pruning.topology import NLLB_MOE_54B, Topology
from tests.selection_fixtures import simulated_stats

T = NLLB_MOE_54B
N, E = T.num_total_experts, T.num_experts  # 1,536 experts, 128 per MoE layer
DIRECTIONS = ["fra_Latn-eng_Latn", "eng_Latn-fra_Latn", "deu_Latn-eng_Latn"]


@pytest.fixture(scope="module")
def stats() -> RoutingStats:
    return simulated_stats(DIRECTIONS)


def test_export_follows_the_papers_definitions(stats: RoutingStats) -> None:
    data = stats_to_paper_data(stats)
    assert sorted(data) == sorted(DIRECTIONS)
    entry = data["fra_Latn-eng_Latn"]
    assert sorted(entry) == sorted(PAPER_QUANTITIES)
    assert all(len(entry[q]) == T.num_total_experts for q in PAPER_QUANTITIES)
    c = stats.side("fra_Latn-eng_Latn", "dec")
    # decoder layer 7 is the decoder's 2nd MoE layer; expert 5 of it has global id moe_index * E + 5
    gid, row = T.global_id("decoder", 7, 5), 1
    tokens = float(c["tokens"][row])
    assert entry["top1"][gid] == pytest.approx(float(c["top1"][row, 5]) / tokens)
    assert entry["top2"][gid] == pytest.approx(float(c["top2"][row, 5]) / tokens)
    assert entry["mean"][gid] == pytest.approx(float(c["gate"][row, 5]) / tokens)
    assert entry["rank"][gid] == pytest.approx(float(c["rank"][row, 5]) / tokens)  # raw average rank, 1 = best
    top1 = float(c["top1"][row, 5])
    assert entry["conf1"][gid] == pytest.approx(float(c["conf1"][row, 5]) / top1 if top1 else 0.0)
    enc = stats.side("fra_Latn-eng_Latn", "enc")
    gid_enc = T.global_id("encoder", 3, 7)
    assert entry["top1"][gid_enc] == pytest.approx(float(enc["top1"][0, 7]) / float(enc["tokens"][0]))
    # top1 shares of a layer sum to 1
    assert sum(entry["top1"][:E]) == pytest.approx(1.0)


def test_round_trip_keeps_every_metric(stats: RoutingStats, tmp_path: Path) -> None:
    path = write_paper_json(stats, tmp_path / "stats.json")
    back = load_statistics(path)
    assert is_normalised(back) and not is_normalised(stats)
    assert back.directions == stats.directions
    for direction in DIRECTIONS:
        for side in ("enc", "dec"):
            for name in [m for m in metric_names() if not needs_expert_outputs(m) and not needs_router_rows(m)]:  # routing-only statistics
                torch.testing.assert_close(
                    compute_metric(name, back.side(direction, side)), compute_metric(name, stats.side(direction, side)), msg=f"{direction}/{side}/{name}"
                )


def test_per_language_aggregates_use_literal_X(stats: RoutingStats) -> None:
    data = stats_to_paper_data(stats, directions=False, languages=True)
    assert sorted(data) == ["X-eng_Latn", "X-fra_Latn", "deu_Latn-X", "eng_Latn-X", "fra_Latn-X"]
    # X-eng_Latn sums the counters of fra->eng and deu->eng (by tokens)
    parts = [stats.side(d, "dec") for d in ("fra_Latn-eng_Latn", "deu_Latn-eng_Latn")]
    gid = T.global_id("decoder", 3, 0)
    expected = sum(float(p["top1"][0, 0]) for p in parts) / sum(float(p["tokens"][0]) for p in parts)
    assert data["X-eng_Latn"]["top1"][gid] == pytest.approx(expected)


def test_selection_from_aggregate_keys_takes_encoder_from_src_X_and_decoder_from_X_tgt(tmp_path: Path) -> None:
    """Per language: encoder experts from 'lang-X', decoder experts from 'X-lang', never from the other half."""
    n = T.num_total_experts
    e = T.num_experts
    half = n // 2

    def entry(best: int) -> dict[str, list[float]]:
        # one expert per layer takes most tokens as 1st choice; every layer's shares sum to 1
        top1 = [0.0] * n
        for layer in range(T.num_moe_layers):
            for k in range(e):
                top1[layer * e + k] = 0.5 / (e - 1)
            top1[layer * e + best] = 0.5
        return {"top1": top1, "top2": top1, "conf1": [0.5] * n, "conf2": [0.2] * n, "mean": [1 / e] * n, "rank": [e / 2] * n}

    data = {"aaa_Latn-X": entry(best=10), "X-aaa_Latn": entry(best=20)}
    path = tmp_path / "stats-1.json"
    path.write_text(json.dumps(data))
    stats = read_paper_json(path)
    selection = select_experts(stats, SelectOptions(keep=2 * T.num_moe_layers * 4, enc_dec="1:1", min_per_layer=4))
    ids = selection.index.entries["aaa_Latn"]
    enc = {T.expert_ref(i).expert for i in ids if i < half}
    dec = {T.expert_ref(i).expert for i in ids if i >= half}
    # 8 per layer: the best expert, then ties broken by lower id
    assert enc == {10, 0, 1, 2, 3, 4, 5, 6}
    assert dec == {20, 0, 1, 2, 3, 4, 5, 6}


def _valid_entry() -> dict[str, list[float]]:
    n, e = T.num_total_experts, T.num_experts
    return {"top1": [1 / e] * n, "top2": [1 / e] * n, "conf1": [0.3] * n, "conf2": [0.1] * n, "mean": [1 / e] * n, "rank": [(e + 1) / 2] * n}


def _with(**changes: object) -> dict[str, object]:
    entry: dict[str, object] = dict(_valid_entry())
    entry.update(changes)
    return {"fra_Latn-eng_Latn": entry}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_with(top1=[0.01] * (N - 2 * E)), rf"top1 has {N - 2 * E} values, expected {N} .*another topology"),
        (_with(conf1=[float("nan")] + [0.3] * (N - 1)), "conf1 contains NaN"),
        (_with(mean=[-0.1] + [0.01] * (N - 1)), "mean contains negative values"),
        (_with(top1=[1.0] * N), rf"top1 sums to {E} in a layer, expected 1 \(shares, not counts\)"),
        (_with(top1=[0.0] * E + [1 / E] * (N - E)), r"top1 is zero for every expert of MoE layer\(s\) \[0\]"),
        (_with(rank=[E + 50.0] * N), f"rank has values above {E}"),
        ({"fra_Latn-eng_Latn": {"top1": [0.0] * N}}, r"lacks \['top2', 'conf1', 'conf2', 'mean', 'rank'\]"),
        ({"fra_Latn_eng_Latn": _valid_entry()}, "key: 'fra_Latn_eng_Latn' is not a direction 'src-tgt'"),
        ([1, 2, 3], "expected a non-empty object"),
    ],
)
def test_bad_paper_json_is_a_clear_error(tmp_path: Path, data: object, message: str) -> None:
    path = tmp_path / "stats-bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises((StatsError, DirectionError), match=message):
        read_paper_json(path)


def test_all_zero_half_is_read_as_absent_and_written_as_zeros(tmp_path: Path) -> None:
    entry = _valid_entry()
    half = T.num_total_experts // 2
    for q in PAPER_QUANTITIES:
        entry[q] = [0.0] * half + entry[q][half:]
    path = tmp_path / "stats-dec-only.json"
    path.write_text(json.dumps({"X-eng_Latn": entry}))
    stats = read_paper_json(path)
    assert sorted(stats.counters["X-eng_Latn"]) == ["dec"]
    out = stats_to_paper_data(stats)
    assert out["X-eng_Latn"]["top1"][:half] == [0] * half
    assert out["X-eng_Latn"]["top1"][half:] == pytest.approx(entry["top1"][half:])


def test_not_json_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(StatsError, match="does not exist"):
        load_statistics(tmp_path / "nope.json")
    bad = tmp_path / "x.json"
    bad.write_text("{")
    with pytest.raises(StatsError, match="not valid JSON"):
        read_paper_json(bad)


def test_another_topology_reads_its_own_length(tmp_path: Path) -> None:
    tiny = Topology(encoder_layers=2, decoder_layers=2, encoder_sparse_step=2, decoder_sparse_step=2, num_experts=4, d_model=8, ffn_dim=16, vocab_size=10)
    stats = simulated_stats(["aaa_Latn-bbb_Latn"], topology=tiny)
    path = write_paper_json(stats, tmp_path / "tiny.json")
    assert len(json.loads(path.read_text())["aaa_Latn-bbb_Latn"]["top1"]) == 8
    assert read_paper_json(path, topology=tiny).directions == ["aaa_Latn-bbb_Latn"]
    with pytest.raises(StatsError, match=f"expected {N}"):
        read_paper_json(path)
    assert math.isclose(sum(json.loads(path.read_text())["aaa_Latn-bbb_Latn"]["top1"][:4]), 1.0)
