"""The data-free router-weight metric (metrics/router.py) and `nllb-prune select --router-model`."""

from __future__ import annotations

import math

import pytest
import torch

from metrics import MetricError, compute_metric
from metrics.router import router_counters, router_distinct
from pruning.checkpoint import reader as reader_module
from pruning.checkpoint.reader import read_router_rows
from pruning.checkpoint.torch_zip import CheckpointError, LazyTensor
from pruning.cli import main
from pruning.data.directions import SHORT_SIDE
from pruning.index import read_index
from pruning.select import SelectionError, SelectOptions, select_experts
from tests.selection_fixtures import simulated_stats

DIRECTIONS = ["fra_Latn-eng_Latn", "eng_Latn-fra_Latn"]


def by_hand(rows: torch.Tensor) -> list[list[float]]:
    """min over other rows of 1 - cos, with plain Python arithmetic; rows [L, E, D]."""
    out = []
    for layer in rows.tolist():
        norms = [math.sqrt(sum(x * x for x in row)) for row in layer]
        scores = []
        for e, row in enumerate(layer):
            distances = []
            for f, other in enumerate(layer):
                if f == e:
                    continue
                dot = sum(a * b for a, b in zip(row, other))
                cos = 0.0 if norms[e] == 0 or norms[f] == 0 else dot / (norms[e] * norms[f])
                distances.append(1 - cos)
            scores.append(min(distances))
        out.append(scores)
    return out


def test_router_distinct_against_a_hand_computation():
    generator = torch.Generator().manual_seed(3)
    rows = torch.randn(3, 6, 5, generator=generator, dtype=torch.float64)  # [L, E, D]
    rows[0, 4] = 2.5 * rows[0, 1] + 1e-3 * torch.randn(5, generator=generator, dtype=torch.float64)  # a near-duplicate of expert 1
    rows[1, 2] = 0.0  # a zero row: cosine 0 to everything
    rows[2, 5] = -rows[2, 0]  # opposite rows are not duplicates
    score = compute_metric("router_distinct", {"router_rows": rows, "tokens": torch.ones(3)}, where="test")
    assert score.shape == (3, 6)
    torch.testing.assert_close(score, torch.tensor(by_hand(rows), dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert score[0, 1] < 1e-5 and score[0, 4] < 1e-5 and set(torch.argsort(score[0])[:2].tolist()) == {1, 4}
    assert score[1, 2] == pytest.approx(1.0)
    assert bool(((score >= 0) & (score <= 2)).all())


def test_two_experts_and_the_scale_of_rows_do_not_matter():
    rows = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]], dtype=torch.float64)  # 45 degrees apart
    expected = 1 - 1 / math.sqrt(2)
    torch.testing.assert_close(router_distinct({"router_rows": rows}), torch.full((1, 2), expected, dtype=torch.float64))
    torch.testing.assert_close(router_distinct({"router_rows": 7 * rows}), router_distinct({"router_rows": rows}))


def test_statistics_alone_cannot_score_it():
    stats = simulated_stats(DIRECTIONS, tokens=8)
    with pytest.raises(MetricError, match=r"router_distinct is data-free: .* give --router-model CKPT"):
        compute_metric("router_distinct", stats.counters[DIRECTIONS[0]]["enc"])
    with pytest.raises(SelectionError, match=r"router_distinct is data-free: .* give --router-model CKPT"):
        select_experts(stats, SelectOptions(metric="router_distinct"))


def router_weights(model) -> dict[str, torch.Tensor]:
    """The model's own router weights per side, [L, E, D], in MoE-layer order."""
    params = dict(model.named_parameters())
    out = {}
    for side in ("encoder", "decoder"):
        names = sorted((n for n in params if n.startswith(f"model.{side}.layers.") and n.endswith(".ffn.router.weight")), key=lambda n: int(n.split(".")[3]))
        out[SHORT_SIDE[side]] = torch.stack([params[n].detach().to(torch.float64) for n in names])
    return out


