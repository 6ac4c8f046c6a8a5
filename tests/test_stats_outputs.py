"""Expert-output counters (``stats --expert-outputs``) and the metrics computed from them."""

from __future__ import annotations

import pytest
import torch

from metrics import MetricError, compute_metric
from pruning.cli import main
from pruning.model.loading import load_model
from pruning.model.moe import sorted_loop_dispatch
from pruning.stats.collect import collect_statistics
from pruning.stats.collector import RoutingCollector
from pruning.stats.counters import RoutingStats
from pruning.stats.options import StatsOptions
from pruning.stats.outputs import ALL_OUTPUT_COUNTERS, GATE_RATIO_BINS
from tests.stats_fixtures import LANGS, forward_observed, make_flores

FRA, DEU, ENG = LANGS


class LayerRecorder:
    """Each MoE layer call's input hidden states [B, S, D] and Routing, by hooks of this test only."""

    def __init__(self, model):
        self.calls: list[tuple[str, object, torch.Tensor, object]] = []  # (side, layer, hidden, routing)
        self._pending: dict[int, torch.Tensor] = {}
        self.handles = []
        for side, _, moe in model.moe_layers():
            self.handles.append(moe.register_forward_pre_hook(lambda m, args: self._pending.__setitem__(id(m), args[0].detach().clone())))
            self.handles.append(moe.register_forward_hook(lambda m, i, o, side=side: self.calls.append((side, m, self._pending.pop(id(m)), o[1]))))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def reference_outputs(model, calls) -> dict[str, dict[str, torch.Tensor]]:
    """The counters by a plain per-token loop in float64 through each chosen expert's own weights."""
    e_all = model.topology.num_experts
    out: dict[str, dict[str, torch.Tensor]] = {}
    rows = {"encoder": 0, "decoder": 0}
    n_layers = {side: sum(1 for s, *_ in calls if s == side) for side in ("encoder", "decoder")}
    for side, moe, hidden, routing in calls:
        short = "enc" if side == "encoder" else "dec"
        d = hidden.shape[-1]
        c = out.setdefault(
            short,
            {
                "routed": torch.zeros(n_layers[side], e_all, dtype=torch.float64),
                "out_norm": torch.zeros(n_layers[side], e_all, dtype=torch.float64),
                "out_norm_sq": torch.zeros(n_layers[side], e_all, dtype=torch.float64),
                "gate_norm": torch.zeros(n_layers[side], e_all, dtype=torch.float64),
                "weight_norm": torch.zeros(n_layers[side], e_all, dtype=torch.float64),
                "max_abs": torch.zeros(n_layers[side], e_all, dtype=torch.float64),
                "out_sum": torch.zeros(n_layers[side], e_all, d, dtype=torch.float64),
                "coact": torch.zeros(n_layers[side], e_all, e_all, dtype=torch.float64),
                "gate_ratio_hist": torch.zeros(n_layers[side], GATE_RATIO_BINS, dtype=torch.float64),
            },
        )
        row = rows[side] % n_layers[side]
        rows[side] += 1
        x = hidden.reshape(-1, d).double()  # [T, D]
        ids = routing.expert_ids.tolist()
        for t in range(x.shape[0]):
            if not bool(routing.token_mask[t]):
                continue  # padding
            chosen = routing.expert_idx[t].tolist()
            probs = routing.probs[t].double()
            p1, p2 = probs.sort(descending=True).values[:2].tolist()  # independent of the router's choice
            c["gate_ratio_hist"][row, min(int(p2 / p1 * GATE_RATIO_BINS), GATE_RATIO_BINS - 1)] += 1
            g = probs[chosen]
            for k, e in enumerate(chosen):
                w1, b1 = moe.experts.fc1_weight[e].double(), moe.experts.fc1_bias[e].double()
                w2, b2 = moe.experts.fc2_weight[e].double(), moe.experts.fc2_bias[e].double()
                y = w2 @ torch.relu(w1 @ x[t] + b1) + b2  # [D]
                norm = float(y.norm())
                gid = ids[e]
                c["routed"][row, gid] += 1
                c["out_norm"][row, gid] += norm
                c["out_norm_sq"][row, gid] += norm**2
                c["gate_norm"][row, gid] += float(probs[e]) * norm
                c["weight_norm"][row, gid] += float(g[k] / g.sum()) * norm
                c["max_abs"][row, gid] = max(float(c["max_abs"][row, gid]), float(y.abs().max()))
                c["out_sum"][row, gid] += y
            a, b = ids[chosen[0]], ids[chosen[1]]
            c["coact"][row, a, b] += 1
            c["coact"][row, b, a] += 1
    return out


