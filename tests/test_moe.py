"""Our MoE layer against a naive per-token reference written from the fairseq semantics, and against
the stock transformers 4.57 layer (correct but slow), over awkward cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pruning.model.moe import MoeLayer, Routing, token_mask_from_attention

D, FFN = 8, 12


def make_layer(num_experts: int, *, seed: int = 0, capacity_fraction: float = 1.0, expert_ids=None) -> MoeLayer:
    ids = list(range(num_experts)) if expert_ids is None else expert_ids
    layer = MoeLayer(d_model=D, ffn_dim=FFN, expert_ids=ids, eom=0.2, capacity_fraction=capacity_fraction)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return layer.eval()


def reference(layer: MoeLayer, x: torch.Tensor, real: torch.Tensor, *, eom: float = 0.2) -> torch.Tensor:
    """Token by token, in float64: fp32-style router, top-2, capacity queue, renormalised weights."""
    x = x.double()
    wg = layer.router.weight.detach().double()
    n_tokens, n_experts = x.shape[0], wg.shape[0]
    capacity = math.ceil(layer.router.capacity_fraction * n_tokens)
    choices = []
    for t in range(n_tokens):
        logits = [float(x[t] @ wg[e]) for e in range(n_experts)]
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        probs = [v / sum(exps) for v in exps]
        first = max(range(n_experts), key=lambda e: (probs[e], -e))
        second = max((e for e in range(n_experts) if e != first), key=lambda e: (logits[e], -e)) if n_experts > 1 else None
        choices.append((first, second, probs))
    queue = [0] * n_experts
    kept = [[False, False] for _ in range(n_tokens)]
    for k in (0, 1):  # all first choices in token order, then all second choices
        for t in range(n_tokens):
            expert = choices[t][k]
            if not real[t] or expert is None:
                continue
            if queue[expert] < capacity:
                kept[t][k] = True
            queue[expert] += 1
    out = torch.zeros_like(x)
    W1, B1 = layer.experts.fc1_weight.detach().double(), layer.experts.fc1_bias.detach().double()
    W2, B2 = layer.experts.fc2_weight.detach().double(), layer.experts.fc2_bias.detach().double()
    for t in range(n_tokens):
        first, second, probs = choices[t]
        gates = [probs[first] if kept[t][0] else 0.0, probs[second] if second is not None and kept[t][1] else 0.0]
        denom = max(sum(gates), torch.finfo(torch.float32).eps)
        for k, expert in enumerate((first, second)):
            if gates[k] == 0.0:
                continue
            h = torch.relu(W1[expert] @ x[t] + B1[expert])
            out[t] += (gates[k] / denom) * (1 - eom) * (W2[expert] @ h + B2[expert])
    return out


CASES = {
    "one_token": dict(experts=4, batch=1, seq=1, pad=0),
    "four_experts": dict(experts=4, batch=2, seq=5, pad=0),
    "padding": dict(experts=16, batch=3, seq=7, pad=3),
    "many_experts_few_tokens": dict(experts=128, batch=1, seq=6, pad=0),  # most experts get no token
    "capacity_drops": dict(experts=6, batch=4, seq=8, pad=2, capacity=0.1),
    "capacity_mid": dict(experts=5, batch=2, seq=9, pad=1, capacity=0.3),
    "single_expert": dict(experts=1, batch=2, seq=3, pad=0),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_layer_matches_per_token_reference(name):
    case = CASES[name]
    layer = make_layer(case["experts"], seed=len(name), capacity_fraction=case.get("capacity", 1.0))
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(case["batch"], case["seq"], D, generator=g)
    mask = torch.ones(case["batch"], case["seq"], dtype=torch.long)
    if case["pad"]:
        mask[0, -case["pad"] :] = 0
    with torch.no_grad():
        out, routing = layer(hidden, mask)
    real = mask.reshape(-1).bool()
    expected = reference(layer, hidden.reshape(-1, D), real)
    torch.testing.assert_close(out.reshape(-1, D).double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.all(out.reshape(-1, D)[~real] == 0), "padding tokens must be routed nowhere"
    if case.get("capacity", 1.0) < 1.0:
        assert (~routing.dispatched[real]).any(), "this case is meant to drop assignments"


def test_routing_reaches_many_experts():
    """Inputs must route past experts 0 and 1 (the 5.x bug would pass a 2-expert test)."""
    layer = make_layer(32)
    hidden = torch.randn(4, 16, D, generator=torch.Generator().manual_seed(3))
    calls: list[int] = []
    original = layer.experts.expert_forward

    def spy(e, x):
        calls.append(e)
        return original(e, x)

    layer.experts.expert_forward = spy  # type: ignore[method-assign]
    with torch.no_grad():
        out, routing = layer(hidden, None)
    assert len(set(calls)) > 10
    assert set(calls) == set(routing.expert_idx.reshape(-1).tolist())
    torch.testing.assert_close(out.reshape(-1, D).double(), reference(layer, hidden.reshape(-1, D), torch.ones(64, dtype=torch.bool)), rtol=1e-5, atol=1e-5)


def test_subset_equals_full_layer_without_other_router_rows():
    full = make_layer(12, seed=5)
    keep = [1, 4, 5, 9, 11]
    sub = MoeLayer(d_model=D, ffn_dim=FFN, expert_ids=keep, eom=0.2).eval()
    with torch.no_grad():
        sub.router.weight.copy_(full.router.weight[keep])
        for name in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
            getattr(sub.experts, name).copy_(getattr(full.experts, name)[keep])
    hidden = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        out_sub, routing_sub = sub(hidden, None)
        full.router.active = torch.zeros(12, dtype=torch.bool)
        full.router.active[keep] = True
        out_masked, routing_masked = full(hidden, None)
    torch.testing.assert_close(out_sub, out_masked, rtol=1e-5, atol=1e-5)
    assert routing_sub.expert_ids.tolist() == keep
    # the reference computes the subset's softmax over the kept rows only
    expected = reference(sub, hidden.reshape(-1, D), torch.ones(12, dtype=torch.bool))
    torch.testing.assert_close(out_sub.reshape(-1, D).double(), expected, rtol=1e-5, atol=1e-5)


def test_router_stays_fp32_in_bf16_and_routes_like_fp32():
    layer = make_layer(16, seed=2)
    hidden = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, routing32 = layer(hidden, None)
        layer_bf16 = layer.to(torch.bfloat16)
        assert layer_bf16.router.weight.dtype == torch.float32
        assert layer_bf16.experts.fc1_weight.dtype == torch.bfloat16
        _, routing16 = layer_bf16(hidden.to(torch.bfloat16), None)
    assert routing16.probs.dtype == torch.float32
    # the same bf16-rounded input through the fp32 router gives the same decisions and probabilities
    reference_layer = make_layer(16, seed=2)
    with torch.no_grad():
        _, routing_rounded = reference_layer(hidden.to(torch.bfloat16).float(), None)
    assert torch.equal(routing16.expert_idx, routing_rounded.expert_idx)
    torch.testing.assert_close(routing16.probs, routing_rounded.probs, rtol=0, atol=0)
    assert (routing16.expert_idx == routing32.expert_idx).float().mean() > 0.9, "bf16 rounding of the input flips few choices"


def test_matches_stock_transformers_457_layer():
    """transformers 4.57's NllbMoeSparseMLP is correct (and slow): a second, independent oracle."""
    from transformers import NllbMoeConfig
    from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeSparseMLP

    config = NllbMoeConfig(d_model=D, num_experts=16, expert_capacity=None, moe_token_dropout=0.2, moe_eval_capacity_token_fraction=1.0)
    stock = NllbMoeSparseMLP(config, ffn_dim=FFN).eval()
    ours = make_layer(16, seed=11)
    with torch.no_grad():
        stock.router.classifier.weight.copy_(ours.router.weight)
        for e in range(16):
            expert = stock.experts[f"expert_{e}"]
            expert.fc1.weight.copy_(ours.experts.fc1_weight[e])
            expert.fc1.bias.copy_(ours.experts.fc1_bias[e])
            expert.fc2.weight.copy_(ours.experts.fc2_weight[e])
            expert.fc2.bias.copy_(ours.experts.fc2_bias[e])
    hidden = torch.randn(3, 6, D, generator=torch.Generator().manual_seed(4))
    pad = torch.ones(3, 6, dtype=torch.long)
    pad[1, 4:] = 0
    additive = (1.0 - pad[:, None, None, :].float()).expand(3, 1, 6, 6) * torch.finfo(torch.float32).min
    with torch.no_grad():
        expected, _ = stock(hidden, additive)
        out, _ = ours(hidden, additive)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_training_mode_masks_whole_tokens_without_rescaling():
    layer = make_layer(8, seed=1).train()
    hidden = torch.randn(1, 400, D, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with torch.no_grad():
        out, _ = layer(hidden, None)
        layer.eval()
        ref, _ = layer(hidden, None)
    out, ref = out.reshape(-1, D), ref.reshape(-1, D) / 0.8
    zeroed = (out == 0).all(dim=1)
    assert 0.1 < zeroed.float().mean() < 0.3  # p = 0.2 per token
    torch.testing.assert_close(out[~zeroed], ref[~zeroed], rtol=1e-5, atol=1e-5)  # no 1/(1-p) rescale


@pytest.mark.parametrize(
    "mask, expected",
    [
        (None, [1, 1, 1, 1, 1, 1]),
        (torch.tensor([[1, 1, 0], [1, 1, 1]]), [1, 1, 0, 1, 1, 1]),
    ],
)
def test_token_mask_from_2d_and_none(mask, expected):
    got = token_mask_from_attention(mask, batch=2, seq=3, device=torch.device("cpu"))
    assert got.long().tolist() == expected


def test_token_mask_from_4d_causal_decoder_mask_with_cache():
    # 2 sequences, 1 new token each, 4 keys in cache: sequence 1's newest token is padding
    additive = torch.zeros(2, 1, 1, 4)
    additive[1, 0, 0, 3] = torch.finfo(torch.float32).min
    got = token_mask_from_attention(additive, batch=2, seq=1, device=torch.device("cpu"))
    assert got.tolist() == [True, False]


def test_routing_is_data():
    layer = make_layer(8)
    hidden = torch.randn(1, 4, D)
    with torch.no_grad():
        _, routing = layer(hidden, None)
    assert isinstance(routing, Routing)
    assert routing.expert_idx.shape == (4, 2) and routing.probs.shape == (4, 8)
    torch.testing.assert_close(routing.probs.sum(-1), torch.ones(4))
    assert (routing.expert_idx[:, 0] != routing.expert_idx[:, 1]).all()
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(4))
    assert torch.equal(routing.expert_idx[:, 0], F.softmax(routing.logits, -1).argmax(-1))


