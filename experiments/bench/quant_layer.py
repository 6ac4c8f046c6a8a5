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
        hidden = {t: torch.randn(1, t, args.d_model, generator=torch.Generator().manual_seed(t)) for t in map(int, args.tokens.split(","))}
        results: dict[int, dict[str, float]] = {t: {} for t in hidden}
        sizes: dict[str, int] = {}

        def timed(label: str, layer: MoeLayer, dtype: torch.dtype) -> None:
            layer = layer.to(device)
            for t, x in hidden.items():
                x = x.to(device=device, dtype=dtype)
                with torch.no_grad():
                    results[t][label] = time_ms(lambda: layer(x, None), device=device, warmup=1, repeats=args.repeats)
                print(f"experts {experts} tokens {t} {label}: {results[t][label]:.1f} ms", flush=True)

        for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            layer = source if dtype == torch.float32 else float_layer(experts, args.d_model, args.ffn).to(dtype)
            sizes[tag] = expert_bytes(layer)
            for dispatch in ("loop", "grouped"):
                layer.dispatch = DISPATCHES[dispatch]
                timed(f"{tag} {dispatch}", layer, dtype)
            if layer is not source:
                del layer
                gc.collect()
        for scheme in ("int8", "int4"):
            spec = QuantSpec.make(scheme, group_size=args.group_size if scheme == "int4" else None)
            layer = quantized_layer(source, spec, torch.bfloat16)
            sizes[scheme] = expert_bytes(layer)
            layer.dispatch = DISPATCHES["loop"]
            timed(f"{scheme} bf16 loop" + (" (int8 kernel)" if scheme == "int8" else " (dequantize)"), layer, torch.bfloat16)
            if scheme == "int8":
                set_kernel(layer, False)
                timed("int8 bf16 loop (dequantize)", layer, torch.bfloat16)
                set_kernel(layer, True)
            else:
                layer.experts, quantized = Int4PackExperts(layer.experts, torch.bfloat16), layer.experts  # type: ignore[assignment]
                timed("int4 bf16 loop (torch int4pack kernel, not wired)", layer, torch.bfloat16)
                layer.experts = quantized
            layer.dispatch = dequantized_grouped_dispatch
            timed(f"{scheme} bf16 grouped (dequantize layer)", layer, torch.bfloat16)
            layer.dispatch = DISPATCHES["loop"]
            timed(f"{scheme} fp32 loop (dequantize)", layer.float(), torch.float32)
            del layer
            gc.collect()
        for t, timings in results.items():
            for label, ms in timings.items():
                dispatch = "grouped" if "grouped" in label else "loop"
                rows.append({"experts": experts, "tokens": t, "variant": label, "ms": ms,
                             "vs_bf16_same_dispatch": ms / timings[f"bf16 {dispatch}"], "vs_fp32_loop": ms / timings["fp32 loop"]})
        for tag, nbytes in sizes.items():
            rows.append({"experts": experts, "tokens": "-", "variant": f"expert bytes {tag}", "ms": "", "bytes_MiB": round(nbytes / 2**20, 1),
                         "vs_bf16_same_dispatch": nbytes / sizes["bf16"]})
        del source
        gc.collect()
    sig = signature(device) | {"d_model": args.d_model, "ffn": args.ffn, "int4_group_size": args.group_size}
    table = markdown_table(rows, ["experts", "tokens", "variant", "ms", "vs_bf16_same_dispatch", "vs_fp32_loop", "bytes_MiB"])
    paths = write_results(args.name or f"bench_quant_layer_{device.type}", {"signature": sig, "rows": rows}, table)
    print(table)
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
