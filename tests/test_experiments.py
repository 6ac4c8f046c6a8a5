"""The embedded default end to end (`make demo`), and the study helpers on constructed data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experiments.paper.study import random_index, sample_directions
from experiments.testbed.routing_report import jaccard_of_top_sets, specificity
from pruning.index import ExpertIndex, layer_counts
from pruning.topology import Topology

TESTBED = Path(__file__).resolve().parents[1] / "experiments" / "testbed"
TESTBED_MODEL = TESTBED / "model128" if (TESTBED / "model128" / "config.json").is_file() else TESTBED / "model"


@pytest.mark.slow
@pytest.mark.skipif(not (TESTBED_MODEL / "config.json").is_file(), reason="the trained testbed is not in the checkout")
def test_demo_runs_end_to_end_on_the_testbed(tmp_path, monkeypatch):
    from experiments import demo

    monkeypatch.chdir(TESTBED_MODEL.parents[2])
    recorded = Path("experiments/results/demo.json")
    before = recorded.read_bytes() if recorded.is_file() else None
    assert demo.main(["--out", str(tmp_path / "demo"), "--model", str(TESTBED_MODEL), "--directions", "3", "--sentences", "8", "--stats-sentences", "10"]) == 0
    assert (recorded.read_bytes() if recorded.is_file() else None) == before, "a plain demo changes no tracked file"
    result = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert result["directions"] == 3
    assert result["mean_chrf++"]["full"] > 50  # the testbed translates
    assert (tmp_path / "demo" / "pruned" / "pruning_manifest.json").is_file()
    assert json.loads((tmp_path / "demo" / "pruned-skip" / "pruning_manifest.json").read_text())["policy"]["name"] == "skip"
    assert set(result["mean_chrf++"]) == {"full", "pruned", "pruned-skip", "no-experts"}
    assert result["mean_chrf++"]["no-experts"] < result["mean_chrf++"]["full"]
    assert len(list((tmp_path / "demo" / "plots").glob("*.png"))) >= 3


def test_random_index_keeps_per_layer_counts():
    topology = Topology(encoder_layers=4, decoder_layers=4, encoder_sparse_step=2, decoder_sparse_step=2, num_experts=16, d_model=8, ffn_dim=16, vocab_size=10)
    selected = ExpertIndex.from_entries("lang", {"aaa_Latn": [0, 1, 2, 16, 17, 40, 50, 51], "bbb_Latn": [3, 20, 21, 33, 60]})
    drawn = random_index(selected, topology, seed=1)
    for key, ids in selected.entries.items():
        assert layer_counts(drawn[key], topology) == layer_counts(ids, topology)
    assert drawn != {k: list(v) for k, v in selected.entries.items()}
    assert random_index(selected, topology, seed=1) == drawn  # seeded


def test_sample_directions_is_seeded_and_distinct():
    langs = ["a", "b", "c", "d"]
    picked = sample_directions(langs, 5, seed=0)
    assert len(set(picked)) == 5 and all(s != t for s, t in picked)
    assert sample_directions(langs, 5, seed=0) == picked
    assert sample_directions(langs, ["a-b"], seed=0) == [("a", "b")]


def test_routing_specificity_on_constructed_counts():
    # language x sends 90% of its tokens to experts 0 and 1, language y (fewer tokens) to experts 2 and 3
    x = torch.tensor([[90.0, 90.0, 10.0, 10.0]])
    y = torch.tensor([[5.0, 5.0, 45.0, 45.0]])
    rows = specificity({"x": x, "y": y}, k=2)
    assert rows["x"]["own_top_k"] == pytest.approx(0.9) and rows["y"]["own_top_k"] == pytest.approx(0.9)
    # the 2 experts used most overall are x's: they take 90% of x's tokens but only 10% of y's
    assert rows["x"]["shared_top_k"] == pytest.approx(0.9) and rows["y"]["shared_top_k"] == pytest.approx(0.1)
    assert jaccard_of_top_sets({"x": x, "y": y}, k=2) == 0.0


def _run(criterion: str, policy: str, share: float, chrf: dict[str, float], off: float = 0.5) -> dict:
    return {
        "criterion": criterion,
        "policy": policy,
        "pruned_share": share,
        "chrf++": chrf,
        "mean_chrf++": sum(chrf.values()) / len(chrf),
        "mean_off_target": off,
    }


def test_beyond_report_pairs_directions_and_names_the_winner(tmp_path):
    from experiments.beyond import report

    base = _run("importance", "drop", 0.5, {"a-b": 80.0, "b-a": 70.0, "a-c": 60.0})
    better = _run("mean", "skip", 0.5, {"a-b": 84.0, "b-a": 69.0, "a-c": 65.0})
    worse = _run("ean", "drop", 0.5, {"a-b": 50.0, "b-a": 40.0, "a-c": 30.0})
    delta, up, down = report.paired(better, base)
    assert (round(delta, 6), up, down) == (round((4 - 1 + 5) / 3, 6), 2, 1)
    configs = report.by_config([base, better, worse, {**_run("full", "full", 0.0, {"a-b": 90.0}), "policy": "full"}])
    assert set(configs) == {("importance", "drop", 0.5), ("mean", "skip", 0.5), ("ean", "drop", 0.5)}
    (line,) = report.winners(configs, [0.5])
    assert "**mean + skip**" in line and "+2.67" in line and "better in 2, worse in 1 of 3" in line
    table = report.chrf_table(configs, policy="drop", shares=[0.5], criteria=["importance", "ean"])
    assert "| ean | 40.0 (-30.0) / 0.5% |" in table
    alone = report.by_config([base])
    assert report.winners(alone, [0.5]) == ["- 50.0% pruned: the paper's importance + drop is best (70.00 chrF++)."]


def test_beyond_grid_covers_full_floor_then_every_plan_policy_criterion():
    from omegaconf import OmegaConf

    from experiments.beyond.study import grid, run_name

    cfg = OmegaConf.create(
        {"plans": [{"keep": 32, "enc_keep": 24}, {"keep": 6, "enc_keep": 4}], "policies": ["drop", "skip"], "criteria": ["importance", "mean", "random"]}
    )
    configs = grid(cfg)
    names = [run_name(c) for c in configs]
    assert names[:2] == ["full", "floor"] and len(names) == 2 + 2 * 2 * 3 == len(set(names))
    assert "mean-skip-keep6" in names and configs[names.index("mean-skip-keep6")]["enc_keep"] == 4
