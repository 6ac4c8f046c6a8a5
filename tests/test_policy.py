"""`export --policy drop|substitute|merge`: the treatment of pruned experts, against independent references."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pruning import load_model
from pruning.checkpoint.reader import open_checkpoint
from pruning.checkpoint.torch_zip import CheckpointError
from pruning.cli import main
from pruning.export import ExportError, export_checkpoint, parse_directions
from pruning.index import read_index
from pruning.manifest import MANIFEST_NAME, read_manifest
from pruning.model.moe import MoeLayer
from pruning.policy import PolicyError, apply_policy, merge_layer, merge_tensor, plan_policy, substitute_layer
from pruning.stats.counters import RoutingStats
from tests import export_fixtures as ef
from tests import fixtures

FRA, DEU, ENG = ef.LANGS
ALL_DIRECTIONS = [f"{a}-{b}" for a in ef.LANGS for b in ef.LANGS if a != b]


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def synthetic_stats(topology, d_model: int, *, expert_outputs: bool = True, seed: int = 0, directions=ALL_DIRECTIONS) -> RoutingStats:
    """Counters of the shapes `nllb-prune stats [--expert-outputs]` writes, with some never-routed experts."""
    gen = torch.Generator().manual_seed(seed)
    stats = RoutingStats(topology, {}, {"made_by": "tests.test_policy"})
    e = topology.num_experts
    for direction in directions:
        for side in ("enc", "dec"):
            n_layers = stats.num_layers(side)
            top1 = torch.randint(0, 4, (n_layers, e), generator=gen).double()
            top2 = torch.randint(0, 4, (n_layers, e), generator=gen).double()
            stats.add(direction, side, "top1", top1)
            stats.add(direction, side, "top2", top2)
            if expert_outputs:
                stats.add(direction, side, "routed", top1 + top2)
                stats.add(direction, side, "out_sum", torch.randn(n_layers, e, d_model, generator=gen).double() * (top1 + top2)[..., None])
                coact = torch.randint(0, 3, (n_layers, e, e), generator=gen).double()
                coact = (coact + coact.transpose(1, 2)) * (1 - torch.eye(e, dtype=torch.float64))
                stats.add(direction, side, "coact", coact)
    return stats


@pytest.fixture(scope="module")
def stats_path(tmp_path_factory, topology, tiny_model) -> Path:
    return synthetic_stats(topology, tiny_model.config.d_model).save(tmp_path_factory.mktemp("stats") / "stats.safetensors")


@pytest.fixture(scope="module")
def routing_only_stats(tmp_path_factory, topology, tiny_model) -> Path:
    stats = synthetic_stats(topology, tiny_model.config.d_model, expert_outputs=False)
    return stats.save(tmp_path_factory.mktemp("stats") / "routing-only.safetensors")


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_hf_dir, index_path, stats_path) -> dict[str, Path]:
    """fra->deu exports in fp32 under each policy."""
    root = tmp_path_factory.mktemp("policy_exports")
    return {
        policy: export_checkpoint(
            tiny_hf_dir,
            experts=index_path,
            out=root / policy,
            directions=[(FRA, DEU)],
            dtype=torch.float32,
            progress=False,
            policy=policy,
            stats=stats_path,
        )
        for policy in ("drop", "substitute", "merge")
    }


# ---- one layer against a per-token reference ------------------------------------------------------
E, D, F_DIM, EOM = 8, 16, 24, 0.2
KEPT = [1, 4, 6]
PRUNED = [0, 2, 3, 5, 7]


def full_layer_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "router": 2.0 * torch.randn(E, D, generator=gen),
        "fc1_weight": 0.3 * torch.randn(E, F_DIM, D, generator=gen),
        "fc1_bias": 0.3 * torch.randn(E, F_DIM, generator=gen),
        "fc2_weight": 0.3 * torch.randn(E, D, F_DIM, generator=gen),
        "fc2_bias": 0.3 * torch.randn(E, D, generator=gen),
    }


def policy_layer(weights: dict[str, torch.Tensor], plan, *, dispatch: str) -> MoeLayer:
    """A MoeLayer holding the plan's kept experts (merged ones averaged) and extra router rows."""
    from pruning.model.moe import DISPATCHES

    layer = MoeLayer(d_model=D, ffn_dim=F_DIM, expert_ids=plan.kept, eom=EOM, extra_rows=plan.extra, dispatch=DISPATCHES[dispatch])
    with torch.no_grad():
        layer.router.weight.copy_(weights["router"][layer.router_ids])
        for name in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
            for i, k in enumerate(plan.kept):
                getattr(layer.experts, name)[i].copy_(merge_tensor((c, weights[name][e]) for e, c in plan.fold_coefficients(k)))
        if layer.constant_outputs is not None:
            layer.constant_outputs.copy_(plan.constants)
    return layer.eval()