@pytest.mark.parametrize("layout", ["hf", "fairseq"])
def test_read_router_rows_equals_the_models_routers_and_loads_no_expert(layout, tiny_model, tiny_hf_dir, tiny_fairseq_dir, monkeypatch):
    loaded: list[str] = []
    for cls in (LazyTensor, reader_module.SafetensorsTensor):
        original = cls.load

        def spy(self, _original=original):
            loaded.append(getattr(self, "key", None) or repr(self)[:80])
            return _original(self)

        monkeypatch.setattr(cls, "load", spy)
    router = read_router_rows(tiny_hf_dir if layout == "hf" else tiny_fairseq_dir)
    expected = router_weights(tiny_model)
    topology = router.topology
    for side in ("enc", "dec"):
        assert router.rows[side].shape == (len(topology.moe_layers("encoder" if side == "enc" else "decoder")), topology.num_experts, tiny_model.config.d_model)
        torch.testing.assert_close(router.rows[side], expected[side])
    assert len(loaded) == topology.num_moe_layers, f"only the routers are loaded, got {loaded[:5]}"
    counters = router_counters(router)
    assert counters["enc"]["tokens"].tolist() == [1.0] * expected["enc"].shape[0]


def test_select_with_router_model_keeps_the_most_distinct_rows(tmp_path, tiny_model, tiny_hf_dir, capsys):
    stats = simulated_stats(DIRECTIONS, tokens=8)
    options = SelectOptions(metric="router_distinct", router_model=str(tiny_hf_dir), granularity="pair", ratio=0.75, enc_dec="3:1")
    selection = select_experts(stats, options)
    rows = router_weights(tiny_model)
    topology = selection.topology
    per_enc, per_dec = selection.plan.per_layer
    expected = []
    for side, k in (("encoder", per_enc), ("decoder", per_dec)):
        scores = by_hand(rows[SHORT_SIDE[side]])
        for row, layer in enumerate(topology.moe_layers(side)):
            best = sorted(range(topology.num_experts), key=lambda e: (-scores[row][e], e))[:k]
            expected += [topology.global_id(side, layer, e) for e in best]
    for direction in DIRECTIONS:  # data-free: the same experts whatever the statistics
        assert list(selection.index.entries[direction]) == sorted(expected)

    # no statistics at all: one global list, the same experts
    out = tmp_path / "experts.json"
    argv = ["select", "--router-model", str(tiny_hf_dir), "--metric", "router_distinct", "--granularity", "global", "--ratio", "0.75", "--out", str(out)]
    assert main(argv) == 0
    assert list(read_index(out).entries["*"]) == sorted(expected)
    without_granularity = [a for a in argv if a not in ("--granularity", "global")]  # default: lang
    assert main(without_granularity) == 2
    assert "use --granularity global" in capsys.readouterr().err


def test_select_cli_errors(tmp_path, capsys):
    stats = simulated_stats(DIRECTIONS, tokens=8).save(tmp_path / "stats.safetensors")
    assert main(["select", "--stats", str(stats), "--metric", "router_distinct", "--out", str(tmp_path / "x.json")]) == 2
    assert (
        "router_distinct is data-free: it scores the checkpoint's router rows, which statistics do not hold; give --router-model CKPT"
        in capsys.readouterr().err
    )
    assert main(["select", "--metric", "importance", "--router-model", str(tmp_path), "--out", str(tmp_path / "x.json")]) == 2
    assert "missing required setting(s): --stats" in capsys.readouterr().err


def test_pruned_export_is_refused_naming_the_layer(tmp_path, tiny_hf_dir):
    from pruning.checkpoint.reader import open_checkpoint
    from pruning.export import export_checkpoint, parse_directions
    from tests import export_fixtures as ef

    index = ef.write_lang_index(tmp_path / "experts.json", open_checkpoint(tiny_hf_dir).topology)
    pruned = export_checkpoint(tiny_hf_dir, experts=index, out=tmp_path / "pruned", directions=parse_directions(pairs=["fra_Latn-deu_Latn"]), progress=False)
    with pytest.raises(
        CheckpointError, match=r"the router of encoder layer 3 has \d+ rows, but the model has 128 experts per layer .* need the unpruned checkpoint"
    ):
        read_router_rows(pruned)