# ---- the grouped-GEMM dispatch -------------------------------------------------------------------
from pruning.model import moe as moe_module  # noqa: E402

GROUPED_CASES = {
    "one_token": dict(experts=4, batch=1, seq=1, pad=0),
    "padding": dict(experts=16, batch=3, seq=7, pad=4),
    "empty_experts": dict(experts=128, batch=1, seq=5, pad=0),
    "capacity_drops": dict(experts=6, batch=4, seq=8, pad=2, capacity=0.1),
    "subset": dict(experts=9, batch=2, seq=6, pad=1, ids=[3, 9, 17, 20, 33, 40, 41, 90, 127]),
}


def _grouped_equals_loop(name: str, dtype: torch.dtype, device: torch.device) -> None:
    case = GROUPED_CASES[name]
    width, ffn = 16, 32  # rows must be multiples of 16 bytes for torch._grouped_mm
    layer = MoeLayer(d_model=width, ffn_dim=ffn, expert_ids=case.get("ids", list(range(case["experts"]))), capacity_fraction=case.get("capacity", 1.0)).eval()
    g = torch.Generator().manual_seed(len(name))
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    layer = layer.to(device=device, dtype=dtype)
    hidden = torch.randn(case["batch"], case["seq"], width, generator=g).to(device=device, dtype=dtype)
    mask = torch.ones(case["batch"], case["seq"], dtype=torch.long, device=device)
    if case["pad"]:
        mask[-1, -case["pad"] :] = 0
    with torch.no_grad():
        layer.dispatch = moe_module.sorted_loop_dispatch
        expected, _ = layer(hidden, mask)
        layer.dispatch = moe_module.grouped_mm_dispatch
        got, _ = layer(hidden, mask)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:  # bf16 operands: compare by relative norm (accumulation order differs between the paths)
        error = (got.double() - expected.double()).norm() / expected.double().norm()
        assert error < 1e-2, f"relative error {error:.2e}"
    assert torch.all(got.reshape(-1, width)[~mask.reshape(-1).bool()] == 0)


