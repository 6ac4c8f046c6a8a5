"""Tokens/s of statistics (teacher forcing) and translation (greedy, beam 4) on a full-width model, ours vs 4.57's layer.

    python -m experiments.bench.fullwidth_speed --model outputs/rehearsal/hf --dtype bf16

The same loaded model runs twice per measurement: with our MoE layers, then with transformers 4.57's
``NllbMoeSparseMLP`` holding the same weights (views of our stacked tensors, no copy) swapped into
every MoE layer, side by side in one run. Statistics: the encoder-decoder forward (no output
projection) with our routing collector on (ours) or off (the stock layer has no routing to collect).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any, Iterator

import torch

from experiments.bench.common import markdown_table, signature, write_results
from experiments.bench.moe_layer import reference_layer
from experiments.fullwidth.probe import teacher_batch
from pruning.model.loading import load_model


@contextlib.contextmanager
def stock_layers(model: Any) -> Iterator[None]:
    """Every MoE layer replaced by transformers 4.57's, on the same weights; restored on exit."""
    swapped = []
    for side, layer, moe in list(model.moe_layers()):
        stack = model.model.encoder if side == "encoder" else model.model.decoder
        ffn = model.config.encoder_ffn_dim if side == "encoder" else model.config.decoder_ffn_dim
        stack.layers[layer].ffn = reference_layer(moe, d_model=model.config.d_model, ffn=ffn)
        swapped.append((stack.layers[layer], moe))
    try:
        yield
    finally:
        for holder, moe in swapped:
            holder.ffn = moe


def timed(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--sentences", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--src", default="qen_Latn")
    parser.add_argument("--tgt", default="qbr_Cyrl")
    parser.add_argument("--name", default="bench_fullwidth_speed_cpu")
    args = parser.parse_args(argv)
    from pruning.stats.collector import RoutingCollector

    model = load_model(args.model, dtype=args.dtype)
    batch = teacher_batch(model, args.sentences, src=args.src, tgt=args.tgt)
    tokens = int(batch["attention_mask"].sum() + batch["decoder_attention_mask"].sum())
    generate_inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    forced = model.tokenizer.convert_tokens_to_ids(args.tgt)
    rows = []

    def generate(beam: int) -> None:
        model.generate(
            **generate_inputs, forced_bos_token_id=forced, num_beams=beam, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False
        )

    with torch.inference_mode():
        collector = RoutingCollector(model, num_experts=model.topology.num_experts)
        ours_stats = timed(lambda: model.model(**batch, use_cache=False), args.repeats)
        collector.close()
        ours_greedy, ours_beam = timed(lambda: generate(1), 1), timed(lambda: generate(4), 1)
        with stock_layers(model):
            stock_stats = timed(lambda: model.model(**batch, use_cache=False), args.repeats)
            stock_greedy, stock_beam = timed(lambda: generate(1), 1), timed(lambda: generate(4), 1)
    generated = args.sentences * args.new_tokens
    for job, ours, stock, count in (
        ("stats (teacher forcing)", ours_stats, stock_stats, tokens),
        ("translate greedy", ours_greedy, stock_greedy, generated),
        ("translate beam 4", ours_beam, stock_beam, generated),
    ):
        rows.append(
            {
                "job": job,
                "tokens": count,
                "ours_s": ours,
                "stock_4.57_s": stock,
                "ours_tok_s": count / ours,
                "stock_tok_s": count / stock,
                "speedup": stock / ours,
            }
        )
        print(rows[-1], flush=True)
    sig = signature(torch.device("cpu")) | {
        "dtype": args.dtype,
        "model": args.model,
        "dispatch": getattr(model, "dispatch_name", "?"),
        "sentences": args.sentences,
        "new_tokens": args.new_tokens,
    }
    table = markdown_table(rows, ["job", "tokens", "ours_s", "stock_4.57_s", "ours_tok_s", "stock_tok_s", "speedup"])
    paths = write_results(args.name, {"signature": sig, "rows": rows}, table)
    print(table)
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
