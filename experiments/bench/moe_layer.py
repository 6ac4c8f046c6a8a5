"""One MoE layer: our dispatch paths vs a transformers-4.57-style reference, against the floors.

    python -m experiments.bench.moe_layer                       # CPU, small widths (make bench)
    python -m experiments.bench.moe_layer --device cuda --d-model 2048 --ffn 8192 --dtype bf16   # make bench-gpu

The reference is transformers 4.57's ``NllbMoeSparseMLP`` (correct, materialises [E, T, D] and loops
over every expert), holding the SAME weights as ours (views of our stacked tensors, no copy).
Floors: bytes of the experts the batch touches / measured copy bandwidth, and FLOPs / measured
matmul rate, both measured in the same run on the same device.
"""

from __future__ import annotations

import argparse

import torch

from experiments.bench.common import (
    markdown_table,
    measure_bandwidth_gbs,
    measure_matmul_tflops,
    signature,
    time_ms,
    write_results,
)
from pruning.model.loading import parse_dtype
from pruning.model.moe import DISPATCHES, MoeLayer, grouped_mm_supported


def reference_layer(ours: MoeLayer, *, d_model: int, ffn: int):  # noqa: ANN201
    from transformers import NllbMoeConfig
    from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeSparseMLP

    n = ours.router.num_experts
    config = NllbMoeConfig(d_model=d_model, num_experts=n, expert_capacity=None, moe_token_dropout=0.2)
    with torch.device("meta"):
        stock = NllbMoeSparseMLP(config, ffn_dim=ffn)
    stock.router.classifier.weight = ours.router.weight  # fp32, shared
    for e in range(n):
        expert = stock.experts[f"expert_{e}"]
        expert.fc1.weight = torch.nn.Parameter(ours.experts.fc1_weight[e], requires_grad=False)
        expert.fc1.bias = torch.nn.Parameter(ours.experts.fc1_bias[e], requires_grad=False)
        expert.fc2.weight = torch.nn.Parameter(ours.experts.fc2_weight[e], requires_grad=False)
        expert.fc2.bias = torch.nn.Parameter(ours.experts.fc2_bias[e], requires_grad=False)
    return stock.eval()


def run_case(
    *,
    experts: int,
    tokens: int,
    d_model: int,
    ffn: int,
    dtype: torch.dtype,
    device: torch.device,
    bandwidth: float,
    tflops: float,
    repeats: int,
    with_reference: bool,
    reference_limit: float = float("inf"),
) -> dict:
    layer = MoeLayer(d_model=d_model, ffn_dim=ffn, expert_ids=list(range(experts))).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
        layer.router.weight.normal_(0, 1.0)
    hidden = torch.randn(1, tokens, d_model, device=device, dtype=dtype)
    row: dict = {"experts": experts, "tokens": tokens}
    with torch.no_grad():
        _, routing = layer(hidden, None)
        touched = int(torch.unique(routing.expert_idx[routing.dispatched]).numel())
        expert_bytes = (2 * d_model * ffn + d_model + ffn) * hidden.element_size()
        bw_floor = touched * expert_bytes / (bandwidth * 1e9) * 1000
        flop_floor = 2 * tokens * 2 * (2 * d_model * ffn) / (tflops * 1e12) * 1000
        row.update(touched=touched, floor_ms=max(bw_floor, flop_floor), bw_floor_ms=bw_floor, flop_floor_ms=flop_floor)
        ok, _ = grouped_mm_supported(device=device, dtype=dtype, d_model=d_model, ffn_dim=ffn)
        for name, dispatch in DISPATCHES.items():
            if name == "grouped" and not ok:
                continue
            layer.dispatch = dispatch
            row[f"{name}_ms"] = time_ms(lambda: layer(hidden, None), device=device, repeats=repeats)
        buffer = experts * tokens * d_model * hidden.element_size()  # the 4.57 layer's [E, T, D]
        if with_reference and buffer > reference_limit:
            row["reference_skipped"] = f"its [E, T, D] buffer would take {buffer / 2**30:.1f} GiB"
        elif with_reference:
            stock = reference_layer(layer, d_model=d_model, ffn=ffn)
            row["reference_ms"] = time_ms(lambda: stock(hidden, None), device=device, repeats=repeats)
            best = min(v for k, v in row.items() if k in ("grouped_ms", "loop_ms"))
            row["speedup_vs_reference"] = row["reference_ms"] / best
        best = min(v for k, v in row.items() if k in ("grouped_ms", "loop_ms"))
        row["best_over_floor"] = best / row["floor_ms"]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--experts", default="128,36,12")
    parser.add_argument("--tokens", default="32,512,4096")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-reference", action="store_true", help="skip the slow transformers-4.57-style layer")
    parser.add_argument("--reference-limit-gb", type=float, default=float("inf"), help="skip the 4.57 layer where its [E, T, D] buffer exceeds this (GiB)")
    parser.add_argument("--name", default=None, help="results file stem (default: bench_moe_layer_<device>)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    bandwidth = measure_bandwidth_gbs(device)
    tflops = measure_matmul_tflops(device, dtype, n=4096 if device.type == "cuda" else 2048)
    rows = []
    for experts in map(int, args.experts.split(",")):
        for tokens in map(int, args.tokens.split(",")):
            row = run_case(
                experts=experts,
                tokens=tokens,
                d_model=args.d_model,
                ffn=args.ffn,
                dtype=dtype,
                device=device,
                bandwidth=bandwidth,
                tflops=tflops,
                repeats=args.repeats,
                with_reference=not args.no_reference,
                reference_limit=args.reference_limit_gb * 2**30,
            )
            rows.append(row)
            print(row, flush=True)
    sig = signature(device) | {
        "dtype": str(dtype),
        "d_model": args.d_model,
        "ffn": args.ffn,
        "measured_bandwidth_GBps": round(bandwidth, 1),
        "measured_matmul_TFLOPs": round(tflops, 2),
    }
    columns = [
        "experts",
        "tokens",
        "touched",
        "reference_ms",
        "loop_ms",
        "grouped_ms",
        "bw_floor_ms",
        "flop_floor_ms",
        "speedup_vs_reference",
        "best_over_floor",
    ]
    table = markdown_table(rows, columns)
    name = args.name or f"bench_moe_layer_{device.type}"
    paths = write_results(name, {"signature": sig, "rows": rows}, table)
    print(table)
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