@pytest.mark.parametrize("name", sorted(GROUPED_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_dispatch_equals_reference_layer(name, dtype):
    _grouped_equals_loop(name, dtype, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(GROUPED_CASES))
def test_cuda_grouped_gemm_equals_the_loop(name):
    """The CUDA grouped GEMM (bf16; sm_90+ for torch._grouped_mm), the path `--dispatch auto` takes on a Hopper GPU."""
    device = torch.device("cuda")
    ok, why = moe_module.grouped_mm_supported(device=device, dtype=torch.bfloat16, d_model=16, ffn_dim=32)
    if not ok:
        pytest.skip(why)
    _grouped_equals_loop(name, torch.bfloat16, device)


def test_auto_dispatch_falls_back_where_grouped_gemm_is_unavailable(monkeypatch):
    cpu = torch.device("cpu")
    assert moe_module.choose_dispatch("auto", device=cpu, dtype=torch.float32, d_model=16, ffn_dim=32)[0] == "grouped"
    # rows that are not 16-byte multiples
    name, why = moe_module.choose_dispatch("auto", device=cpu, dtype=torch.float32, d_model=6, ffn_dim=32)
    assert name == "loop" and "16 bytes" in why
    with pytest.raises(ValueError, match="unavailable"):
        moe_module.choose_dispatch("grouped", device=cpu, dtype=torch.float32, d_model=6, ffn_dim=32)
    # an older GPU, or a torch without the op
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert moe_module.choose_dispatch("auto", device=torch.device("cuda"), dtype=torch.bfloat16, d_model=2048, ffn_dim=8192)[0] == "loop"
    monkeypatch.delattr(torch, "_grouped_mm")
    assert moe_module.choose_dispatch("auto", device=cpu, dtype=torch.float32, d_model=16, ffn_dim=32)[0] == "loop"
    with pytest.raises(ValueError, match="must be one of"):
        moe_module.choose_dispatch("fast", device=cpu, dtype=torch.float32, d_model=16, ffn_dim=32)


def test_model_level_dispatch_choice_gives_same_logits(tiny_hf_dir, tiny_batch):
    from pruning import load_model

    grouped = load_model(tiny_hf_dir)
    assert grouped.dispatch_name == "grouped"
    loop = load_model(tiny_hf_dir, dispatch="loop")
    with torch.no_grad():
        torch.testing.assert_close(grouped(**tiny_batch).logits, loop(**tiny_batch).logits, rtol=1e-5, atol=1e-5)


def test_no_expert_floor_equals_zeroed_fc2(tiny_model, tiny_batch):
    """``set_no_experts``: the same logits as the model with every expert's fc2 weight and bias set to 0."""
    import copy

    zeroed = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for _, _, moe in zeroed.moe_layers():
            moe.experts.fc2_weight.zero_()
            moe.experts.fc2_bias.zero_()
        full = tiny_model(**tiny_batch).logits
        expected = zeroed(**tiny_batch).logits
        tiny_model.set_no_experts(True)
        try:
            floor = tiny_model(**tiny_batch).logits
            assert tiny_model.no_experts
        finally:
            tiny_model.set_no_experts(False)
        assert torch.equal(floor, expected) and not torch.allclose(floor, full)
        assert torch.equal(tiny_model(**tiny_batch).logits, full) and not tiny_model.no_experts
