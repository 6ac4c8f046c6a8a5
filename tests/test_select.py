"""Expert selection: strategies on known answers, the paper's global threshold, budgets, granularity, the CLI."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from pruning.cli import main
from pruning.errors import UserError
from pruning.index import ExpertIndex, layer_counts, read_index, validate_index
from pruning.select import (
    SelectionError,
    SelectOptions,
    budget_experts,
    keep_order,
    plan_keep,
    select_experts,
    select_global_threshold,
    select_per_layer,
)
from pruning.stats.counters import RoutingStats, StatsError
from pruning.stats.paper_json import write_paper_json
from pruning.topology import NLLB_MOE_54B, Topology, TopologyError
from tests.selection_fixtures import simulated_stats

T = NLLB_MOE_54B
LANGS = ["fra_Latn", "eng_Latn", "deu_Latn"]
DIRECTIONS = [f"{a}-{b}" for a in LANGS for b in LANGS if a != b]
ENC_LAYERS = [("encoder", layer) for layer in T.moe_layers("encoder")]
DEC_LAYERS = [("decoder", layer) for layer in T.moe_layers("decoder")]


@pytest.fixture(scope="module")
def stats() -> RoutingStats:
    return simulated_stats(DIRECTIONS, tokens=40)


# ---- an independent global threshold, written from the paper's description ---------------------------
def reference_threshold(scores: list[list[float]], keep: int, min_per_layer: int = 4) -> set[tuple[int, int]]:
    """Normalise each layer to sum 1; keep the best ``min_per_layer`` of each; raise t by 0.001 until the
    experts whose cumulative normalised score (best first, mandatory ones left out) is below t reach
    ``keep`` with the mandatory ones; fill layers in order when the last step overshoots."""
    n_layers, n_experts = len(scores), len(scores[0])
    norm = [[v / sum(row) for v in row] for row in scores]
    orders = [sorted(range(n_experts), key=lambda e: (-norm[layer][e], e)) for layer in range(n_layers)]
    chosen = {(layer, e) for layer in range(n_layers) for e in orders[layer][:min_per_layer]}
    cumulative: list[list[tuple[int, float]]] = []
    for layer in range(n_layers):
        total, row = 0.0, []
        for e in orders[layer][min_per_layer:]:
            total += norm[layer][e]
            row.append((e, total))
        cumulative.append(row)
    t = 0.0
    for k in range(1, 1001):
        t = k / 1000
        if len(chosen) + sum(1 for row in cumulative for _, c in row if c < t) >= keep:
            break
    for layer in range(n_layers):
        for e, c in cumulative[layer]:
            if len(chosen) >= keep:
                break
            if c < t:
                chosen.add((layer, e))
    return chosen


def as_set(mask: torch.Tensor) -> set[tuple[int, int]]:
    return {(int(layer), int(e)) for layer, e in torch.nonzero(mask)}


@pytest.mark.parametrize("seed", range(6))
def test_global_threshold_matches_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    n_layers, n_experts = rng.choice([(2, 8), (6, T.num_experts), (T.num_moe_layers, T.num_experts), (3, 17)])
    # skewed scores, some exact zeros, some ties
    scores = [[(rng.random() ** 4) * (rng.random() > 0.2) + (0.01 if e % 7 == 0 else 0.0) for e in range(n_experts)] for _ in range(n_layers)]
    keep = rng.randint(4 * n_layers, n_layers * n_experts)
    mask = select_global_threshold(torch.tensor(scores, dtype=torch.float64), keep=keep)
    assert int(mask.sum()) == keep
    assert as_set(mask) == reference_threshold(scores, keep)


def test_global_threshold_known_answers() -> None:
    scores = torch.tensor([[6.0, 3, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    # normalised: [.6 .3 .1 0 0 0] and 1/6 each; mandatory: expert 0 of each layer; cumulative of the rest:
    # layer 0: .3 .4 .4 .4 .4; layer 1: 1/6 2/6 3/6 4/6 5/6
    assert as_set(select_global_threshold(scores, keep=4, min_per_layer=1)) == {(0, 0), (0, 1), (1, 0), (1, 1)}  # t = .301
    assert as_set(select_global_threshold(scores, keep=5, min_per_layer=1)) == {(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)}  # t = .334
    # overshoot: both layers gain a candidate at the same step, one slot left: the earlier layer gets it
    even = torch.tensor([[2.0, 1, 1], [2.0, 1, 1]])
    assert as_set(select_global_threshold(even, keep=3, min_per_layer=1)) == {(0, 0), (0, 1), (1, 0)}
    # layer 1 has all its mass in expert 7: after the 4 mandatory experts its cumulative stays ~1e-9, below the
    # first threshold, so its candidates come first (layer 0's first candidate needs t > 0.125)
    lopsided = torch.tensor([[100.0] * 8, [1e-9] * 7 + [1.0]])
    mask = select_global_threshold(lopsided, keep=10, min_per_layer=4)
    assert mask.sum(1).tolist() == [4, 6]
    assert mask[0, :4].all() and mask[1, 7] and mask[1, :5].all()  # the best expert, then ties by lower id


def test_global_threshold_refuses_bad_scores() -> None:
    with pytest.raises(SelectionError, match="needs them >= 0; layer 1"):
        select_global_threshold(torch.tensor([[1.0] * 8, [1.0] * 7 + [-1.0]]), keep=8)
    with pytest.raises(SelectionError, match="every expert of layer 0 scores 0"):
        select_global_threshold(torch.zeros(2, 8), keep=8)
    with pytest.raises(SelectionError, match=r"keeps between 8 \(4 per layer\) and 16 experts of 2 layers, asked for 7"):
        select_global_threshold(torch.ones(2, 8), keep=7)
    with pytest.raises(SelectionError, match="NaN"):
        select_global_threshold(torch.tensor([[float("nan")] * 8] * 2), keep=8)


def test_per_layer_known_answer_and_ties() -> None:
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.0, 0.9], [1.0, 1.0, 1.0, 1.0, 1.0]])
    mask = select_per_layer(scores, per_layer=2)
    assert as_set(mask) == {(0, 4), (0, 1), (1, 0), (1, 1)}  # 0.5 vs 0.5: expert 1 before 2
    assert keep_order(scores)[0].tolist() == [4, 1, 2, 0, 3]
    assert as_set(select_per_layer(scores, per_layer=[3, 1])) == {(0, 4), (0, 1), (0, 2), (1, 0)}
    assert not select_per_layer(-scores, per_layer=1)[0, 4]  # negative scores are fine for per-layer


def test_ties_are_deterministic_and_favour_lower_ids() -> None:
    equal = torch.ones(T.num_moe_layers, T.num_experts, dtype=torch.float64)
    for _ in range(2):
        assert as_set(select_per_layer(equal, per_layer=5)) == {(layer, e) for layer in range(T.num_moe_layers) for e in range(5)}
    first = as_set(select_global_threshold(equal, keep=100))
    assert first == as_set(select_global_threshold(equal.clone(), keep=100))
    assert all(e < 20 for _, e in first)


# ---- counts ---------------------------------------------------------------------------------------------
def test_paper_counts_at_80_percent_3_to_1() -> None:
    for options in (SelectOptions(), SelectOptions(ratio=0.8), SelectOptions(keep=288), SelectOptions(keep=288, enc_keep=216)):
        plan = plan_keep(T, options)
        assert (plan.total, plan.encoder, plan.decoder, plan.per_layer) == (288, 216, 72, (36, 12))
    assert "307.2" in plan_keep(T, SelectOptions()).notes[0]  # the rounding is reported
    plan = plan_keep(T, SelectOptions(keep=384, enc_dec="1:1"))  # the companion README's 75% at 1:1
    assert plan.per_layer == (32, 32)
    plan = plan_keep(T, SelectOptions(keep=300, enc_dec="none"))  # same count everywhere: 12 layers x 25
    assert plan.per_layer == (25, 25) and plan.total == 300
    plan = plan_keep(T, SelectOptions(strategy="global", ratio=0.8))  # floor(307.2) split 3:1, decoder gets the rest
    assert (plan.total, plan.encoder, plan.decoder) == (307, 230, 77)
    plan = plan_keep(T, SelectOptions(strategy="global", keep=288, enc_keep=200))
    assert (plan.encoder, plan.decoder) == (200, 88)
    plan = plan_keep(T, SelectOptions(strategy="global", keep=288, enc_dec="none"))
    assert (plan.total, plan.encoder, plan.per_layer) == (288, None, None)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (SelectOptions(ratio=0.99), r"^`--ratio` must leave at least 4 experts per layer, but 0.99 leaves 1 in encoder layer 3$"),
        (SelectOptions(ratio=0.95), r"`--ratio` must leave at least 4 experts per layer, but 0.95 leaves 3 in decoder layer 3"),
        (SelectOptions(keep=40, enc_dec="none"), r"`--keep` must leave at least 4 experts per layer, but 40 leaves 3 in encoder layer 3"),
        (SelectOptions(strategy="global", keep=40), r"`--keep` must leave at least 4 experts per layer, but 40 leaves 10 for the 6 decoder MoE layers"),
        (SelectOptions(keep=288, enc_keep=200), r"--enc-keep 200 must be a multiple of 6"),
        (SelectOptions(keep=2000), r"asks for 2000 experts, but the model has 1536"),
    ],
)
def test_counts_that_leave_too_few_experts(options: SelectOptions, message: str) -> None:
    with pytest.raises(SelectionError, match=message):
        plan_keep(T, options)


def test_keep_50_at_same_count_is_fine_but_48_is_not() -> None:
    assert plan_keep(T, SelectOptions(keep=48, enc_dec="none")).per_layer == (4, 4)
    with pytest.raises(SelectionError, match="but 47 leaves 3 in encoder layer 3"):
        plan_keep(T, SelectOptions(keep=47, enc_dec="none"))


def test_budget_arithmetic_against_the_real_topology() -> None:
    expert = 2 * 8192 * 2048 + 8192 + 2048  # fc1 + bias + fc2 + bias
    assert T.expert_params == expert and round(expert / 1e6, 2) == 33.56
    dense = T.dense_params()
    assert 2.93e9 < dense < 2.96e9

    def bf16_bytes(kept: int) -> int:  # router rows of pruned experts dropped
        return 2 * (dense - (T.num_total_experts - kept) * T.d_model + kept * expert)

    assert 25.1e9 < bf16_bytes(288) < 25.3e9  # the paper's 288 experts: ~25 GB at bf16
    n = budget_experts(T, budget_gb=24)
    assert bf16_bytes(n) <= 24e9 < bf16_bytes(n + 1)
    assert n == 269
    assert budget_experts(T, budget_gb=1000) == T.num_total_experts
    assert budget_experts(T, budget_gb=24, dtype="fp32") == max(k for k in range(1537) if 2 * bf16_bytes(k) <= 24e9)
    with pytest.raises(SelectionError, match="without any expert already needs 5.8"):
        budget_experts(T, budget_gb=5)


def test_budget_strategy_keeps_the_most_that_fit(stats: RoutingStats) -> None:
    selection = select_experts(stats, SelectOptions(strategy="budget", budget_gb=24, granularity="pair"))
    assert (selection.plan.total, selection.plan.encoder, selection.plan.decoder) == (269, 201, 68)
    for ids in selection.index.entries.values():
        assert len(ids) == 269
        assert 2 * T.pruned_params(len(ids)) <= 24e9
        assert min(layer_counts(ids, T).values()) >= 4
    assert any("23.9 GB" in line for line in selection.summary())


# ---- granularity, with an independent computation of the scores -----------------------------------------
def independent_importance(stats: RoutingStats, directions: list[str], side: str) -> torch.Tensor:
    """top1 share * exp(conf1 / top1) over the summed counters of ``directions``, written out here."""
    top1 = sum(stats.counters[d][side]["top1"] for d in directions)
    conf1 = sum(stats.counters[d][side]["conf1"] for d in directions)
    tokens = sum(stats.counters[d][side]["tokens"] for d in directions)
    share = top1 / tokens[:, None]
    conf = torch.where(top1 > 0, conf1 / top1.clamp(min=1), torch.zeros_like(top1))
    return share * torch.exp(conf)


def top_ids(scores: torch.Tensor, side: str, k: int) -> set[int]:
    out = set()
    for row, layer in enumerate(T.moe_layers(side)):  # type: ignore[arg-type]
        ranked = sorted(range(scores.shape[1]), key=lambda e: (-float(scores[row, e]), e))
        out.update(T.global_id(side, layer, e) for e in ranked[:k])  # type: ignore[arg-type]
    return out


def test_per_language_takes_encoder_from_source_and_decoder_from_target_statistics(stats: RoutingStats) -> None:
    selection = select_experts(stats, SelectOptions())
    assert selection.index.kind == "lang" and selection.index.keys == sorted(LANGS)
    for lang in LANGS:
        as_source = [d for d in DIRECTIONS if d.startswith(lang + "-")]
        as_target = [d for d in DIRECTIONS if d.endswith("-" + lang)]
        expected = top_ids(independent_importance(stats, as_source, "enc"), "encoder", 36) | top_ids(
            independent_importance(stats, as_target, "dec"), "decoder", 12
        )
        assert set(selection.index.entries[lang]) == expected, lang
        counts = layer_counts(selection.index.entries[lang], T)
        assert [counts[k] for k in ENC_LAYERS] == [36] * 6 and [counts[k] for k in DEC_LAYERS] == [12] * 6


def test_per_pair_and_global_granularity(stats: RoutingStats) -> None:
    pair = select_experts(stats, SelectOptions(granularity="pair", pairs=["fra_Latn-eng_Latn"]))
    d = ["fra_Latn-eng_Latn"]
    assert set(pair.index.entries["fra_Latn-eng_Latn"]) == top_ids(independent_importance(stats, d, "enc"), "encoder", 36) | top_ids(
        independent_importance(stats, d, "dec"), "decoder", 12
    )
    everything = select_experts(stats, SelectOptions(granularity="global"))
    assert everything.index.kind == "all"
    assert set(everything.index.entries["*"]) == top_ids(independent_importance(stats, DIRECTIONS, "enc"), "encoder", 36) | top_ids(
        independent_importance(stats, DIRECTIONS, "dec"), "decoder", 12
    )


def test_global_threshold_with_an_encoder_budget_thresholds_each_side_separately(stats: RoutingStats) -> None:
    selection = select_experts(stats, SelectOptions(strategy="global", granularity="global"))
    ids = selection.index.entries["*"]
    enc_scores = independent_importance(stats, DIRECTIONS, "enc")
    dec_scores = independent_importance(stats, DIRECTIONS, "dec")
    enc_expected = reference_threshold(enc_scores.tolist(), 230)
    dec_expected = reference_threshold(dec_scores.tolist(), 77)
    as_pairs = {(T.global_id("encoder", T.moe_layers("encoder")[r], e)) for r, e in enc_expected}
    as_pairs |= {(T.global_id("decoder", T.moe_layers("decoder")[r], e)) for r, e in dec_expected}
    assert set(ids) == as_pairs
    # without a split: one threshold over all 12 layers
    joint = select_experts(stats, SelectOptions(strategy="global", granularity="global", enc_dec="none"))
    both = torch.cat([enc_scores, dec_scores]).tolist()
    expected = {r * T.num_experts + e for r, e in reference_threshold(both, 307)}
    assert set(joint.index.entries["*"]) == expected


def test_aggregations_differ_when_directions_differ_in_size() -> None:
    small = simulated_stats(["fra_Latn-eng_Latn"], tokens=5, seed=1)
    big = simulated_stats(["deu_Latn-eng_Latn"], tokens=200, seed=2)
    stats = small.merge(big)
    by_tokens = select_experts(stats, SelectOptions(granularity="lang", langs=["eng_Latn"], metric="top1"))
    by_mean = select_experts(stats, SelectOptions(granularity="lang", langs=["eng_Latn"], metric="top1", aggregate="mean"))
    # eng_Latn only appears as a target: a decoder-only entry
    assert all(T.side_of_id(i) == "decoder" for i in by_tokens.index.entries["eng_Latn"])
    assert by_tokens.index.entries != by_mean.index.entries
    dirs = ["fra_Latn-eng_Latn", "deu_Latn-eng_Latn"]
    mean_scores = sum(stats.counters[d]["dec"]["top1"] / stats.counters[d]["dec"]["tokens"][:, None] for d in dirs) / 2
    assert set(by_mean.index.entries["eng_Latn"]) == top_ids(mean_scores, "decoder", 12)


def test_selection_is_deterministic(stats: RoutingStats) -> None:
    a = select_experts(stats, SelectOptions(strategy="global", granularity="pair"))
    b = select_experts(stats, SelectOptions(strategy="global", granularity="pair"))
    assert a.index == b.index


# ---- bad input ----------------------------------------------------------------------------------------
def test_unknown_language_and_direction(stats: RoutingStats) -> None:
    with pytest.raises(SelectionError, match=r"language\(s\) xxx_Latn have no statistics; the statistics have languages: deu_Latn, eng_Latn, fra_Latn"):
        select_experts(stats, SelectOptions(langs=["fra_Latn", "xxx_Latn"]))
    with pytest.raises(SelectionError, match="direction 'fra_Latn-xxx_Latn' is not in the statistics; the statistics have directions: deu_Latn-eng_Latn"):
        select_experts(stats, SelectOptions(granularity="pair", pairs=["fra_Latn-xxx_Latn"]))


def test_statistics_of_another_topology(stats: RoutingStats, tmp_path: Path) -> None:
    tiny = Topology(encoder_layers=4, decoder_layers=4, encoder_sparse_step=2, decoder_sparse_step=2, num_experts=8, d_model=16, ffn_dim=32, vocab_size=100)
    small = simulated_stats(["aaa_Latn-bbb_Latn"], topology=tiny)
    with pytest.raises(TopologyError, match="another model topology"):
        select_experts(small, SelectOptions(keep=16, enc_dec="1:1"), expect_topology=T)
    # counters shaped for the tiny model in a file that claims the real topology
    mislabelled = RoutingStats(T, small.counters)
    with pytest.raises(StatsError, match=r"has shape \(2, 8\), expected first dimension 6"):
        select_experts(mislabelled, SelectOptions())


@pytest.mark.parametrize("bad", [float("nan"), -1.0])
def test_nan_or_negative_counters(stats: RoutingStats, tmp_path: Path, bad: float) -> None:
    broken = simulated_stats(["fra_Latn-eng_Latn"])
    broken.counters["fra_Latn-eng_Latn"]["enc"]["top1"][2, 5] = bad
    path = tmp_path / "broken.safetensors"
    broken.save(path)
    with pytest.raises(StatsError, match="fra_Latn-eng_Latn/enc/top1 contains (NaN|negative values)"):
        select_experts(broken, SelectOptions())
    assert main(["select", "--stats", str(path), "--out", str(tmp_path / "e.json")]) == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(ratio=0.5, keep=100), "give one of --ratio, --keep, --budget-gb, not --ratio and --keep"),
        (dict(strategy="budget"), "--strategy budget needs --budget-gb"),
        (dict(strategy="global", enc_dec="none"), "needs an encoder:decoder split"),
        (dict(ratio=1.0), r"must be in \[0, 1\)"),
        (dict(enc_dec="3-1"), "--enc-dec must look like 3:1"),
        (dict(metric="importnce"), "unknown metric 'importnce'"),
        (dict(granularity="pair", langs=["fra_Latn"]), "--langs is for --granularity lang"),
        (dict(dtype="int3"), "unknown dtype 'int3'"),
    ],
)
def test_bad_options(stats: RoutingStats, options: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        select_experts(stats, SelectOptions(**options))


def test_pair_granularity_on_per_language_aggregates_is_refused(stats: RoutingStats, tmp_path: Path) -> None:
    path = write_paper_json(stats, tmp_path / "agg.json", directions=False, languages=True)
    from pruning.stats.paper_json import load_statistics

    with pytest.raises(SelectionError, match="use --granularity lang"):
        select_experts(load_statistics(path), SelectOptions(granularity="pair"))


# ---- CLI ------------------------------------------------------------------------------------------------
def test_cli_select_end_to_end(stats: RoutingStats, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = stats.save(tmp_path / "stats.safetensors")
    out = tmp_path / "out" / "experts.json"
    assert main(["select", "--stats", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "288 of 1536 experts (216 encoder + 72 decoder), 12.61B params, 25.2 GB" in printed
    assert "enc3:36" in printed and "dec23:12" in printed
    index = read_index(out)
    validate_index(index, T)
    assert index.keys == sorted(LANGS) and index == select_experts(stats, SelectOptions()).index
    assert json.loads(out.read_text())["fra_Latn"] == list(index.entries["fra_Latn"])

    # hydra-style config + overrides + flags, the paper's JSON as input
    paper = write_paper_json(stats, tmp_path / "stats.json")
    conf = Path(__file__).resolve().parents[1] / "conf" / "select.yaml"
    out2 = tmp_path / "pairs.json"
    argv = ["select", "--config", str(conf), f"stats={paper}", f"out={out2}", "granularity=pair", "keep=300", "--strategy", "global"]
    assert main(argv) == 0
    pairs = read_index(out2)
    assert pairs.kind == "pair" and len(pairs.keys) == len(DIRECTIONS)
    assert all(len(ids) == 300 for ids in pairs.entries.values())

    assert main(["select", "--stats", str(path), "--out", str(out), "--ratio", "0.99"]) == 2
    assert "`--ratio` must leave at least 4 experts per layer, but 0.99 leaves 1 in encoder layer 3" in capsys.readouterr().err
    assert main(["select", "--stats", str(path), "--out", str(out), "--langs", "fra_Latn,zzz_Latn"]) == 2
    assert "zzz_Latn have no statistics" in capsys.readouterr().err
    assert main(["select", "--out", str(out)]) == 2
    assert "--stats" in capsys.readouterr().err


def test_expert_index_of_a_selection_is_sorted_and_unique(stats: RoutingStats) -> None:
    index: ExpertIndex = select_experts(stats, SelectOptions(strategy="global")).index
    for ids in index.entries.values():
        assert list(ids) == sorted(set(ids))
    assert math.isclose(sum(len(v) for v in index.entries.values()) / len(index.entries), 307)
