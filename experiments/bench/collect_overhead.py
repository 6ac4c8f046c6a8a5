"""Overhead of routing-statistics collection: time with the counter hooks / time of a plain forward.

    python -m experiments.bench.collect_overhead                      # CPU, the tiny real-topology model
    python -m experiments.bench.collect_overhead --device cuda --full-width --layers 8 --dtype bf16
    python -m experiments.bench.collect_overhead --full-width --d-model 256 --ffn 1024 --name collect_overhead_cpu_d256

Both passes run the same teacher-forced batches (one direction's worth, batched by tokens as
``nllb-prune stats`` does); the collecting pass has a :class:`RoutingCollector` on every MoE layer and
ends with the one move of the counters to the CPU that a direction costs. Passes alternate (plain,
collect, plain, ...) and each figure is the median over ``--repeats`` passes. The target is an
overhead (ratio - 1) under 5%.

CPU: the tiny model of the tests (24+24 layers, MoE every 4th, 128 experts, d_model 16) with its
tokenizer and the fixture's sentences. ``--full-width``: random weights at d_model 2048 / FFN 8192 /
128 experts with ``--layers`` encoder and decoder layers (MoE every 4th) and random token ids.
Results: ``experiments/results/collect_overhead_{cpu|gpu}.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from experiments.bench.common import markdown_table, signature, synchronize, write_results
from pruning.stats.batches import decoder_inputs, make_batches
from pruning.stats.collector import RoutingCollector


def tiny_setup(*, sentences: int, seed: int) -> tuple[Any, list[tuple[list[int], list[int]]]]:
    from tests import fixtures

    tokenizer = fixtures.make_tokenizer(Path(tempfile.mkdtemp(prefix="collect-bench-")))
    model = fixtures.make_model(len(tokenizer), seed=seed)
    src = fixtures.sentences(sentences, seed=seed + 1)
    tgt = fixtures.sentences(sentences, seed=seed + 2)
    tokenizer.src_lang, tokenizer.tgt_lang = "fra_Latn", "deu_Latn"
    sources = tokenizer(src)["input_ids"]
    labels = tokenizer(text_target=tgt)["input_ids"]
    return model, list(zip(sources, labels))


def full_width_setup(
    *, layers: int, sentences: int, seed: int, dtype: torch.dtype, device: torch.device, d_model: int = 2048, ffn: int = 8192
) -> tuple[Any, list]:
    from pruning.model.build import build_empty_model, init_random_weights
    from pruning.topology import Topology

    topology = Topology(encoder_layers=layers, decoder_layers=layers, d_model=d_model, ffn_dim=ffn, vocab_size=8000)
    config = topology.to_hf_config()
    model = build_empty_model(config, dtype=dtype, device=device)
    init_random_weights(model, seed=seed, std=0.02, router_std=0.05)
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(sentences):  # FLORES-like lengths: 15..60 tokens
        n_src, n_tgt = (int(torch.randint(15, 60, (1,), generator=generator)) for _ in range(2))
        pairs.append(
            (
                [5] + torch.randint(4, 8000, (n_src,), generator=generator).tolist() + [2],
                [6] + torch.randint(4, 8000, (n_tgt,), generator=generator).tolist() + [2],
            )
        )
    return model, pairs


def run_pass(model: Any, batches: list, *, device: torch.device, collector: RoutingCollector | None) -> float:
    """Seconds for one teacher-forced pass over ``batches`` (plus the counters' move to the CPU)."""
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        for input_ids, attention_mask, dec_ids, dec_mask in batches:
            model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=dec_ids, decoder_attention_mask=dec_mask, use_cache=False)
        if collector is not None:
            collector.take()  # once per direction in nllb-prune stats
    synchronize(device)
    return time.perf_counter() - start


