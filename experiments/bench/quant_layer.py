"""One MoE layer at NLLB-200's width with quantized experts: int8 / int4 against bf16 and fp32, side by side.

    python -m experiments.bench.quant_layer                      # CPU, d_model 2048, FFN 8192, 36 and 12 experts
    python -m experiments.bench.quant_layer --device cuda         # a lent GPU (not measured yet)

Every variant holds the same weights (one seeded fp32 layer, cast or quantized from it) and sees the
same tokens and routing. Variants: float fp32 and bf16 (loop and grouped dispatch), int8 with bf16
activations through torch's ``_weight_int8pack_mm`` (what ``load_model`` runs on CPU) and with the kernel
off (dequantize each expert, then matmul), int8 and int4 in fp32 (dequantize), int4 in bf16 (dequantize),
the grouped dispatch over quantized experts (dequantizes the whole layer per call), and, for
reference, torch's CPU int4 kernel ``_weight_int4pack_mm_for_cpu`` on weights repacked into its
platform layout (not wired into the model: see pruning/model/quantized.py). Times are medians; ratios
are against float bf16 with the same dispatch measured in the same run. Also: the experts' bytes.
"""

from __future__ import annotations

import argparse
import gc
import statistics

import torch

from experiments.bench.common import markdown_table, signature, time_ms, write_results
from pruning.model.moe import DISPATCHES, MoeLayer
from pruning.model.quantized import QuantizedStackedExperts, dequantized_grouped_dispatch, set_kernel
from pruning.quant import QuantSpec, quantize, unpack_int4


def float_layer(experts: int, d_model: int, ffn: int, *, seed: int = 0) -> MoeLayer:
    layer = MoeLayer(d_model=d_model, ffn_dim=ffn, expert_ids=list(range(experts))).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "router" in name else 0.02))
    return layer


def quantized_layer(source: MoeLayer, spec: QuantSpec, dtype: torch.dtype) -> MoeLayer:
    """A copy of ``source`` whose experts are quantized (biases and everything else in ``dtype``)."""
    d_model, ffn = source.experts.fc1_weight.shape[2], source.experts.fc1_weight.shape[1]
    layer = MoeLayer(d_model=d_model, ffn_dim=ffn, expert_ids=source.expert_ids).eval()
    layer.router.weight = source.router.weight
    layer.experts = QuantizedStackedExperts(num_experts=source.experts.num_experts, d_model=d_model, ffn_dim=ffn, spec=spec)
    with torch.no_grad():
        for linear in ("fc1", "fc2"):
            weight = getattr(source.experts, f"{linear}_weight")
            for e in range(weight.shape[0]):  # one expert at a time: no fp32 copy of the whole stack
                for suffix, value in quantize(weight[e], spec).items():
                    getattr(layer.experts, f"{linear}_weight{suffix}")[e].copy_(value)
            getattr(layer.experts, f"{linear}_bias").copy_(getattr(source.experts, f"{linear}_bias"))
    return layer.to(dtype)


class Int4PackExperts(torch.nn.Module):
    """Experts run by ``torch._weight_int4pack_mm_for_cpu`` on weights repacked into its layout (bench only)."""

    def __init__(self, quantized: QuantizedStackedExperts, dtype: torch.dtype):
        super().__init__()
        self.num_experts = quantized.num_experts
        self.group = quantized.spec.group_size
        self.parts = {}
        for linear in ("fc1", "fc2"):
            q = getattr(quantized, f"{linear}_weight")
            scale, minimum = getattr(quantized, f"{linear}_weight_scale"), getattr(quantized, f"{linear}_weight_min")
            packed = [torch._convert_weight_to_int4pack_for_cpu(unpack_int4(q[e]).to(torch.int32), 1) for e in range(q.shape[0])]
            # the kernel's convention: w = (q - 8) * scale + zero, so zero = min + 8 * scale; [E, G, out, 2]
            zeros = minimum + 8 * scale
            scale_zero = torch.stack([scale.transpose(1, 2), zeros.transpose(1, 2)], dim=-1).to(dtype).contiguous()
            self.parts[linear] = (packed, scale_zero, getattr(quantized, f"{linear}_bias"))

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        packed, scale_zero, bias = self.parts["fc1"]
        h = torch.relu(torch._weight_int4pack_mm_for_cpu(x, packed[e], self.group, scale_zero[e]) + bias[e])
        packed, scale_zero, bias = self.parts["fc2"]
        return torch._weight_int4pack_mm_for_cpu(h, packed[e], self.group, scale_zero[e]) + bias[e]


def expert_bytes(layer: MoeLayer) -> int:
    return sum(p.numel() * p.element_size() for p in layer.experts.parameters())


