"""Quantized experts and dense layers (``export --quantize``): formats against hand-written formulas, the MoE
layer against the naive per-token reference run on dequantized fp64 weights, exports of every policy
against float exports, both loaders, the plan's bytes against real files, and the bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pruning import load_model
from pruning.cli import main
from pruning.export import export_checkpoint, parse_directions
from pruning.model.moe import DISPATCHES, MoeLayer
from pruning.model.quantized import QuantizedStackedExperts, dequantized_grouped_dispatch, set_kernel
from pruning.quant import QuantError, QuantSpec, pack_int4, quantize_int4, quantize_int8, unpack_int4
from tests import export_fixtures as ef
from tests.test_moe import CASES, reference

FRA, DEU, ENG = ef.LANGS
GROUP = 8  # the tiny fixture's d_model is 16


# ---- independent dequantization (hand-written from the format's definition) -------------------------------
def nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> int64 [..., K]: even column = low nibble, odd column = high nibble."""
    out = torch.zeros(*packed.shape[:-1], packed.shape[-1] * 2, dtype=torch.int64)
    out[..., 0::2] = packed.long() % 16
    out[..., 1::2] = packed.long() // 16
    return out


def by_hand(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None = None) -> torch.Tensor:
    """fp64 weights [N, K] from stored codes: int8 q * scale[n]; int4 q * scale[n, g] + min[n, g]."""
    if q.dtype == torch.int8:
        return q.double() * scale.double()[:, None]
    codes = nibbles(q).double()
    group = codes.shape[1] // scale.shape[1]
    return codes * scale.double().repeat_interleave(group, dim=1) + minimum.double().repeat_interleave(group, dim=1)


# ---- formats -----------------------------------------------------------------------------------------------
SHAPES = [(1, 2), (3, 8), (7, 16), (5, 24)]


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_codes_are_within_half_a_step_and_keep_each_rows_largest_weight(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.05
    w[0] = 0.0  # an all-zero row
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (shape[0],)
    assert int(q.abs().max()) <= 127
    back = by_hand(q, scale)
    assert torch.all((back - w.double()).abs() <= scale.double()[:, None] / 2 * (1 + 1e-6))
    assert torch.equal(back[0], torch.zeros(shape[1], dtype=torch.float64))
    rows = torch.arange(1, shape[0])
    largest = w[1:].abs().argmax(dim=1)
    torch.testing.assert_close(back[rows, largest], w[rows, largest].double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("group", [2, 8])
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_int4_codes_are_within_half_a_group_step_and_constant_groups_are_exact(shape, group):
    if shape[1] % group:
        pytest.skip("group does not divide the width")
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    w[0, :group] = 0.37  # a constant group
    q, scale, minimum = quantize_int4(w, group)
    assert q.dtype == torch.uint8 and q.shape == (shape[0], shape[1] // 2)
    assert scale.shape == minimum.shape == (shape[0], shape[1] // group)
    back = by_hand(q, scale, minimum)
    step = scale.double().repeat_interleave(group, dim=1)
    assert torch.all((back - w.double()).abs() <= step / 2 + 1e-6)
    torch.testing.assert_close(back[0, :group], torch.full((group,), 0.37, dtype=torch.float64))
    # every group's minimum and maximum are representable: code 0 and code 15
    codes = nibbles(q).reshape(shape[0], -1, group)
    varying = scale != 1
    assert torch.all(codes.amin(-1)[varying] == 0) and torch.all(codes.amax(-1)[varying] == 15)


def test_int4_packing_puts_the_even_column_in_the_low_nibble():
    q = torch.tensor([[1, 2, 3, 4], [15, 0, 0, 15]], dtype=torch.uint8)
    assert pack_int4(q).tolist() == [[0x21, 0x43], [0x0F, 0xF0]]
    assert torch.equal(unpack_int4(pack_int4(q)), q)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scheme="int3"), "--quantize must be one of int8, int4, got 'int3'"),
        (dict(scheme="int4", group_size=7), "--group-size must be an even integer >= 2 for int4, got 7"),
        (dict(scheme="int8", group_size=64), "--group-size applies to int4 only"),
        (dict(scheme="int8", targets=("dense",)), "targets must be 'experts' and optionally 'dense'"),
    ],
)
def test_bad_specs_name_the_flag_and_the_value(kwargs, message):
    with pytest.raises(QuantError, match=message.replace("(", r"\(").replace(")", r"\)")):
        QuantSpec(**kwargs)