def _second_pass_only(x, routing, experts):  # a dispatch without ``observe``: the tap runs the experts again
    return sorted_loop_dispatch(x, routing, experts)


@pytest.mark.parametrize("dispatch", ["grouped", "loop", "no-observe"])
def test_counters_equal_a_plain_loop_over_routed_tokens(tiny_hf_dir, tiny_batch, dispatch):
    model = load_model(tiny_hf_dir, dispatch="loop" if dispatch == "no-observe" else dispatch)
    if dispatch == "no-observe":
        for _, _, moe in model.moe_layers():
            moe.dispatch = _second_pass_only
    recorder = LayerRecorder(model)
    collector = RoutingCollector(model, num_experts=model.topology.num_experts, expert_outputs=True)
    try:
        with torch.no_grad():
            model(**tiny_batch, use_cache=False)
        got = collector.take()
    finally:
        collector.close()
        recorder.close()
    # every real token is dispatched to two experts at eval capacity; padding is present in this batch
    assert all(bool((r.dispatched == r.token_mask[:, None]).all()) for *_, r in recorder.calls)
    assert int(tiny_batch["attention_mask"].sum()) < tiny_batch["attention_mask"].numel()
    expected = reference_outputs(model, recorder.calls)
    for side in ("enc", "dec"):
        real = tiny_batch["attention_mask" if side == "enc" else "decoder_attention_mask"].sum()
        assert torch.equal(expected[side]["routed"].sum(-1), torch.full_like(got[side]["tokens"], 2.0 * float(real)))
        assert torch.equal(got[side]["routed"], got[side]["top1"] + got[side]["top2"])
        for name in ALL_OUTPUT_COUNTERS:
            torch.testing.assert_close(got[side][name], expected[side][name], rtol=1e-5, atol=1e-5, msg=f"{side}/{name}")
        assert torch.equal(got[side]["coact"], got[side]["coact"].transpose(1, 2))
        assert torch.equal(got[side]["gate_ratio_hist"].sum(-1), got[side]["tokens"])  # every real token, once per layer
        assert float(got[side]["max_abs"].max()) > 0 and float(got[side]["out_norm"].min()) >= 0


@pytest.mark.parametrize("dispatch", ["loop", "grouped"])
def test_layer_outputs_are_bit_identical_with_the_option(tiny_hf_dir, tiny_batch, dispatch):
    model = load_model(tiny_hf_dir, dispatch=dispatch)
    own = [moe.dispatch for _, _, moe in model.moe_layers()]
    plain, observed, counters = forward_observed(model, tiny_batch, expert_outputs=True)
    assert torch.equal(plain, observed)
    assert float(counters["enc"]["routed"].sum()) > 0
    assert [moe.dispatch for _, _, moe in model.moe_layers()] == own  # close() puts the layer's dispatch back


