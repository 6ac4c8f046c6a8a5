"""Plots: the numbers behind them (Jaccard, average-linkage order) and the PNGs, on our stats and the paper's index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pruning.cli import main
from pruning.index import ExpertIndex, read_index
from pruning.plots import (
    PlotError,
    average_linkage_order,
    jaccard_matrix,
    language_usage,
    plot_experts_per_layer,
    plot_language_similarity,
    plot_usage_heatmap,
)
from pruning.topology import NLLB_MOE_54B
from tests.selection_fixtures import simulated_stats

PAPER_EXPERTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "nllb-pruning-paper" / "experts.json"
PNG = b"\x89PNG\r\n\x1a\n"
T = NLLB_MOE_54B


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


def test_jaccard_by_hand() -> None:
    sim = jaccard_matrix([{1, 2, 3}, {2, 3, 4}, {9}, set()])
    assert sim[0, 1] == pytest.approx(2 / 4) and sim[1, 0] == sim[0, 1]
    assert sim[0, 2] == 0 and sim[2, 3] == 0 and sim[3, 3] == 1 and np.all(np.diag(sim) == 1)


def test_average_linkage_order_by_hand() -> None:
    # points on a line at 5, 20, 0, 6, 1: first {5, 6} (lowest-index pair among the two ties at distance 1),
    # then {0, 1}, then those two clusters (mean distance 5), then 20 (mean distance 14.5 vs 19.5 before)
    x = np.array([5.0, 20.0, 0.0, 6.0, 1.0])
    assert average_linkage_order(np.abs(x[:, None] - x[None, :])) == [0, 3, 2, 4, 1]


def test_average_linkage_groups_blocks_together() -> None:
    rng = np.random.default_rng(0)
    groups = rng.permutation(np.repeat(np.arange(4), 6))  # 24 items in 4 shuffled groups
    base = [set(range(g * 10, g * 10 + 8)) for g in range(4)]
    sets = [base[g] | {100 + i} for i, g in enumerate(groups)]  # each item: its group's set plus one own element
    order = average_linkage_order(1 - jaccard_matrix(sets))
    assert sorted(order) == list(range(24))
    labels = groups[order]
    assert sum(labels[i] != labels[i + 1] for i in range(23)) == 3  # each group contiguous
    with pytest.raises(PlotError, match="symmetric square"):
        average_linkage_order(np.array([[0.0, 1.0], [2.0, 0.0]]))
    assert average_linkage_order(np.zeros((1, 1))) == [0]


def test_usage_heatmap_from_statistics(tmp_path: Path) -> None:
    stats = simulated_stats(["fra_Latn-eng_Latn", "eng_Latn-fra_Latn", "deu_Latn-fra_Latn"])
    usage = language_usage(stats, "deu_Latn")
    n_enc = len(T.moe_layers("encoder"))
    assert usage.shape == (T.num_moe_layers, T.num_experts)
    assert np.isfinite(usage[:n_enc]).all() and np.isnan(usage[n_enc:]).all()  # deu_Latn is only ever a source
    assert np.allclose(usage[:n_enc].sum(1), 2.0)  # top-k shares: every token picks 2 experts
    assert is_png(plot_usage_heatmap(stats, "fra_Latn", tmp_path / "usage.png"))
    with pytest.raises(PlotError, match="language 'zzz_Latn' has no statistics; known languages: deu_Latn, eng_Latn, fra_Latn"):
        language_usage(stats, "zzz_Latn")


def test_similarity_needs_a_language_index(tmp_path: Path) -> None:
    with pytest.raises(PlotError, match="per-language index"):
        plot_language_similarity(ExpertIndex.for_all(range(0, T.num_total_experts, 3)), T, tmp_path / "x.png")


def test_plot_cli_on_statistics_and_a_selected_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stats = simulated_stats(["fra_Latn-eng_Latn", "eng_Latn-fra_Latn", "deu_Latn-eng_Latn", "eng_Latn-deu_Latn"])
    path = stats.save(tmp_path / "stats.safetensors")
    experts = tmp_path / "experts.json"
    assert main(["select", "--stats", str(path), "--out", str(experts)]) == 0
    out = tmp_path / "plots"
    assert main(["plot", "--stats", str(path), "--experts", str(experts), "--out", str(out), "--max-langs", "2"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["experts-per-layer.png", "similarity-decoder.png", "similarity-encoder.png", "usage-deu_Latn.png", "usage-eng_Latn.png"]
    assert all(is_png(out / n) for n in names)
    capsys.readouterr()
    assert main(["plot", "--out", str(out)]) == 2
    assert "give --stats" in capsys.readouterr().err


@pytest.mark.skipif(not PAPER_EXPERTS.is_file(), reason="the paper's experts.json is not in ../shared/data")
def test_plots_on_the_papers_experts_json(tmp_path: Path) -> None:
    index = read_index(PAPER_EXPERTS)
    assert is_png(plot_experts_per_layer(index, T, tmp_path / "per-layer.png"))
    assert is_png(plot_language_similarity(index, T, tmp_path / "similarity.png"))
    # decoder experts of related languages are close: Chinese variants keep more experts in common than with French
    langs = index.keys
    dec = [{i for i in index.entries[lang] if T.side_of_id(i) == "decoder"} for lang in langs]
    sim = jaccard_matrix(dec)
    hans, hant, fra = (langs.index(code) for code in ("zho_Hans", "zho_Hant", "fra_Latn"))
    assert sim[hans, hant] > sim[hans, fra]
    order = average_linkage_order(1 - sim)
    assert abs(order.index(hans) - order.index(hant)) <= 3