def test_group_size_must_divide_every_quantized_width():
    with pytest.raises(QuantError, match="--group-size 128 must divide .* 16 input features"):
        QuantSpec.make("int4").stored("encoder.layers.3.ffn.experts.expert_0.fc1.weight", (32, 16))


# ---- the MoE layer ---------------------------------------------------------------------------------------------
def quantized_copy(layer: MoeLayer, spec: QuantSpec) -> tuple[MoeLayer, MoeLayer]:
    """(``layer`` with quantized experts, a float copy holding the hand-dequantized weights)."""
    FFN, D = layer.experts.fc1_weight.shape[1:]
    quantized = MoeLayer(d_model=D, ffn_dim=FFN, expert_ids=layer.expert_ids, eom=layer.eom, capacity_fraction=layer.router.capacity_fraction).eval()
    quantized.load_state_dict(layer.state_dict())
    quantized.experts = QuantizedStackedExperts(num_experts=layer.experts.num_experts, d_model=D, ffn_dim=FFN, spec=spec)
    dequantized = MoeLayer(d_model=D, ffn_dim=FFN, expert_ids=layer.expert_ids, eom=layer.eom, capacity_fraction=layer.router.capacity_fraction).eval()
    dequantized.load_state_dict(layer.state_dict())
    from pruning.quant import quantize

    with torch.no_grad():
        for linear in ("fc1", "fc2"):
            parts = quantize(getattr(layer.experts, f"{linear}_weight"), spec)
            for suffix, value in parts.items():
                getattr(quantized.experts, f"{linear}_weight{suffix}").copy_(value)
            getattr(quantized.experts, f"{linear}_bias").copy_(getattr(layer.experts, f"{linear}_bias"))
            for e in range(layer.experts.num_experts):
                hand = by_hand(parts[""][e], parts["_scale"][e], parts["_min"][e] if "_min" in parts else None)
                getattr(dequantized.experts, f"{linear}_weight")[e].copy_(hand)
    return quantized, dequantized


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dispatch", ["loop", "grouped"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_quantized_layer_matches_the_per_token_reference_on_dequantized_weights(name, dispatch, scheme):
    from tests.test_moe import D, make_layer

    case = CASES[name]
    layer = make_layer(case["experts"], seed=3, capacity_fraction=case.get("capacity", 1.0))
    quantized, dequantized = quantized_copy(layer, QuantSpec.make(scheme, group_size=4 if scheme == "int4" else None))
    quantized.dispatch = dequantized_grouped_dispatch if dispatch == "grouped" else DISPATCHES["loop"]
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(case["batch"], case["seq"], D, generator=g)
    mask = torch.ones(case["batch"], case["seq"], dtype=torch.long)
    if case["pad"]:
        mask[0, -case["pad"] :] = 0
    with torch.no_grad():
        out, _ = quantized(hidden, mask)
    expected = reference(dequantized, hidden.reshape(-1, D), mask.reshape(-1).bool())
    torch.testing.assert_close(out.reshape(-1, D).double(), expected, rtol=1e-5, atol=1e-5)
    # and quantization did change the weights (the test would pass for float experts otherwise)
    assert not torch.allclose(dequantized.experts.fc1_weight, layer.experts.fc1_weight)