def test_two_halves_merge_into_the_whole(tiny_hf_dir, tmp_path):
    whole = make_flores(tmp_path / "whole", n=6)
    first = make_flores(tmp_path / "first", n=3)
    second = make_flores(tmp_path / "second", n=3, start=3)
    pairs = f"{DEU}-{FRA},{FRA}-{ENG}"
    for name, data in (("whole", whole), ("first", first), ("second", second)):
        rc = main(
            [
                "stats",
                "--model",
                str(tiny_hf_dir),
                "--data",
                str(data),
                "--pairs",
                pairs,
                "--batch-tokens",
                "40",
                "--out",
                str(tmp_path / f"{name}.safetensors"),
                "--no-progress",
                "--expert-outputs",
            ]
        )
        assert rc == 0
    halves = [RoutingStats.load(tmp_path / f"{n}.safetensors") for n in ("first", "second")]
    merged, reference = halves[0].merge(halves[1]), RoutingStats.load(tmp_path / "whole.safetensors")
    assert reference.info["expert_outputs"] is True
    for d in reference.directions:
        for side in ("enc", "dec"):
            ref = reference.side(d, side)
            assert set(ALL_OUTPUT_COUNTERS) <= set(ref)
            for name in ALL_OUTPUT_COUNTERS:
                torch.testing.assert_close(merged.side(d, side)[name], ref[name], rtol=1e-5, atol=1e-5, msg=f"{d}/{side}/{name}")
            # max_abs merges by maximum, not by sum
            a, b = (h.side(d, side)["max_abs"] for h in halves)
            torch.testing.assert_close(merged.side(d, side)["max_abs"], torch.maximum(a, b), rtol=0, atol=0)
            assert bool((a + b > torch.maximum(a, b)).any())
            for metric in ("reap", "ean", "msan", "output_variance"):
                torch.testing.assert_close(compute_metric(metric, merged.side(d, side)), compute_metric(metric, ref), rtol=1e-5, atol=1e-6)


# ---- metrics on constructed counters --------------------------------------------------------------
def constructed() -> dict[str, torch.Tensor]:
    """One layer, 3 experts, D = 2. Expert 0 got outputs (3, 4) and (0, 0); expert 1 got (1, 0) three times; expert 2 nothing."""
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return {
        "tokens": t([5.0]),
        "top1": t([1.0, 2.0, 0.0]),
        "top2": t([1.0, 1.0, 0.0]),
        "gate": t([1.0, 1.0, 1.0]),
        "conf1": t([0.5, 1.0, 0.0]),
        "conf2": t([0.1, 0.2, 0.0]),
        "rank": t([5.0, 5.0, 5.0]),
        "routed": t([2.0, 3.0, 0.0]),
        "out_norm": t([5.0 + 0.0, 3.0, 0.0]),
        "out_norm_sq": t([25.0 + 0.0, 3.0, 0.0]),
        "gate_norm": t([0.5 * 5.0 + 0.1 * 0.0, 0.2 * 3.0, 0.0]),
        "weight_norm": t([0.8 * 5.0, 0.6 * 3.0, 0.0]),
        "max_abs": t([4.0, 1.0, 0.0]),
        "out_sum": torch.tensor([[[3.0, 4.0], [3.0, 0.0], [0.0, 0.0]]], dtype=torch.float64),
        "coact": torch.zeros(1, 3, 3, dtype=torch.float64),
    }


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("frequency", [2 / 5, 3 / 5, 0.0]),
        ("ean", [5 / 2, 1.0, 0.0]),
        ("man", [5 / 2, 1.0, 0.0]),
        ("reap", [2.5 / 2, 0.6 / 3, 0.0]),
        ("msan", [25 / 2, 1.0, 0.0]),
        # expert 0: mean ||y||^2 = 12.5, mean y = (1.5, 2), ||.||^2 = 6.25 -> 6.25; expert 1: always (1, 0) -> 0
        ("output_variance", [6.25, 0.0, 0.0]),
    ],
)
def test_metrics_equal_hand_computed_values(name, expected):
    c = {
        k: (
            v[None]
            if k in ("top1", "top2", "gate", "conf1", "conf2", "rank", "routed", "out_norm", "out_norm_sq", "gate_norm", "weight_norm", "max_abs")
            else v
        )
        for k, v in constructed().items()
    }
    score = compute_metric(name, c)
    torch.testing.assert_close(score, torch.tensor([expected], dtype=torch.float64))