def measure(model: Any, pairs: list, *, batch_tokens: int, device: torch.device, repeats: int, dispatch: str, expert_outputs: bool = False) -> dict[str, Any]:
    model.set_dispatch(dispatch)
    config = model.config
    grouped = make_batches([s for s, _ in pairs], [t for _, t in pairs], batch_tokens=batch_tokens, pad_id=config.pad_token_id)
    batches = []
    tokens = 0
    for b in grouped:
        dec_ids, dec_mask = decoder_inputs(b.labels, start_id=config.decoder_start_token_id, pad_id=config.pad_token_id)
        batches.append((b.input_ids.to(device), b.attention_mask.to(device), dec_ids.to(device), dec_mask.to(device)))
        tokens += int(b.attention_mask.sum()) + int(dec_mask.sum())
    collector = RoutingCollector(model, num_experts=model.topology.num_experts, expert_outputs=expert_outputs)
    collector.enabled = False
    plain, collect = [], []
    run_pass(model, batches, device=device, collector=None)  # warm-up
    for _ in range(repeats):
        collector.enabled = False
        plain.append(run_pass(model, batches, device=device, collector=None))
        collector.enabled = True
        collect.append(run_pass(model, batches, device=device, collector=collector))
    collector.close()
    p, c = statistics.median(plain), statistics.median(collect)
    return {
        "dispatch": model.dispatch_name,
        "batches": len(batches),
        "sentences": len(pairs),
        "tokens": tokens,
        "plain_s": p,
        "collect_s": c,
        "ratio": c / p,
        "overhead_pct": 100 * (c / p - 1),
        "min_ratio": min(collect) / min(plain),
        "plain_runs_s": plain,
        "collect_runs_s": collect,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="fp32 (CPU default) or bf16 (GPU default)")
    parser.add_argument("--full-width", action="store_true", help="random weights at d_model 2048 / FFN 8192 / 128 experts")
    parser.add_argument("--layers", type=int, default=8, help="encoder and decoder layers for --full-width (MoE every 4th)")
    parser.add_argument("--d-model", type=int, default=2048, help="width for --full-width (smaller: a CPU-sized stand-in)")
    parser.add_argument("--ffn", type=int, default=8192, help="FFN width for --full-width")
    parser.add_argument("--sentences", type=int, default=128)
    parser.add_argument("--batch-tokens", default="256,1024,4096", help="comma-separated: padded tokens per batch")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dispatch", default="loop,grouped", help="comma-separated dispatches to measure (auto, grouped, loop)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None)
    parser.add_argument("--expert-outputs", action="store_true", help="collect with the expert-output counters (stats --expert-outputs)")
    args = parser.parse_args(argv)

    from pruning.model.loading import parse_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.full_width:
        model, pairs = full_width_setup(
            layers=args.layers, sentences=args.sentences, seed=args.seed, dtype=dtype, device=device, d_model=args.d_model, ffn=args.ffn
        )
        what = f"d_model {args.d_model}, FFN {args.ffn}, 128 experts, {args.layers}+{args.layers} layers, random weights, {dtype}"
    else:
        model, pairs = tiny_setup(sentences=args.sentences, seed=args.seed)
        model = model.to(device=device, dtype=dtype)
        what = f"tiny real topology (24+24 layers, 128 experts, d_model 16), fixture sentences, {dtype}"
    rows = []
    for dispatch in args.dispatch.split(","):
        for batch_tokens in (int(b) for b in str(args.batch_tokens).split(",")):
            try:
                row = measure(
                    model, pairs, batch_tokens=batch_tokens, device=device, repeats=args.repeats, dispatch=dispatch, expert_outputs=args.expert_outputs
                )
            except ValueError as exc:
                print(f"skipping dispatch {dispatch}: {exc}")
                break
            row["batch_tokens"] = batch_tokens
            rows.append(row)
            print(
                f"{row['dispatch']:>8} {batch_tokens:>5} tokens/batch: plain {row['plain_s'] * 1000:.1f} ms, "
                f"collect {row['collect_s'] * 1000:.1f} ms, ratio {row['ratio']:.4f} (overhead {row['overhead_pct']:+.2f}%)"
            )
    name = args.name or f"collect_overhead_{'gpu' if device.type == 'cuda' else 'cpu'}{'_outputs' if args.expert_outputs else ''}"
    if args.expert_outputs:
        what += "; collector with --expert-outputs"
    sig = signature(device)
    sig["load_average_1_5_15"] = " ".join(f"{x:.2f}" for x in os.getloadavg())  # shared machines: timings are noisy
    payload = {"signature": sig, "model": what, "sentences": len(pairs), "repeats": args.repeats, "target": "overhead < 5%", "results": rows}
    table_rows = [
        {
            "dispatch": r["dispatch"],
            "batch tokens": r["batch_tokens"],
            "batches": r["batches"],
            "tokens": r["tokens"],
            "plain ms": r["plain_s"] * 1000,
            "collect ms": r["collect_s"] * 1000,
            "ratio": r["ratio"],
            "overhead %": r["overhead_pct"],
            "ratio of minima": r["min_ratio"],
        }
        for r in rows
    ]
    table = (
        f"Model: {what}. One direction's worth of teacher-forced batches ({len(pairs)} sentences); "
        f"median of {args.repeats} alternating passes. Target: overhead < 5%.\n\n"
        + markdown_table(table_rows, ["dispatch", "batch tokens", "batches", "tokens", "plain ms", "collect ms", "ratio", "overhead %", "ratio of minima"])
    )
    json_path, md_path = write_results(name, payload, table)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
