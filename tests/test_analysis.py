"""Chunked statistics (``stats --chunk-sentences``), metric agreement (``compare-metrics``) and kept-set
stability under resampling (``stability``): against per-token references, hand examples and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pruning.cli import main
from pruning.config import ConfigError
from pruning.model.loading import load_model
from pruning.stats.batches import make_batches
from pruning.stats.collect import collect_statistics
from pruning.stats.counters import Chunks, RoutingStats, StatsError
from pruning.stats.options import StatsOptions
from tests.stats_fixtures import LANGS, assert_counters_close, make_flores, reference_counters

FRA, DEU, ENG = LANGS
PAIRS = [f"{FRA}-{DEU}", f"{DEU}-{ENG}"]
N_SENTENCES = 7


@pytest.fixture(scope="module")
def flores(tmp_path_factory) -> Path:
    return make_flores(tmp_path_factory.mktemp("flores"), n=N_SENTENCES)


def collect(model_dir: Path, data: Path, out: Path, **kw) -> RoutingStats:
    base = dict(model=str(model_dir), data=str(data), out=str(out), progress=False, pairs=PAIRS, batch_tokens=40)
    base.update(kw)
    collect_statistics(StatsOptions(**base))
    return RoutingStats.load(out)


@pytest.fixture(scope="module")
def whole(tiny_hf_dir, flores, tmp_path_factory) -> RoutingStats:
    """Unchunked teacher statistics of the 7 sentences."""
    return collect(tiny_hf_dir, flores, tmp_path_factory.mktemp("whole") / "whole.safetensors")


@pytest.fixture(scope="module")
def chunked(tiny_hf_dir, flores, tmp_path_factory) -> RoutingStats:
    """The same with chunks of 3 sentences (3 does not divide 7: chunks of 3, 3 and 1)."""
    return collect(tiny_hf_dir, flores, tmp_path_factory.mktemp("chunked") / "k3.safetensors", chunk_sentences=3)


def tokenized(model, data: Path, src: str, tgt: str) -> list[tuple[list[int], list[int]]]:
    sources = (data / "dev" / f"{src}.dev").read_text().splitlines()
    targets = (data / "dev" / f"{tgt}.dev").read_text().splitlines()
    tok = model.tokenizer
    tok.src_lang, tok.tgt_lang = src, tgt
    return [(tok(s)["input_ids"], tok(text_target=t)["input_ids"]) for s, t in zip(sources, targets)]


# ---- chunked collection --------------------------------------------------------------------------
def test_batches_never_mix_chunks():
    sources = [[5] * n for n in (3, 9, 4, 9, 2, 2, 2)]
    batches = make_batches(sources, None, batch_tokens=100, pad_id=1, first_line=4, chunk_sentences=3)
    # lines 4..10: chunk 1 = lines 4, 5; chunk 2 = 6, 7, 8; chunk 3 = 9, 10; one batch each (the budget allows it)
    assert [sorted(b.sentences) for b in batches] == [[4, 5], [6, 7, 8], [9, 10]]
    assert [sorted(b.sentences) for b in make_batches(sources, None, batch_tokens=100, pad_id=1)] == [list(range(7))]


def test_chunks_sum_to_the_direction_and_match_the_unchunked_run(chunked, whole):
    assert chunked.chunk_sentences == 3 and sorted(chunked.chunks) == sorted(PAIRS)
    assert chunked.info["chunk_sentences"] == 3
    for direction in PAIRS:
        chunks = chunked.chunks[direction]
        assert chunks.ids.tolist() == [0, 1, 2] and chunks.sentences.tolist() == [3, 3, 1]
        for side in ("enc", "dec"):
            assert set(chunks.counters[side]) == set(whole.side(direction, side))  # every routing counter
            for name, value in chunks.counters[side].items():
                assert value.shape == (3, *chunked.side(direction, side)[name].shape)
                assert torch.equal(value.sum(0), chunked.side(direction, side)[name]), f"{direction}/{side}/{name}"
            # other batches (chunk by chunk) than the unchunked run: counts equal, sums close
            assert_counters_close(chunked.side(direction, side), whole.side(direction, side), what=f"{direction}/{side}")


def test_one_chunk_equals_the_per_token_reference_of_its_sentences(chunked, tiny_hf_dir, flores):
    model = load_model(tiny_hf_dir)
    pairs = tokenized(model, flores, FRA, DEU)
    for chunk, lines in ((1, slice(3, 6)), (2, slice(6, 7))):
        expected = reference_counters(model, pairs[lines], num_experts=model.topology.num_experts)
        for side in ("enc", "dec"):
            got = {name: value[chunk] for name, value in chunked.chunks[f"{FRA}-{DEU}"].counters[side].items()}
            assert_counters_close(got, expected[side], what=f"chunk {chunk}/{side}")


def test_halves_with_first_sentence_merge_into_the_whole(chunked, tiny_hf_dir, flores, tmp_path):
    first = collect(tiny_hf_dir, flores, tmp_path / "a.safetensors", chunk_sentences=3, max_sentences=3)
    collect(tiny_hf_dir, flores, tmp_path / "b.safetensors", chunk_sentences=3, first_sentence=3)
    assert first.info["data"]["first_sentence"] == 0 and first.chunks[PAIRS[0]].ids.tolist() == [0]
    rc = main(["merge-stats", str(tmp_path / "b.safetensors"), str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "m.safetensors")])
    assert rc == 0
    merged = RoutingStats.load(tmp_path / "m.safetensors")
    for direction in PAIRS:
        got, expected = merged.chunks[direction], chunked.chunks[direction]
        assert got.ids.tolist() == [0, 1, 2] and got.sentences.tolist() == [3, 3, 1]  # sorted by id
        for side in ("enc", "dec"):
            for name in expected.counters[side]:
                torch.testing.assert_close(got.counters[side][name], expected.counters[side][name], rtol=1e-12, atol=1e-12)
            assert_counters_close(merged.side(direction, side), chunked.side(direction, side), what=side, rtol=1e-12, atol=1e-12, rank_atol=0)
    # the same sentences twice: kept once (they hold equal counters); an overlapping range: refused
    again = first.merge(first, what="a again")
    assert again.kept_once == sorted(PAIRS) and again.chunks[PAIRS[0]].ids.tolist() == [0]
    assert [key[:3] for key in again.items()] == [key[:3] for key in first.items()]
    assert all(torch.equal(value, first.counters[d][s][n]) for d, s, n, value in again.items())
    with pytest.raises(StatsError, match=r"lines 0\.\.6 there and over lines 0\.\.2 of the same data .* the ranges overlap"):
        first.merge(chunked, what="whole")
    # files that do not say which sentences they counted: the repeated chunk is what refuses them
    anonymous = RoutingStats(first.topology, first.counters, {}, first.chunks, first.chunk_sentences)
    with pytest.raises(StatsError, match=r"chunk\(s\) \[0\] are in both files"):
        anonymous.merge(anonymous, what="a again")


def test_merge_refuses_other_chunk_size_and_mixed_chunking(chunked, whole):
    other = RoutingStats(chunked.topology, {d: chunked.counters[d] for d in PAIRS[:1]}, {})
    chunks = chunked.chunks[PAIRS[0]]
    other.add_chunks(PAIRS[0], Chunks(chunks.ids + 10, chunks.sentences, chunks.counters), chunk_sentences=4)
    with pytest.raises(StatsError, match="chunks of 4 sentences cannot be merged with chunks of 3"):
        chunked.merge(other, what="k4")
    with pytest.raises(StatsError, match=f"direction {min(PAIRS)} has chunk counters in only one of the files"):
        chunked.merge(whole, what="unchunked")


def test_load_refuses_chunks_that_do_not_add_up(chunked, tmp_path):
    broken = RoutingStats(chunked.topology, chunked.counters, {}, dict(chunked.chunks), 3)
    bad = chunked.chunks[PAIRS[0]]
    counters = {side: dict(named) for side, named in bad.counters.items()}
    counters["dec"]["top1"] = counters["dec"]["top1"].clone()
    counters["dec"]["top1"][1, 0, 5] += 1
    broken.chunks[PAIRS[0]] = Chunks(bad.ids, bad.sentences, counters)
    broken.save(tmp_path / "broken.safetensors")
    with pytest.raises(StatsError, match=f"chunks of {PAIRS[0]}: dec/top1 summed over the chunks differs"):
        RoutingStats.load(tmp_path / "broken.safetensors")


def test_chunk_options_are_checked(tiny_hf_dir, flores, tmp_path, chunked):
    with pytest.raises(ConfigError, match="--first-sentence 2 must be a multiple of --chunk-sentences 3"):
        StatsOptions(model="m", data="d", out="o", pairs=PAIRS, chunk_sentences=3, first_sentence=2).validate()
    with pytest.raises(StatsError, match="--first-sentence 9 is past the end of split dev"):
        collect(tiny_hf_dir, flores, tmp_path / "x.safetensors", first_sentence=9)
    out = tmp_path / "r.safetensors"
    chunked.save(out)
    with pytest.raises(StatsError, match=r"chunk_sentences: file 3, this run None"):
        collect(tiny_hf_dir, flores, out, pairs=[f"{ENG}-{FRA}"], resume=True)


# ---- numbers by hand -----------------------------------------------------------------------------
def test_average_ranks_and_spearman_with_ties_by_hand():
    from pruning.analysis import average_ranks, spearman

    a = torch.tensor([[10.0, 20.0, 20.0, 5.0, 30.0]])
    b = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    assert average_ranks(a).tolist() == [[2.0, 3.5, 3.5, 1.0, 5.0]]
    # ranks of a minus their mean 3: [-1, .5, .5, -2, 2]; of b: [-2, -1, 0, 1, 2]
    # sum of products 3.5, sums of squares 9.5 and 10: rho = 3.5 / sqrt(95)
    assert float(spearman(a, b)[0]) == pytest.approx(3.5 / 95**0.5, abs=1e-12)
    assert float(spearman(b, -b)[0]) == pytest.approx(-1.0) and float(spearman(a, 2 * a + 1)[0]) == pytest.approx(1.0)
    assert torch.isnan(spearman(torch.ones(1, 5), b)).all()  # a constant score has no order
    assert average_ranks(torch.tensor([3.0, 3.0, 3.0])).tolist() == [2.0, 2.0, 2.0]


def test_jaccard_by_hand():
    from pruning.analysis import jaccard

    a = torch.tensor([[True, True, False, False], [False, False, False, False]])
    b = torch.tensor([[True, False, True, False], [False, False, False, False]])
    assert jaccard(a, b).tolist() == [pytest.approx(1 / 3), 1.0]  # two empty sets: 1
    assert float(jaccard(a, b, dims=2)) == pytest.approx(1 / 3)
    assert float(jaccard(a, a, dims=2)) == 1.0


# ---- compare-metrics -----------------------------------------------------------------------------
SIM_DIRS = [f"{FRA}-{DEU}", f"{DEU}-{FRA}", f"{FRA}-{ENG}"]


def test_identical_metrics_agree_fully_and_others_less():
    from pruning.analysis import compare_metrics
    from pruning.select import SelectOptions
    from tests.selection_fixtures import simulated_stats

    stats = simulated_stats(SIM_DIRS, tokens=40)
    result = compare_metrics(stats, SelectOptions(ratio=0.75), ["topk", "frequency", "top2"], progress=False)
    layers = {side: len(stats.topology.moe_layers(full)) for side, full in (("enc", "encoder"), ("dec", "decoder"))}
    # 3 languages x 3 pairs x layers of the sides the language has (fra: both; deu: both; eng: decoder only)
    assert len(result.rows) == 3 * (2 * (layers["enc"] + layers["dec"]) + layers["dec"])
    same = [r for r in result.rows if {r["metric_a"], r["metric_b"]} == {"topk", "frequency"}]
    assert same and all(r["spearman"] == pytest.approx(1.0) and r["jaccard"] == 1.0 for r in same)
    other = [r for r in result.rows if {r["metric_a"], r["metric_b"]} == {"topk", "top2"}]
    assert min(r["jaccard"] for r in other) < 1.0
    rho, jac = result.matrices("enc")
    assert rho.shape == (3, 3) and rho[0, 1] == pytest.approx(1.0) and np.allclose(np.diag(jac), 1.0)
    # the Jaccard of one row, recomputed from the selection code's own index
    from pruning.select import select_experts

    row = next(r for r in other if r["unit"] == FRA and r["side"] == "dec")
    kept = {m: set(select_experts(stats, SelectOptions(metric=m, ratio=0.75)).index.entries[FRA]) for m in ("topk", "top2")}
    layer_ids = {
        m: {g for g in ids if stats.topology.expert_ref(g).side == "decoder" and stats.topology.expert_ref(g).layer == row["layer"]} for m, ids in kept.items()
    }
    assert row["jaccard"] == pytest.approx(len(layer_ids["topk"] & layer_ids["top2"]) / len(layer_ids["topk"] | layer_ids["top2"]))


# ---- stability -----------------------------------------------------------------------------------
def chunked_simulated(directions: list[str], *, n_chunks: int, identical: bool, k: int = 10) -> RoutingStats:
    """Simulated statistics whose directions hold ``n_chunks`` chunks (all the same chunk if ``identical``)."""
    from tests.selection_fixtures import simulated_stats

    parts = [simulated_stats(directions, tokens=30, seed=0 if identical else c) for c in range(n_chunks)]
    stats = RoutingStats(parts[0].topology, {}, {})
    for part in parts:
        for d, side, name, value in part.items():
            stats.add(d, side, name, value)
    for d in directions:
        counters = {side: {name: torch.stack([p.counters[d][side][name] for p in parts]) for name in parts[0].counters[d][side]} for side in ("enc", "dec")}
        stats.add_chunks(d, Chunks(torch.arange(n_chunks), torch.full((n_chunks,), k), counters), chunk_sentences=k)
    stats.validate()
    return stats


def test_identical_chunks_give_jaccard_one_for_every_m():
    from pruning.analysis import stability
    from pruning.select import SelectOptions

    result = stability(chunked_simulated(SIM_DIRS, n_chunks=4, identical=True), SelectOptions(), samples=30, progress=False)
    assert len(result.rows) == (2 + 2 + 1) * 4  # fra, deu: enc and dec; eng: dec only; m = 1..4
    assert all(r["mean"] == 1.0 and r["p5"] == 1.0 and r["p95"] == 1.0 for r in result.rows)
    assert [r["sentences"] for r in result.rows if r["unit"] == FRA and r["side"] == "enc"] == [10, 20, 30, 40]
    assert all(e["chunks"] == 1 and e["sentences"] == 10 for e in result.enough)


def test_two_chunks_by_hand():
    """m = 1 draws one chunk: each sample's Jaccard is that of chunk 0's or chunk 1's kept set with the whole one."""
    from metrics import compute_metric
    from pruning.analysis import stability
    from pruning.select import SelectOptions, select_per_layer

    stats = chunked_simulated([f"{FRA}-{DEU}"], n_chunks=2, identical=False)
    result = stability(stats, SelectOptions(granularity="pair"), samples=200, seed=3, progress=False)
    chunks = stats.chunks[f"{FRA}-{DEU}"].counters["dec"]
    per_layer = 12  # the default plan of the real topology: 0.8 pruned at 3:1 keeps 12 per decoder layer

    def kept(counters):
        return {
            (layer, int(e))
            for layer, row in enumerate(select_per_layer(compute_metric("importance", counters), per_layer=per_layer))
            for e in torch.nonzero(row).flatten()
        }

    whole = kept({n: v.sum(0) for n, v in chunks.items()})
    one = [kept({n: v[c] for n, v in chunks.items()}) for c in range(2)]
    expected = sorted(len(s & whole) / len(s | whole) for s in one)
    assert expected[0] < 1.0
    m1 = next(r for r in result.rows if r["side"] == "dec" and r["chunks"] == 1)
    assert expected[0] - 1e-12 <= m1["mean"] <= expected[1] + 1e-12
    assert m1["p5"] == pytest.approx(expected[0]) and m1["p95"] == pytest.approx(expected[1])
    m2 = next(r for r in result.rows if r["side"] == "dec" and r["chunks"] == 2)
    assert m2["p95"] == 1.0  # the samples {0, 1} and {1, 0} are the whole