@pytest.mark.parametrize("name", ["ean", "reap", "man", "msan", "output_variance"])
def test_missing_output_counters_say_how_to_collect_them(name):
    c = {k: v for k, v in constructed().items() if k in ("tokens", "top1", "top2", "gate", "conf1", "conf2", "rank")}
    c = {k: (v if k == "tokens" else v[None]) for k, v in c.items()}
    with pytest.raises(MetricError, match=r"without --expert-outputs.*nllb-prune stats \.\.\. --expert-outputs"):
        compute_metric(name, c)
    assert compute_metric("frequency", c).shape == (1, 3)  # routing counters are enough for frequency


def test_resume_refuses_to_mix_files_with_and_without_expert_outputs(tiny_hf_dir, tmp_path):
    from pruning.stats.counters import StatsError

    data = make_flores(tmp_path / "flores", n=2)
    base = dict(model=str(tiny_hf_dir), data=str(data), progress=False)
    plain, with_outputs = tmp_path / "plain.safetensors", tmp_path / "outputs.safetensors"
    collect_statistics(StatsOptions(**base, out=str(plain), pairs=[f"{FRA}-{DEU}"]))
    collect_statistics(StatsOptions(**base, out=str(with_outputs), pairs=[f"{FRA}-{DEU}"], expert_outputs=True))
    with pytest.raises(StatsError, match="expert_outputs: file False, this run True"):
        collect_statistics(StatsOptions(**base, out=str(plain), pairs=[f"{DEU}-{FRA}"], expert_outputs=True, resume=True))
    with pytest.raises(StatsError, match="expert_outputs: file True, this run False"):
        collect_statistics(StatsOptions(**base, out=str(with_outputs), pairs=[f"{DEU}-{FRA}"], resume=True))
    collect_statistics(StatsOptions(**base, out=str(with_outputs), pairs=[f"{DEU}-{FRA}"], expert_outputs=True, resume=True))
    assert all("out_norm" in RoutingStats.load(with_outputs).side(d, "enc") for d in (f"{FRA}-{DEU}", f"{DEU}-{FRA}"))


def test_merge_refuses_files_with_different_counters_for_one_direction():
    import torch as _torch

    from pruning.stats.counters import RoutingStats, StatsError
    from pruning.topology import Topology

    topology = Topology(encoder_layers=2, decoder_layers=2, encoder_sparse_step=2, decoder_sparse_step=2, num_experts=4, d_model=8, ffn_dim=16, vocab_size=10)
    plain = RoutingStats(topology)
    plain.add("aaa_Latn-bbb_Latn", "enc", "top1", _torch.ones(1, 4))
    richer = RoutingStats(topology)
    richer.add("aaa_Latn-bbb_Latn", "enc", "top1", _torch.ones(1, 4))
    richer.add("aaa_Latn-bbb_Latn", "enc", "out_norm", _torch.ones(1, 4))
    with pytest.raises(StatsError, match=r"aaa_Latn-bbb_Latn \(enc\) has counters \['out_norm'\] in only one"):
        plain.merge(richer, what="b.safetensors")
    other_direction = RoutingStats(topology)
    other_direction.add("bbb_Latn-aaa_Latn", "enc", "top1", _torch.ones(1, 4))
    other_direction.add("bbb_Latn-aaa_Latn", "enc", "out_norm", _torch.ones(1, 4))
    assert plain.merge(other_direction).directions == ["aaa_Latn-bbb_Latn", "bbb_Latn-aaa_Latn"]
    imported = RoutingStats(topology, info={"normalised": True})
    with pytest.raises(StatsError, match="paper's JSON"):
        plain.merge(imported)