@pytest.mark.parametrize("kernel", [True, False])
def test_bf16_quantized_layer_stays_close_to_the_fp64_reference(kernel, monkeypatch):
    """bf16 activations: torch's int8 kernel (or dequantize-then-matmul) against the fp64 reference."""
    D, FFN = 16, 48  # the kernel takes input widths that are multiples of 16
    layer = MoeLayer(d_model=D, ffn_dim=FFN, expert_ids=list(range(6))).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    quantized, dequantized = quantized_copy(layer, QuantSpec.make("int8"))
    scales = quantized.experts.fc1_weight_scale.detach().clone()
    quantized = quantized.to(torch.bfloat16)
    assert quantized.experts.fc1_weight.dtype == torch.int8 and torch.equal(quantized.experts.fc1_weight_scale, scales)  # not rounded through bf16
    assert quantized.router.weight.dtype == torch.float32
    set_kernel(quantized, kernel)
    calls = []
    kernel_fn = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(1) or kernel_fn(*a))
    hidden = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out, _ = quantized(hidden.bfloat16(), None)
    assert bool(calls) == kernel
    expected = reference(dequantized, hidden.bfloat16().double().reshape(-1, D), torch.ones(18, dtype=torch.bool))
    scale = expected.abs().max()
    assert (out.reshape(-1, D).double() - expected).abs().max() < 0.03 * scale


# ---- exports -----------------------------------------------------------------------------------------------------
def export(source: Path, out: Path, index: Path, *, langs=(FRA, DEU), **kwargs) -> Path:
    return export_checkpoint(source, experts=index, out=out, directions=parse_directions(langs=list(langs)), dtype=torch.float32, progress=False, **kwargs)