def expert64(weights: dict[str, torch.Tensor], e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` of the unpruned layer, by hand, in float64: relu(x W1^T + b1) W2^T + b2."""
    w = {k: v[e].double() for k, v in weights.items() if k != "router"}
    h = torch.relu(x.double() @ w["fc1_weight"].T + w["fc1_bias"])
    return h @ w["fc2_weight"].T + w["fc2_bias"]


def reference_choices(weights: dict[str, torch.Tensor], x: torch.Tensor) -> list[list[tuple[int, float]]]:
    """Per token: [(original expert id, combine weight)] of the unpruned router (all E rows), fairseq top-2."""
    out = []
    for t in range(x.shape[0]):
        logits = (weights["router"].double() @ x[t].double()).tolist()
        top = math.fsum(math.exp(v - max(logits)) for v in logits)
        probs = [math.exp(v - max(logits)) / top for v in logits]
        first = max(range(E), key=lambda e: (probs[e], -e))
        second = max((e for e in range(E) if e != first), key=lambda e: (logits[e], -e))
        total = probs[first] + probs[second]
        out.append([(first, probs[first] / total), (second, probs[second] / total)])
    return out


def layer_input(tokens: int = 19, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, tokens, D, generator=gen)
    mask = torch.ones(1, tokens, dtype=torch.long)
    mask[0, -3:] = 0  # padding: routed nowhere
    return hidden, mask


@pytest.mark.parametrize("dispatch", ["loop", "grouped"])
def test_substitute_layer_equals_per_token_reference(dispatch):
    weights = full_layer_weights()
    gen = torch.Generator().manual_seed(1)
    routed = torch.tensor([5.0, 3, 0, 7, 2, 4, 1, 0])  # expert 2 never routed (pruned): zero vector; 7 pruned, routed 0 too
    out_sum = torch.randn(E, D, generator=gen, dtype=torch.float64) * routed[:, None]
    plan = substitute_layer(KEPT, routed=routed, out_sum=out_sum, num_experts=E)
    assert plan.extra.ids == tuple(PRUNED) and plan.record["never_routed"] == [2, 7]
    mean = {p: (out_sum[p] / routed[p] if routed[p] > 0 else torch.zeros(D, dtype=torch.float64)) for p in PRUNED}
    assert torch.equal(plan.constants, torch.stack([mean[p] for p in PRUNED]))

    layer = policy_layer(weights, plan, dispatch=dispatch)
    hidden, mask = layer_input()
    with torch.no_grad():
        got, routing = layer(hidden, mask)
    # the router is the unpruned one: every row, original ids
    assert sorted(routing.expert_ids.tolist()) == list(range(E))

    x = hidden[0]
    expected = torch.zeros(x.shape[0], D, dtype=torch.float64)
    hit = set()
    for t, choices in enumerate(reference_choices(weights, x)):
        if not mask[0, t]:
            continue
        for e, w in choices:
            y = expert64(weights, e, x[t : t + 1])[0] if e in KEPT else mean[e]
            expected[t] += w * (1 - EOM) * y
            hit.add(e)
    assert hit & set(PRUNED) and hit & set(KEPT), f"the input must reach kept and pruned experts, hit {sorted(hit)}"
    torch.testing.assert_close(got[0].double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0, -3:], torch.zeros(3, D))


@pytest.mark.parametrize("dispatch", ["loop", "grouped"])
def test_merge_layer_sends_pruned_rows_to_their_merged_expert(dispatch):
    weights = full_layer_weights(seed=5)
    frequency = torch.tensor([4.0, 6, 1, 3, 5, 2, 8, 0])
    coact = torch.zeros(E, E, dtype=torch.float64)
    for p, k, n in ((0, 1, 3), (2, 4, 2), (3, 6, 5), (5, 4, 1), (7, 1, 2)):
        coact[p, k] = coact[k, p] = n
    plan = merge_layer(KEPT, frequency=frequency, coact=coact, router=lambda: weights["router"], num_experts=E)
    into = {0: 1, 2: 4, 3: 6, 5: 4, 7: 1}
    assert dict(zip(plan.extra.ids, plan.extra.to)) == into and plan.record["by"] == ["coact"] * 5

    # merged weights: (f_k W_k + sum f_p W_p) / (f_k + sum f_p), by hand
    merged = {}
    for k in KEPT:
        group = [k, *[p for p, q in into.items() if q == k]]
        total = sum(float(frequency[e]) for e in group)
        merged[k] = {name: sum(float(frequency[e]) * weights[name][e].double() for e in group) / total for name in weights if name != "router"}

    layer = policy_layer(weights, plan, dispatch=dispatch)
    hidden, mask = layer_input(seed=4)
    with torch.no_grad():
        got, _ = layer(hidden, mask)
    x = hidden[0].double()
    expected = torch.zeros(x.shape[0], D, dtype=torch.float64)
    both_same = 0
    for t, choices in enumerate(reference_choices(weights, hidden[0])):
        if not mask[0, t]:
            continue
        serving = [into.get(e, e) for e, _ in choices]
        both_same += serving[0] == serving[1]
        for (_e, w), k in zip(choices, serving):
            m = merged[k]
            y = torch.relu(x[t] @ m["fc1_weight"].T + m["fc1_bias"]) @ m["fc2_weight"].T + m["fc2_bias"]
            expected[t] += w * (1 - EOM) * y
    assert both_same > 0, "some token must pick two rows served by one merged expert: (w1 + w2) * expert(x)"
    torch.testing.assert_close(got[0].double(), expected, rtol=1e-5, atol=1e-5)


def test_merge_weights_are_the_hand_computed_frequency_average():
    """4 experts, keep 0 and 2: 1 co-activates most with 0; 3 never co-activates, its router row is nearest 2's."""
    kept = [0, 2]
    frequency = torch.tensor([10.0, 2.0, 6.0, 3.0])
    coact = torch.zeros(4, 4, dtype=torch.float64)
    coact[1, 0] = coact[0, 1] = 5
    coact[1, 2] = coact[2, 1] = 1
    router = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.5, 0.7]])  # row 3: cos 0.58 to row 0, 0.9995 to row 2
    plan = merge_layer(kept, frequency=frequency, coact=coact, router=lambda: router, num_experts=4)
    assert plan.record == {"rows": [1, 3], "to": [0, 2], "by": ["coact", "router"]}
    assert plan.fold_coefficients(0) == [(0, 10 / 12), (1, 2 / 12)]
    assert plan.fold_coefficients(2) == [(2, 6 / 9), (3, 3 / 9)]
    w = [torch.full((2, 3), float(v)) for v in (1.0, 7.0, -2.0, 4.0)]
    assert torch.allclose(merge_tensor((c, w[e]) for e, c in plan.fold_coefficients(0)), torch.full((2, 3), (10 * 1 + 2 * 7) / 12))
    assert torch.allclose(merge_tensor((c, w[e]) for e, c in plan.fold_coefficients(2)), torch.full((2, 3), (6 * -2 + 3 * 4) / 9))

    # a tie in co-activation is broken by the router rows; no co-activation counters at all: router rows
    coact[3, 0] = coact[0, 3] = coact[3, 2] = coact[2, 3] = 2
    assert merge_layer(kept, frequency=frequency, coact=coact, router=lambda: router, num_experts=4).record["by"] == ["coact", "coact+router"]
    no_coact = merge_layer(kept, frequency=frequency, coact=None, router=lambda: router, num_experts=4)
    assert no_coact.record == {"rows": [1, 3], "to": [2, 2], "by": ["router", "router"]}  # row 1 (0, 1) is nearest row 2
    # a group never routed keeps the kept expert's weights
    idle = merge_layer(kept, frequency=torch.zeros(4), coact=coact, router=lambda: router, num_experts=4)
    assert idle.fold_coefficients(0) == [(0, 1.0)]


def test_plain_layer_has_no_policy_state():
    layer = MoeLayer(d_model=D, ffn_dim=F_DIM, expert_ids=KEPT)
    assert layer.row_slot is None and layer.constant_outputs is None and layer.router_ids == layer.expert_ids == KEPT


# ---- exports ------------------------------------------------------------------------------------------
def test_drop_export_is_unchanged_and_the_paper_style_model(tmp_path, exports, tiny_hf_dir, index_path, topology, tiny_batch):
    default = export_checkpoint(tiny_hf_dir, experts=index_path, out=tmp_path / "default", directions=[(FRA, DEU)], dtype=torch.float32, progress=False)
    for name in ("model.safetensors", "config.json"):
        assert (default / name).read_bytes() == (exports["drop"] / name).read_bytes()
    manifest = read_manifest(exports["drop"])
    assert manifest["policy"] == {"name": "drop"} and manifest["format_version"] == 1
    assert "pruned_routing" not in json.loads((exports["drop"] / "config.json").read_text())
    expected = ef.expected_direction_experts(read_index(index_path), topology, FRA, DEU)
    dropped = load_model(exports["drop"])
    assert dropped.extra_rows() == {}
    restricted = load_model(tiny_hf_dir, experts=expected)  # the paper's: router rows of the kept experts only
    assert torch.equal(logits(dropped, tiny_batch), logits(restricted, tiny_batch))


def _plan(policy, *, tiny_model, index_path, stats_path, topology, directions=(f"{FRA}-{DEU}",)):
    from pruning.export import plan_export

    union = plan_export(read_index(index_path), topology, [tuple(d.split("-")) for d in directions]).union
    return plan_policy(
        policy,
        union=union,
        stats=RoutingStats.load(stats_path),
        directions=list(directions),
        topology=topology,
        router=lambda side, layer: tiny_model.moe_layer(side, layer).router.weight.detach(),
    )


@pytest.mark.parametrize("policy", ["substitute", "merge"])
def test_export_loads_back_as_the_in_memory_policy_model(policy, exports, tiny_model, index_path, stats_path, topology, tiny_batch):
    plan = _plan(policy, tiny_model=tiny_model, index_path=index_path, stats_path=stats_path, topology=topology)
    in_memory = apply_policy(tiny_model, plan)
    exported = load_model(exports[policy])
    assert exported.extra_rows() == plan.extra_rows() and len(plan.extra_rows()) == topology.num_moe_layers
    assert exported.expert_selection() == load_model(exports["drop"]).expert_selection()
    manifest = read_manifest(exports[policy])
    assert manifest["format_version"] == 2 and manifest["policy"]["name"] == policy
    assert manifest["policy"]["statistics"]["sha256"] == __import__("hashlib").sha256(stats_path.read_bytes()).hexdigest()
    assert manifest["policy"]["statistics"]["directions"] == {"enc": [f"{FRA}-{DEU}", f"{FRA}-{ENG}"], "dec": [f"{ENG}-{DEU}", f"{FRA}-{DEU}"]}
    config = json.loads((exports[policy] / "config.json").read_text())
    assert config["pruned_routing"]["layers"]["encoder.3"]["rows"] == list(plan.extra_rows()[("encoder", 3)].ids)
    got = logits(exported, tiny_batch)
    torch.testing.assert_close(got, logits(in_memory, tiny_batch), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, logits(load_model(exports["drop"]), tiny_batch), atol=1e-3), "the policy changes the model"


def test_substitute_routes_as_the_unpruned_model(exports, tiny_model, tiny_batch):
    """The first encoder MoE layer sees the same input in both models: same choices, by original id."""
    seen = {}

    def capture(name):
        def hook(module, inputs, output):
            seen.setdefault(name, output[1])  # (a hook that returns a value replaces the output)

        return hook

    substitute = load_model(exports["substitute"])
    handles = [m.moe_layer("encoder", 3).register_forward_hook(capture(name)) for name, m in (("full", tiny_model), ("sub", substitute))]
    try:
        logits(tiny_model, tiny_batch), logits(substitute, tiny_batch)
    finally:
        for h in handles:
            h.remove()
    real = seen["full"].token_mask
    full_ids = seen["full"].expert_ids[seen["full"].expert_idx][real]
    sub_ids = seen["sub"].expert_ids[seen["sub"].expert_idx][real]
    assert torch.equal(full_ids, sub_ids)
    torch.testing.assert_close(seen["sub"].weights[real], seen["full"].weights[real], rtol=1e-6, atol=1e-7)
    kept = set(substitute.moe_layer("encoder", 3).expert_ids)
    assert not set(full_ids.flatten().tolist()) <= kept, "some tokens go to substituted experts"


def test_exported_merge_weights_are_the_frequency_average(exports, tiny_model, stats_path, topology):
    from safetensors import safe_open

    manifest = read_manifest(exports["merge"])
    assert manifest["policy"]["frequency"] == "routed"
    stats = RoutingStats.load(stats_path)
    routed = sum(stats.counters[d]["enc"]["routed"][0] for d in (f"{FRA}-{DEU}", f"{FRA}-{ENG}"))  # encoder layer 3
    entry = manifest["policy"]["layers"]["encoder.3"]
    full = tiny_model.moe_layer("encoder", 3).experts
    compared = 0
    with safe_open(str(exports["merge"] / "model.safetensors"), framework="pt") as handle:
        for k in manifest["experts"]["encoder.3"]:
            group = [k, *[p for p, q in zip(entry["rows"], entry["to"]) if q == k]]
            f = [float(routed[e]) for e in group]
            if len(group) == 1 or sum(f) == 0:
                continue
            hand = sum(fe * full.fc1_weight[e].double() for fe, e in zip(f, group)) / sum(f)
            stored = handle.get_tensor(f"encoder.layers.3.ffn.experts.expert_{k}.fc1.weight")
            torch.testing.assert_close(stored.double(), hand, rtol=1e-6, atol=1e-6)
            compared += 1
    assert compared >= 2, "kept experts with folded experts must be checked"


def test_translate_and_stats_work_on_policy_exports(exports, tiny_model):
    from pruning.stats.collector import RoutingCollector
    from pruning.translate import DecodingOptions, translate_sentences

    text = fixtures.sentences(2, seed=11)
    for policy in ("substitute", "merge"):
        model = load_model(exports[policy])
        out = translate_sentences(model, text, src=FRA, tgt=DEU, options=DecodingOptions(beam=2, max_length=5))
        assert len(out) == 2
        collector = RoutingCollector(model, num_experts=tiny_model.topology.num_experts)
        tok = model.tokenizer
        tok.src_lang = FRA
        batch = tok(text, return_tensors="pt", padding=True)
        with torch.no_grad():
            model(**batch, decoder_input_ids=batch["input_ids"][:, :3])
        counters = collector.take()
        top1 = counters["enc"]["top1"][0]  # [E] by original id
        kept = model.moe_layer("encoder", 3).expert_ids
        assert float(top1.sum()) == float(batch["attention_mask"].sum())
        assert float(top1[[e for e in range(len(top1)) if e not in kept]].sum()) > 0, "pruned rows are chosen too"


def test_multi_direction_policy_export_masks_only_kept_rows(tmp_path, tiny_hf_dir, index_path, stats_path, tiny_batch):
    out = export_checkpoint(
        tiny_hf_dir,
        experts=index_path,
        out=tmp_path / "multi",
        directions=parse_directions(langs=list(ef.LANGS)),
        dtype=torch.float32,
        progress=False,
        policy="substitute",
        stats=stats_path,
    )
    model = load_model(out)
    model.set_direction(FRA, DEU)
    moe = model.moe_layer("encoder", 3)
    active = moe.router.active.tolist()
    held = moe.expert_ids
    wanted = set(ef.expected_direction_experts(read_index(index_path), model.topology, FRA, DEU)[("encoder", 3)])
    assert active == [e in wanted for e in held] + [True] * len(moe.extra_rows.ids)
    restricted = logits(model, tiny_batch)
    model.set_direction(None)
    assert not torch.allclose(restricted, logits(model, tiny_batch))


# ---- bad input -----------------------------------------------------------------------------------------
def test_policy_errors(tmp_path, tiny_hf_dir, index_path, routing_only_stats, stats_path, exports, capsys):
    common = dict(experts=index_path, directions=[(FRA, DEU)], progress=False)
    with pytest.raises(PolicyError, match=r"--policy must be one of drop, skip, substitute, merge, got 'average'"):
        export_checkpoint(tiny_hf_dir, out=tmp_path / "a", policy="average", stats=stats_path, **common)
    with pytest.raises(PolicyError, match=r"--policy merge needs --stats FILE"):
        export_checkpoint(tiny_hf_dir, out=tmp_path / "b", policy="merge", **common)
    with pytest.raises(PolicyError, match=r"needs the expert-output counters \['out_sum', 'routed'\].*nllb-prune stats \.\.\. --expert-outputs"):
        export_checkpoint(tiny_hf_dir, out=tmp_path / "c", policy="substitute", stats=routing_only_stats, **common)
    # merge works from routing-only statistics: top1 + top2 frequencies, router-row nearest neighbours
    merged = export_checkpoint(tiny_hf_dir, out=tmp_path / "d", policy="merge", stats=routing_only_stats, **common)
    policy = read_manifest(merged)["policy"]
    assert policy["frequency"] == "top1+top2" and {r for e in policy["layers"].values() for r in e["by"]} == {"router"}
    other = synthetic_stats(open_checkpoint(tiny_hf_dir).topology, 16, directions=[f"{ENG}-{FRA}"]).save(tmp_path / "eng-fra.safetensors")
    with pytest.raises(PolicyError, match=r"no encoder statistics for the exported source language\(s\) fra_Latn: it has directions eng_Latn-fra_Latn"):
        export_checkpoint(tiny_hf_dir, out=tmp_path / "e", policy="substitute", stats=other, **common)
    with pytest.raises(ExportError, match=r"itself a pruned export"):
        export_checkpoint(exports["drop"], out=tmp_path / "f", policy="merge", stats=stats_path, **common)
    with pytest.raises(CheckpointError, match=r"loads with all the experts it holds"):
        load_model(exports["substitute"], experts={k: v[:1] for k, v in load_model(exports["drop"]).expert_selection().items()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "eng-fra.safetensors"], "failed exports leave nothing behind"

    args = ["export", "--model", str(tiny_hf_dir), "--experts", str(index_path), "--src", FRA, "--tgt", DEU, "--out", str(tmp_path / "cli")]
    assert main([*args, "--policy", "substitute"]) == 2
    assert "--policy substitute needs --stats FILE" in capsys.readouterr().err
    assert main([*args, "--policy", "merge", "--stats", str(stats_path)]) == 0
    assert "pruned experts: merge (" in capsys.readouterr().out
    assert (tmp_path / "cli" / MANIFEST_NAME).is_file()


# ---- plain transformers (trust_remote_code) -----------------------------------------------------------
REMOTE_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForSeq2SeqLM
paths, out = json.loads(sys.argv[1]), sys.argv[2]
batch = {k: torch.tensor(v) for k, v in json.loads(sys.argv[3]).items()}
results = {}
for policy, path in paths.items():
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=True, dtype=dtype)
        for direction in (("fra_Latn", "deu_Latn"), ("eng_Latn", "fra_Latn"), (None, None)):
            model.set_direction(*direction)
            with torch.no_grad():
                results[f"{policy}/{name}/{direction[0]}-{direction[1]}"] = model(**batch).logits.float()
        model.set_direction("fra_Latn", "deu_Latn")
        results[f"{policy}/{name}/generate"] = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            forced_bos_token_id=4, num_beams=2, max_new_tokens=5, do_sample=False)
assert not [m for m in sys.modules if m == "pruning" or m.startswith("pruning.")], "loaded without nllb-prune"
torch.save(results, out)
"""


def test_policy_exports_load_in_plain_transformers_with_the_same_outputs(tmp_path, tiny_hf_dir, index_path, stats_path, tiny_batch):
    import os
    import subprocess
    import sys

    outs = {
        policy: export_checkpoint(
            tiny_hf_dir,
            experts=index_path,
            out=tmp_path / policy,
            directions=parse_directions(langs=list(ef.LANGS)),
            dtype=torch.float32,
            progress=False,
            policy=policy,
            stats=stats_path,
        )
        for policy in ("skip", "substitute", "merge")
    }
    batch = {k: v.tolist() for k, v in tiny_batch.items()}
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, json.dumps({k: str(v) for k, v in outs.items()}), str(tmp_path / "remote.pt"), json.dumps(batch)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    remote = torch.load(tmp_path / "remote.pt", weights_only=True)
    for policy, out in outs.items():
        for name in ("fp32", "bf16"):
            ours = load_model(out, dtype=name)
            ours.set_dispatch("loop")
            for src, tgt in ((FRA, DEU), (ENG, FRA), (None, None)):
                ours.set_direction(src, tgt)
                expected = logits(ours, tiny_batch).float()
                got = remote[f"{policy}/{name}/{src}-{tgt}"]
                if name == "fp32":
                    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"{policy} {src}-{tgt}")
                else:
                    assert torch.equal(got, expected), f"{policy} bf16 {src}-{tgt}"
            ours.set_direction(FRA, DEU)
            generated = ours.generate(
                input_ids=tiny_batch["input_ids"],
                attention_mask=tiny_batch["attention_mask"],
                forced_bos_token_id=4,
                num_beams=2,
                max_new_tokens=5,
                do_sample=False,
            )
            assert torch.equal(remote[f"{policy}/{name}/generate"], generated), f"{policy} {name} generate"


def test_merge_export_streams(tmp_path, monkeypatch):
    """Loaded checkpoint tensors alive at once stay below one input file + two tensors (a kept expert's and one folded)."""
    from pruning.index import ExpertIndex, write_index

    source = ef.many_file_fairseq(tmp_path, monkeypatch)
    reader = open_checkpoint(source)
    largest_file = max(f.stat().st_size for f in reader.files)
    largest_tensor = max(e.tensor.nbytes for e in reader.entries())
    topology = reader.topology
    kept = [gid for gid in range(topology.num_total_experts) if gid % 4 == 0]
    index = write_index(ExpertIndex.for_all(kept), tmp_path / "kept.json")
    stats = synthetic_stats(topology, 64, directions=[f"{FRA}-{DEU}"]).save(tmp_path / "stats.safetensors")
    tracker = ef.LoadTracker(monkeypatch)
    out = export_checkpoint(
        source, experts=index, out=tmp_path / "merged", dtype=torch.float32, max_shard_bytes=largest_file, progress=False, policy="merge", stats=stats
    )
    print(f"largest file {largest_file} B, largest tensor {largest_tensor} B, checkpoint {reader.total_bytes()} B, peak held {tracker.peak} B")
    assert tracker.peak <= largest_file + 2 * largest_tensor
    assert reader.total_bytes() > 5 * tracker.peak
    assert len(load_model(out).extra_rows()) == topology.num_moe_layers


def test_prune_passes_the_policy_to_its_export(tmp_path, tiny_hf_dir, stats_path, tiny_batch):
    """`prune --policy merge` = select, then the export `export --policy merge` of that selection makes."""
    stats = RoutingStats.load(stats_path)
    for direction, side, name, value in list(stats.items()):
        if name == "top1":  # the synthetic counters have no token counts, which selection needs
            stats.add(direction, side, "tokens", value.sum(-1))
    stats_path = stats.save(tmp_path / "stats.safetensors")
    out = tmp_path / "pruned"
    flags = [
        "--model",
        str(tiny_hf_dir),
        "--stats",
        str(stats_path),
        "--src",
        FRA,
        "--tgt",
        DEU,
        "--ratio",
        "0.5",
        "--min-per-layer",
        "1",
        "--dtype",
        "fp32",
        "--out",
        str(out),
    ]
    assert main(["prune", *flags, "--policy", "merge"]) == 0
    manifest = read_manifest(out)
    assert manifest["policy"]["name"] == "merge"
    again = export_checkpoint(
        tiny_hf_dir,
        experts=out / "experts.json",
        out=tmp_path / "export",
        directions=[(FRA, DEU)],
        dtype=torch.float32,
        progress=False,
        policy="merge",
        stats=stats_path,
    )
    torch.testing.assert_close(logits(load_model(out), tiny_batch), logits(load_model(again), tiny_batch), rtol=0, atol=0)
    with pytest.raises(SystemExit) as refused:  # argparse refuses a policy outside its choices
        main(["prune", *flags[:-1], str(tmp_path / "bad"), "--policy", "fold"])
    assert refused.value.code == 2 and not (tmp_path / "bad").exists()


def test_info_names_the_policy_of_an_export(exports, capsys):
    for policy, expected in (("drop", "drop (router rows removed"), ("substitute", "substitute ("), ("merge", "merge (")):
        assert main(["info", str(exports[policy])]) == 0
        line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("pruned as"))
        assert expected in line, line


def test_skip_is_the_full_model_with_the_pruned_experts_silenced(tmp_path, tiny_hf_dir, index_path, tiny_batch):
    """`--policy skip` needs no statistics and equals the unpruned model whose pruned experts output exactly 0."""
    out = tmp_path / "skip"
    flags = ["--model", str(tiny_hf_dir), "--experts", str(index_path), "--src", FRA, "--tgt", DEU, "--dtype", "fp32", "--out", str(out)]
    assert main(["export", *flags, "--policy", "skip"]) == 0
    skip, silenced = load_model(out), load_model(tiny_hf_dir, dtype="fp32")
    kept = skip.expert_selection()
    with torch.no_grad():  # zero weights and biases: relu(0) = 0, so the expert's output is exactly 0
        for side, layer, moe in silenced.moe_layers():
            for e in sorted(set(range(moe.experts.num_experts)) - set(kept[(side, layer)])):
                for name in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
                    getattr(moe.experts, name)[e].zero_()
    assert sum(len(v) for v in kept.values()) < silenced.topology.num_total_experts
    torch.testing.assert_close(logits(skip, tiny_batch), logits(silenced, tiny_batch), rtol=1e-5, atol=1e-5)
    manifest = read_manifest(out)
    assert manifest["policy"]["name"] == "skip" and "statistics" not in manifest["policy"]
    # the in-memory model the studies use (plan_policy + apply_policy, no statistics) is the export
    from pruning.export import plan_export

    full = load_model(tiny_hf_dir, dtype="fp32")
    union = plan_export(read_index(index_path), full.topology, [(FRA, DEU)]).union
    plan = plan_policy(
        "skip",
        union=union,
        stats=None,
        directions=[f"{FRA}-{DEU}"],
        topology=full.topology,
        router=lambda side, layer: full.moe_layer(side, layer).router.weight.detach(),
    )
    torch.testing.assert_close(logits(apply_policy(full, plan), tiny_batch), logits(skip, tiny_batch), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(logits(skip, tiny_batch), logits(load_model(tiny_hf_dir, dtype="fp32"), tiny_batch), atol=1e-3)


def test_multi_direction_skip_silences_what_each_direction_does_not_keep(tmp_path, tiny_hf_dir, index_path, tiny_batch):
    """In a skip export serving several directions, each direction equals the unpruned model whose experts
    outside that direction's own set output exactly 0 (union experts included), not a re-routed model."""
    from pruning.manifest import direction_experts

    out = export_checkpoint(
        tiny_hf_dir,
        experts=index_path,
        out=tmp_path / "skip",
        directions=parse_directions(langs=list(ef.LANGS)),
        dtype=torch.float32,
        progress=False,
        policy="skip",
    )
    skip = load_model(out)
    silenced_somewhere = False
    for src, tgt in ((FRA, DEU), (ENG, FRA)):
        keep = direction_experts(skip.manifest, src, tgt)
        reference = load_model(tiny_hf_dir, dtype="fp32")
        with torch.no_grad():
            for side, layer, moe in reference.moe_layers():
                for e in sorted(set(range(moe.experts.num_experts)) - set(keep[(side, layer)])):
                    for name in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
                        getattr(moe.experts, name)[e].zero_()
        skip.set_direction(src, tgt)
        silenced_somewhere |= any(moe.silenced is not None for *_, moe in skip.moe_layers())
        assert all(moe.router.active is None for *_, moe in skip.moe_layers()), "skip never masks the routing"
        torch.testing.assert_close(logits(skip, tiny_batch), logits(reference, tiny_batch), rtol=1e-5, atol=1e-5, msg=f"{src}-{tgt}")
    assert silenced_somewhere, "the union holds experts a direction does not keep"
    skip.set_direction(None)
    assert all(moe.silenced is None for *_, moe in skip.moe_layers())