def test_stability_needs_chunks(whole):
    from pruning.analysis import AnalysisError, stability
    from pruning.select import SelectOptions

    with pytest.raises(AnalysisError, match=r"no chunk counters: collect them with `nllb-prune stats \.\.\. --chunk-sentences K`"):
        stability(whole, SelectOptions(), progress=False)


# ---- the commands end to end -----------------------------------------------------------------------
def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stability_command_on_collected_chunks(chunked, tmp_path, capsys):
    stats_path = chunked.save(tmp_path / "k3.safetensors")
    out = tmp_path / "stab"
    rc = main(["stability", "--stats", str(stats_path), "--out", str(out), "--samples", "25", "--granularity", "pair", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "sentences needed = the smallest m x K (K = 3 sentences per chunk)" in printed
    assert f"{FRA}-{DEU} enc: mean Jaccard" in printed
    rows = (out / "stability.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["unit", "side", "chunks", "sentences", "sentences_mean", "mean", "p5", "p95"]
    assert len(rows) == 1 + 2 * 2 * 3  # 2 directions x 2 sides x m = 1..3
    document = json.loads((out / "stability.json").read_text())
    assert document["statistics"]["chunk_sentences"] == 3 and len(document["enough"]) == 4
    assert all(0 <= r["p5"] <= r["mean"] <= r["p95"] <= 1 for r in document["rows"])
    assert is_png(out / "stability.png")
    rc = main(["stability", "--stats", str(tmp_path / "k3.safetensors"), "--out", str(out), "--metric", "output_variance", "--no-progress"])
    assert rc == 2 and "--expert-outputs" in capsys.readouterr().err


def test_compare_metrics_command(chunked, tmp_path, capsys):
    stats_path = chunked.save(tmp_path / "k3.safetensors")
    out = tmp_path / "cmp"
    rc = main(["compare-metrics", "--stats", str(stats_path), "--out", str(out), "--ratio", "0.75", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "note: skipped ean, man, msan, output_variance, reap: the statistics have no expert-output counters" in printed
    assert "frequency ~ topk" in printed
    document = json.loads((out / "metric-agreement.json").read_text())
    metrics = document["metrics"]
    assert "importance" in metrics and "reap" not in metrics
    pair = next(p for p in document["mean_over_layers"]["dec"] if {p["metric_a"], p["metric_b"]} == {"frequency", "topk"})
    assert pair["spearman"] == pytest.approx(1.0) and pair["jaccard"] == 1.0
    rows = (out / "metric-agreement.tsv").read_text().splitlines()
    n_pairs = len(metrics) * (len(metrics) - 1) // 2
    # languages: fra (enc), deu (enc and dec), eng (dec); 6 MoE layers per side in the real topology
    assert len(rows) == 1 + n_pairs * 4 * 6
    assert is_png(out / "metric-agreement.png")
    rc = main(["compare-metrics", "--stats", str(stats_path), "--out", str(out), "--metrics", "top1,reap", "--no-progress"])
    assert rc == 2 and "--expert-outputs" in capsys.readouterr().err


def test_configs_of_both_commands_resolve(chunked, tmp_path, capsys):
    root = Path(__file__).resolve().parents[1]
    stats_path = chunked.save(tmp_path / "k3.safetensors")
    rc = main(
        [
            "stability",
            "--config",
            str(root / "conf" / "stability.yaml"),
            f"stats={stats_path}",
            f"out={tmp_path / 's'}",
            "samples=5",
            "langs=[deu_Latn]",
            "progress=false",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert len((tmp_path / "s" / "stability.tsv").read_text().splitlines()) == 1 + 2 * 3  # deu: enc and dec, m = 1..3
    rc = main(
        [
            "compare-metrics",
            "--config",
            str(root / "conf" / "compare_metrics.yaml"),
            f"stats={stats_path}",
            f"out={tmp_path / 'c'}",
            "metrics=[top1,importance]",
            "granularity=global",
            "progress=false",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert len((tmp_path / "c" / "metric-agreement.tsv").read_text().splitlines()) == 1 + 2 * 6


def test_resume_adds_chunked_directions(tiny_hf_dir, flores, tmp_path):
    out = tmp_path / "r.safetensors"
    collect(tiny_hf_dir, flores, out, pairs=PAIRS[:1], chunk_sentences=4)
    resumed = collect(tiny_hf_dir, flores, out, pairs=PAIRS, chunk_sentences=4, resume=True)
    assert sorted(resumed.chunks) == sorted(PAIRS) and resumed.chunk_sentences == 4
    assert all(c.ids.tolist() == [0, 1] and c.sentences.tolist() == [4, 3] for c in resumed.chunks.values())
    assert StatsOptions(chunk_sentences=0).chunk_size is None  # 0: off


def test_compare_metrics_refuses_budget_strategy(tmp_path, capsys):
    rc = main(["compare-metrics", "--stats", "s.safetensors", "--out", str(tmp_path), "--strategy", "budget"])
    assert rc == 2 and "use --strategy per-layer or global" in capsys.readouterr().err