def stored(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


def dequantized_export(float_dir: Path, quant_dir: Path, out: Path) -> Path:
    """A float export equal to ``float_dir`` with every quantized weight of ``quant_dir`` dequantized by hand."""
    import shutil

    shutil.copytree(float_dir, out)
    tensors, quantized = stored(float_dir), stored(quant_dir)
    for name in list(tensors):
        if name + "_scale" in quantized:
            tensors[name] = by_hand(quantized[name], quantized[name + "_scale"], quantized.get(name + "_min")).to(tensors[name].dtype)
    for shard in out.glob("*.safetensors"):
        shard.unlink()
    from safetensors.torch import save_file

    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    index = out / "model.safetensors.index.json"
    if index.exists():
        index.unlink()
    manifest = json.loads((out / "pruning_manifest.json").read_text())
    manifest["weights"] = {}
    (out / "pruning_manifest.json").write_text(json.dumps(manifest))
    return out


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


SPECS = {
    "int8": QuantSpec.make("int8"),
    "int8-dense": QuantSpec.make("int8", dense=True),
    "int4": QuantSpec.make("int4", group_size=GROUP),
    "int4-dense": QuantSpec.make("int4", dense=True, group_size=GROUP),
}


@pytest.fixture(scope="module")
def float_export(tmp_path_factory, tiny_hf_dir, index_path) -> Path:
    return export(tiny_hf_dir, tmp_path_factory.mktemp("float") / "e", index_path)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_quantized_export_stores_codes_and_fp32_scales_and_loads_as_its_dequantized_weights(name, tmp_path, tiny_hf_dir, index_path, float_export, tiny_batch):
    spec = SPECS[name]
    out = export(tiny_hf_dir, tmp_path / name, index_path, quantize=spec)
    tensors = stored(out)
    codes = {n for n in tensors if n + "_scale" in tensors}
    assert all(".experts." in n for n in codes) != spec.dense
    assert any(".self_attn.q_proj.weight" in n for n in codes) == spec.dense
    assert not any("shared" in n or "router" in n or n.endswith("bias") for n in codes)
    assert {tensors[n].dtype for n in codes} == {torch.int8 if spec.scheme == "int8" else torch.uint8}
    assert {tensors[n + "_scale"].dtype for n in codes} == {torch.float32}
    assert {t.dtype for n, t in tensors.items() if "router" in n} == {torch.float32}
    manifest = json.loads((out / "pruning_manifest.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert manifest["format_version"] == 3 and manifest["quantization"] == config["pruned_quantization"] == spec.record()
    # the quantized export computes what a float export holding its hand-dequantized weights computes
    reference_dir = dequantized_export(float_export, out, tmp_path / "dequantized")
    for direction in ((FRA, DEU), (DEU, FRA)):
        got_model, want_model = load_model(out, dtype="fp32"), load_model(reference_dir, dtype="fp32")
        for model in (got_model, want_model):
            model.set_direction(*direction)
        torch.testing.assert_close(logits(got_model, tiny_batch), logits(want_model, tiny_batch), rtol=1e-5, atol=1e-5)
    # and quantization changed them
    assert not torch.allclose(logits(load_model(float_export, dtype="fp32"), tiny_batch), logits(got_model, tiny_batch))


def test_quantized_export_is_smaller_and_info_counts_its_weights(tmp_path, tiny_hf_dir, index_path, float_export, capsys):
    out = export(tiny_hf_dir, tmp_path / "q", index_path, quantize=SPECS["int4-dense"])
    from pruning.info import describe_checkpoint

    q, f = describe_checkpoint(out), describe_checkpoint(float_export)
    assert q["params"] == f["params"]  # codes count as the weights they stand for, scales as none
    D, F = q["topology"]["d_model"], q["topology"]["ffn_dim"]
    per_expert = 2 * (F * D // 2 + F * D // GROUP * 2 * 4) + (F + D) * 4  # codes, fp32 scale + min per group, fp32 biases
    assert q["bytes"]["experts"] == q["experts_kept"] * per_expert
    assert f["bytes"]["experts"] == q["experts_kept"] * (2 * F * D + F + D) * 4
    assert main(["info", str(out)]) == 0
    assert "quantized    int4 (groups of 8, fp32 scales) on the experts and dense linear layers" in capsys.readouterr().out


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_bf16_load_keeps_codes_and_scales_and_runs_both_dispatches(scheme, tmp_path, tiny_hf_dir, index_path, tiny_batch):
    out = export(tiny_hf_dir, tmp_path / scheme, index_path, quantize=SPECS[f"{scheme}-dense"])
    model = load_model(out, dtype="bf16")
    assert model.dispatch_name == "loop"  # auto: one expert dequantized at a time
    dtypes = {n.rsplit(".", 1)[-1]: p.dtype for n, p in model.named_parameters() if "layers.3.ffn.experts" in n or "layers.0.self_attn.q_proj" in n}
    assert dtypes["fc1_weight"] == dtypes["weight"] == (torch.int8 if scheme == "int8" else torch.uint8)
    assert dtypes["fc1_weight_scale"] == dtypes["weight_scale"] == torch.float32 and dtypes["fc1_bias"] == torch.bfloat16
    model.set_direction(FRA, DEU)
    loop = logits(model, tiny_batch).float()
    model.set_dispatch("grouped")
    grouped = logits(model, tiny_batch).float()
    fp32 = load_model(out, dtype="fp32")
    fp32.set_direction(FRA, DEU)
    exact = logits(fp32, tiny_batch)
    for got in (loop, grouped):
        assert (got - exact).abs().max() < 0.05 * exact.abs().max()


@pytest.mark.parametrize("policy", ["skip", "substitute", "merge"])
def test_quantization_composes_with_every_policy(policy, tmp_path, tiny_hf_dir, index_path, tiny_batch, policy_stats_file):
    """Quantized after the policy's transform: each stored weight is within half a step of the float export's."""
    stats = policy_stats_file if policy != "skip" else None
    float_dir = export(tiny_hf_dir, tmp_path / "float", index_path, policy=policy, stats=stats)
    out = export(tiny_hf_dir, tmp_path / "q", index_path, policy=policy, stats=stats, quantize=SPECS["int8"])
    tensors, floats = stored(out), stored(float_dir)
    assert set(floats) <= set(tensors)
    for name, value in floats.items():
        if name + "_scale" in tensors:
            bound = tensors[name + "_scale"].double()[:, None] / 2 * (1 + 1e-6)
            assert torch.all((by_hand(tensors[name], tensors[name + "_scale"]) - value.double()).abs() <= bound), name
        else:
            assert torch.equal(tensors[name], value), name  # routers, biases, constant outputs untouched
    manifest = json.loads((out / "pruning_manifest.json").read_text())
    assert manifest["policy"]["name"] == policy and manifest["format_version"] == 3
    reference_dir = dequantized_export(float_dir, out, tmp_path / "dequantized")
    got, want = load_model(out, dtype="fp32"), load_model(reference_dir, dtype="fp32")
    for model in (got, want):
        model.set_direction(FRA, DEU)
    torch.testing.assert_close(logits(got, tiny_batch), logits(want, tiny_batch), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def policy_stats_file(tmp_path_factory, topology, tiny_model) -> Path:
    """Synthetic routing statistics with expert outputs (tests/test_policy.py), plus the token counts selection needs."""
    from tests.test_policy import synthetic_stats

    stats = synthetic_stats(topology, tiny_model.config.d_model)
    for direction, side, name, value in list(stats.items()):
        if name == "top1":
            stats.add(direction, side, "tokens", value.sum(-1))
    return stats.save(tmp_path_factory.mktemp("stats") / "stats.safetensors")


def test_a_quantized_export_re_exports_with_its_quantization_and_refuses_another(tmp_path, tiny_hf_dir, index_path, tiny_batch, capsys):
    multi = export(tiny_hf_dir, tmp_path / "multi", index_path, langs=ef.LANGS, quantize=SPECS["int4"])
    one = export(multi, tmp_path / "one", index_path, langs=(FRA, DEU))
    assert json.loads((one / "pruning_manifest.json").read_text())["quantization"] == SPECS["int4"].record()
    a, b = load_model(multi, dtype="fp32"), load_model(one, dtype="fp32")
    for model in (a, b):
        model.set_direction(FRA, DEU)
    torch.testing.assert_close(logits(a, tiny_batch), logits(b, tiny_batch), rtol=1e-5, atol=1e-5)
    with pytest.raises(QuantError, match="is already quantized \\(int4 \\(groups of 8, fp32 scales\\) on the experts\\)"):
        export(multi, tmp_path / "twice", index_path, quantize=SPECS["int8"])
    code = main(["export", "--model", str(multi), "--experts", str(index_path), "--src", FRA, "--tgt", DEU, "--out", str(tmp_path / "x"), "--quantize", "int8"])
    assert code == 2 and "is already quantized" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--quantize", "int3"], "--quantize must be one of int8, int4, got 'int3'"),
        (["--quantize-dense"], "--quantize-dense need(s) --quantize int8|int4"),
        (["--quantize", "int8", "--group-size", "64"], "--group-size applies to int4 only"),
        (["--quantize", "int4", "--group-size", "5"], "--group-size must be an even integer >= 2 for int4, got 5"),
        (["--quantize", "int4"], "--group-size 128 must divide the input width of every quantized matrix, but"),
    ],
)
def test_bad_quantize_flags_end_in_one_line_and_status_2(flags, message, tmp_path, tiny_hf_dir, index_path, capsys):
    out = tmp_path / "out"
    code = main(["export", "--model", str(tiny_hf_dir), "--experts", str(index_path), "--src", FRA, "--tgt", DEU, "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_prune_quantizes_too(tmp_path, tiny_hf_dir, policy_stats_file):
    out = tmp_path / "pruned"
    code = main(
        [
            "prune",
            "--model",
            str(tiny_hf_dir),
            "--stats",
            str(policy_stats_file),
            "--langs",
            f"{FRA},{DEU}",
            "--ratio",
            "0.5",
            "--min-per-layer",
            "1",
            "--out",
            str(out),
            "--quantize",
            "int4",
            "--group-size",
            "8",
            "--quantize-dense",
            "--dtype",
            "fp32",
        ]
    )
    assert code == 0
    assert json.loads((out / "pruning_manifest.json").read_text())["quantization"] == SPECS["int4-dense"].record()
    load_model(out)


# ---- plain transformers (trust_remote_code) ------------------------------------------------------------------------
REMOTE_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForSeq2SeqLM
path, out = sys.argv[1], sys.argv[2]
batch = {k: torch.tensor(v) for k, v in json.loads(sys.argv[3]).items()}
results = {}
for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    model = AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=True, dtype=dtype)
    kinds = {n.rsplit(".", 1)[-1]: p.dtype for n, p in model.named_parameters() if ".expert_" in n or "q_proj" in n}
    assert kinds["weight_scale"] == torch.float32 and kinds["weight"] in (torch.int8, torch.uint8), kinds
    for direction in (("fra_Latn", "deu_Latn"), ("deu_Latn", "fra_Latn")):
        model.set_direction(*direction)
        with torch.no_grad():
            results[f"{name}/{direction[0]}-{direction[1]}"] = model(**batch).logits.float()
assert not [m for m in sys.modules if m == "pruning" or m.startswith("pruning.")], "loaded without nllb-prune"
torch.save(results, out)
"""


@pytest.mark.parametrize("name", ["int8-dense", "int4-dense"])
def test_quantized_export_loads_in_plain_transformers_with_the_same_outputs(name, tmp_path, tiny_hf_dir, index_path, tiny_batch):
    out = export(tiny_hf_dir, tmp_path / name, index_path, quantize=SPECS[name])
    batch = {k: v.tolist() for k, v in tiny_batch.items()}
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(out), str(tmp_path / "remote.pt"), json.dumps(batch)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    remote = torch.load(tmp_path / "remote.pt", weights_only=True)
    for dtype in ("fp32", "bf16"):
        ours = load_model(out, dtype=dtype)
        for src, tgt in ((FRA, DEU), (DEU, FRA)):
            ours.set_direction(src, tgt)
            expected = logits(ours, tiny_batch).float()
            got = remote[f"{dtype}/{src}-{tgt}"]
            if dtype == "fp32":
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            else:  # the same kernels on the same experts; bf16 sums may differ in order
                assert (got - expected).abs().max() < 0.02 * expected.abs().max()


# ---- the memory plan ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [None, *sorted(SPECS)])
def test_plan_counts_the_bytes_a_quantized_export_stores(name, tmp_path, tiny_hf_dir, index_path):
    """``plan --quantize`` against the tensor bytes of the one-direction export it describes."""
    from pruning.checkpoint.reader import open_checkpoint
    from pruning.plan import Hardware, Workload, build_plan, kept_from_index

    spec = SPECS[name] if name else None
    out = export(tiny_hf_dir, tmp_path / "one", index_path, langs=(FRA, DEU), quantize=spec) if spec else None
    out = out or export(tiny_hf_dir, tmp_path / "one", index_path, langs=(FRA, DEU))
    reader = open_checkpoint(out)
    on_disk = sum(e.tensor.dtype.itemsize * torch.Size(e.tensor.shape).numel() for e in reader.entries())
    workload = Workload("fp32", quantize=spec.scheme if spec else "", quantize_dense=bool(spec and spec.dense), group_size=spec.group_size if spec else None)
    kept = kept_from_index(reader.topology, index_path, [(FRA, DEU), (DEU, FRA)])
    plan = build_plan(reader.topology, Hardware(1, 2**30, "cpu"), workload, kept)
    assert plan["translation_multi_direction"]["weights_bytes"] == on_disk


def test_plan_refuses_bad_quantize_flags(capsys):
    code = main(["plan", "--model", "nllb-moe-54b", "--gpu-mem", "16GB", "--quantize", "int2"])
    assert code == 2 and "--quantize must be one of int8, int4, got 'int2'" in capsys.readouterr().err
    code = main(["plan", "--model", "nllb-moe-54b", "--gpu-mem", "16GB", "--quantize", "int4", "--group-size", "96"])
    assert code == 2 and "--group-size 96 must divide" in capsys.readouterr().err
