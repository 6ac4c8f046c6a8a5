"""Beam-search generation with the paper's 80% pruning: our MoE layer vs the transformers-4.57 layer.

    python -m experiments.bench.generation                                   # CPU, small widths (make bench)
    python -m experiments.bench.generation --device cuda --full-width        # make bench-gpu: 2048/8192, 256k vocab

A random-weight model with the REAL topology (24+24 layers, MoE every 4th) keeping 36 experts per
encoder MoE layer and 12 per decoder MoE layer (288 of 1,536: the paper's 3:1 setting). Both runs use
the same model object; for the reference, every MoE layer is swapped for transformers 4.57's
``NllbMoeSparseMLP`` holding the same weights (views, no copy). Every run generates exactly
``--new-tokens`` tokens per sentence (min = max), so both do the same work.
"""

from __future__ import annotations

import argparse
import time

import torch

from experiments.bench.common import markdown_table, signature, synchronize, write_results
from experiments.bench.moe_layer import reference_layer
from pruning.model.build import build_empty_model, init_random_weights
from pruning.model.loading import parse_dtype
from pruning.topology import Topology


def pruned_config(*, full_width: bool, vocab: int | None):  # noqa: ANN201
    d, f, heads = (2048, 8192, 16) if full_width else (256, 1024, 4)
    topology = Topology(
        d_model=d, ffn_dim=f, encoder_attention_heads=heads, decoder_attention_heads=heads, vocab_size=vocab or (256206 if full_width else 8000)
    )
    return topology.to_hf_config()


def swap_to_reference(model) -> dict:  # noqa: ANN001
    """Replace every MoeLayer by the stock 4.57 layer with the same weights; returns what to restore."""
    saved = {}
    for side, layer, moe in list(model.moe_layers()):
        stack = model.model.encoder if side == "encoder" else model.model.decoder
        saved[(side, layer)] = moe
        stack.layers[layer].ffn = reference_layer(moe, d_model=model.config.d_model, ffn=moe.experts.fc1_weight.shape[1]).to(moe.experts.fc1_weight.device)
    return saved


def restore(model, saved: dict) -> None:  # noqa: ANN001
    for (side, layer), moe in saved.items():
        stack = model.model.encoder if side == "encoder" else model.model.decoder
        stack.layers[layer].ffn = moe


def generate_once(model, batch, *, beam: int, new_tokens: int, device: torch.device) -> float:  # noqa: ANN001
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**batch, num_beams=beam, min_new_tokens=new_tokens, max_new_tokens=new_tokens, do_sample=False)
    synchronize(device)
    assert out.shape[1] >= new_tokens
    return time.perf_counter() - start


def timed(model, batch, *, args: argparse.Namespace, device: torch.device) -> float:  # noqa: ANN001
    """Median of ``--repeats`` timed generations (seconds)."""
    runs = sorted(generate_once(model, batch, beam=args.beam, new_tokens=args.new_tokens, device=device) for _ in range(args.repeats))
    return runs[len(runs) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--full-width", action="store_true")
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--src-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--enc-experts", type=int, default=36)
    parser.add_argument("--dec-experts", type=int, default=12)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per layer kind (median reported)")
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = pruned_config(full_width=args.full_width, vocab=args.vocab)
    topology = Topology.from_config(config)
    experts = {(side, layer): list(range(args.enc_experts if side == "encoder" else args.dec_experts)) for _, side, layer in topology.iter_moe_layers()}
    model = build_empty_model(config, experts=experts, dtype=dtype, device=device)
    init_random_weights(model, seed=0, std=0.02, router_std=1.0)
    params = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, config.vocab_size - 300, (args.batch, args.src_len), generator=generator)
    input_ids[:, -1] = 2
    batch = {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device)}
    rows = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    generate_once(model, batch, beam=args.beam, new_tokens=4, device=device)  # warm-up
    seconds = timed(model, batch, args=args, device=device)
    ours = {"layer": f"ours ({model.dispatch_name})", "seconds": seconds, "tokens_per_s": args.batch * args.new_tokens / seconds}
    if device.type == "cuda":
        ours["peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    rows.append(ours)
    print(ours, flush=True)
    if not args.skip_reference:
        saved = swap_to_reference(model)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        generate_once(model, batch, beam=args.beam, new_tokens=4, device=device)
        seconds = timed(model, batch, args=args, device=device)
        ref = {"layer": "transformers 4.57 NllbMoeSparseMLP", "seconds": seconds, "tokens_per_s": args.batch * args.new_tokens / seconds}
        if device.type == "cuda":
            ref["peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        rows.append(ref)
        restore(model, saved)
        ours["speedup_vs_reference"] = ours["tokens_per_s"] / ref["tokens_per_s"]
        print(ref, flush=True)
    sig = signature(device) | {
        "dtype": str(dtype),
        "params": params,
        "d_model": config.d_model,
        "ffn": config.encoder_ffn_dim,
        "vocab": config.vocab_size,
        "experts_per_layer": f"{args.enc_experts} enc / {args.dec_experts} dec",
        "batch": args.batch,
        "beam": args.beam,
        "repeats": args.repeats,
        "src_len": args.src_len,
        "new_tokens": args.new_tokens,
    }
    table = markdown_table(rows, ["layer", "seconds", "tokens_per_s", "peak_GiB", "speedup_vs_reference"])
    paths = write_results(args.name or f"bench_generation_{device.type}", {"signature": sig, "rows": rows}, table)
    print(table)
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