def variants(source: MoeLayer, group_size: int) -> dict[str, tuple[MoeLayer, torch.dtype, object, bool]]:
    """label -> (layer, activation dtype, dispatch, int8 kernel on); quantized layers are shared between labels."""
    bf16 = float_layer(source.experts.num_experts, source.experts.fc1_weight.shape[2], source.experts.fc1_weight.shape[1]).to(torch.bfloat16)
    int8 = quantized_layer(source, QuantSpec.make("int8"), torch.bfloat16)
    int4 = quantized_layer(source, QuantSpec.make("int4", group_size=group_size), torch.bfloat16)
    int4pack = MoeLayer(d_model=bf16.experts.fc1_weight.shape[2], ffn_dim=bf16.experts.fc1_weight.shape[1], expert_ids=source.expert_ids).eval()
    int4pack.router.weight = source.router.weight
    int4pack.experts = Int4PackExperts(int4.experts, torch.bfloat16)  # type: ignore[assignment]
    loop, grouped = DISPATCHES["loop"], DISPATCHES["grouped"]
    return {
        "fp32 loop": (source, torch.float32, loop, True),
        "fp32 grouped": (source, torch.float32, grouped, True),
        "bf16 loop": (bf16, torch.bfloat16, loop, True),
        "bf16 grouped": (bf16, torch.bfloat16, grouped, True),
        "int8 bf16 loop (what load_model runs: int8 kernel up to 64 tokens per expert)": (int8, torch.bfloat16, loop, True),
        "int8 bf16 loop (dequantize each expert)": (int8, torch.bfloat16, loop, False),
        "int8 bf16 grouped (dequantize the layer)": (int8, torch.bfloat16, dequantized_grouped_dispatch, False),
        "int8 fp32 loop (dequantize each expert)": (int8, torch.float32, loop, False),
        "int4 bf16 loop (dequantize each expert)": (int4, torch.bfloat16, loop, False),
        "int4 bf16 grouped (dequantize the layer)": (int4, torch.bfloat16, dequantized_grouped_dispatch, False),
        "int4 fp32 loop (dequantize each expert)": (int4, torch.float32, loop, False),
        "int4 bf16 loop (torch int4pack kernel, not wired)": (int4pack, torch.bfloat16, loop, False),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=8192)
    parser.add_argument("--experts", default="36,12", help="experts in the layer (NLLB-200 80%% pruned: 36 encoder, 12 decoder)")
    parser.add_argument("--tokens", default="32,512")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for experts in map(int, args.experts.split(",")):
        source = float_layer(experts, args.d_model, args.ffn)
        cases = variants(source, args.group_size)
        hidden = {t: torch.randn(1, t, args.d_model, generator=torch.Generator().manual_seed(t)) for t in map(int, args.tokens.split(","))}
        samples: dict[tuple[str, int], list[float]] = {}
        for round_ in range(args.repeats + 1):  # round 0 warms up; variants interleaved, so interference hits all alike
            for label, (layer, dtype, dispatch, kernel) in cases.items():
                layer.dispatch = dispatch
                set_kernel(layer, kernel)
                for t, x in hidden.items():
                    x = x.to(device=device, dtype=dtype)
                    with torch.no_grad():
                        ms = time_ms(lambda layer=layer, x=x: layer(x, None), device=device, warmup=0, repeats=1)
                    if round_:
                        samples.setdefault((label, t), []).append(ms)
            print(f"experts {experts}: round {round_} done", flush=True)
        for t in hidden:
            median = {label: statistics.median(samples[(label, t)]) for label in cases}
            for label, ms in median.items():
                dispatch = "grouped" if "grouped" in label else "loop"
                rows.append(
                    {
                        "experts": experts,
                        "tokens": t,
                        "variant": label,
                        "ms": ms,
                        "vs_bf16_same_dispatch": ms / median[f"bf16 {dispatch}"],
                        "vs_bf16_best": ms / min(median["bf16 loop"], median["bf16 grouped"]),
                        "vs_fp32_loop": ms / median["fp32 loop"],
                    }
                )
                print(rows[-1], flush=True)
        for tag, layer in (
            ("fp32", cases["fp32 loop"][0]),
            ("bf16", cases["bf16 loop"][0]),
            ("int8", cases["int8 bf16 grouped (dequantize the layer)"][0]),
            ("int4", cases["int4 bf16 grouped (dequantize the layer)"][0]),
        ):
            rows.append({"experts": experts, "tokens": "-", "variant": f"expert bytes {tag}", "bytes_MiB": round(expert_bytes(layer) / 2**20, 1)})
        del source, cases
        gc.collect()
    sig = signature(device) | {
        "d_model": args.d_model,
        "ffn": args.ffn,
        "int4_group_size": args.group_size,
        "repeats": args.repeats,
        "method": "median of interleaved rounds (every variant once per round)",
    }
    table = markdown_table(rows, ["experts", "tokens", "variant", "ms", "vs_bf16_same_dispatch", "vs_bf16_best", "vs_fp32_loop", "bytes_MiB"])
    paths = write_results(args.name or f"bench_quant_layer_{device.type}", {"signature": sig, "rows": rows}, table)
    print(table)
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
