"""Small commands the rehearsal measures in a process of their own.

python -m experiments.fullwidth.probe load MODEL [--dtype bf16]    # load_model, print the bytes held
python -m experiments.fullwidth.probe fp16 MODEL --out fp16.json    # fp16 forward, routing and generation: finite?
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Optional


def load(model: str, dtype: Optional[str]) -> None:
    from pruning import load_model

    loaded = load_model(model, dtype=dtype)
    held = sum(p.numel() * p.element_size() for p in loaded.parameters())
    print(f"loaded {model}: {held / 1e9:.3f} GB of parameters", flush=True)
    time.sleep(0.5)  # hold the loaded state for a few periods of the memory sampler (experiments.fullwidth.measure)


def teacher_batch(model: Any, sentences: int, *, src: str, tgt: str) -> dict[str, Any]:
    """The first ``sentences`` testbed dev sentences of ``src-tgt``, with teacher-forced decoder inputs."""
    from pruning.data.flores import FloresDir
    from pruning.stats.batches import decoder_inputs

    tokenizer = model.tokenizer
    flores = FloresDir("experiments/testbed/data/flores")
    tokenizer.src_lang = src
    batch = tokenizer(flores.read(src, "dev")[:sentences], return_tensors="pt", padding=True)
    tokenizer.src_lang = tgt
    labels = [[tokenizer.convert_tokens_to_ids(tgt), *ids[1:]] for ids in tokenizer(flores.read(tgt, "dev")[:sentences])["input_ids"]]
    decoder_ids, decoder_mask = decoder_inputs(labels, start_id=model.config.decoder_start_token_id, pad_id=model.config.pad_token_id)
    return {**batch, "decoder_input_ids": decoder_ids, "decoder_attention_mask": decoder_mask}


def fp16_check(model_path: str, out: str, *, sentences: int = 8, src: str = "qen_Latn", tgt: str = "qbr_Cyrl") -> dict:
    """Load at fp16 (V100-class GPUs have no bf16): routers stay fp32; logits, router outputs and counters finite?"""
    import json

    import torch

    from pruning import load_model
    from pruning.data.flores import FloresDir
    from pruning.stats.collector import RoutingCollector
    from pruning.translate import DecodingOptions, translate_sentences

    model = load_model(model_path, dtype="fp16")
    flores = FloresDir("experiments/testbed/data/flores")
    batch = teacher_batch(model, sentences, src=src, tgt=tgt)
    decoder_mask = batch["decoder_attention_mask"]
    collector = RoutingCollector(model, num_experts=model.topology.num_experts)
    routers_fp32 = all(moe.router.weight.dtype == torch.float32 for _, _, moe in model.moe_layers())
    with torch.no_grad():
        logits = model(**batch).logits  # [B, L, V] fp16
    counters = collector.take()
    collector.close()
    finite_counters = all(bool(torch.isfinite(t).all()) for side in counters.values() for t in side.values())
    real = decoder_mask.bool()
    used = logits[real][:, : len(model.tokenizer)].float()
    hypotheses = translate_sentences(model, flores.read(src, "devtest")[:4], src=src, tgt=tgt, options=DecodingOptions(beam=4, max_length=16))
    result = {
        "dtype": str(model.model.shared.weight.dtype),
        "dispatch": getattr(model, "dispatch_name", "?"),
        "routers_fp32": routers_fp32,
        "logits_finite": bool(torch.isfinite(used).all()),
        "max_abs_logit": float(used.abs().max()),
        "counters_finite": finite_counters,
        "translated": len([h for h in hypotheses if h]),
    }
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    print(result)
    return result


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.fullwidth.probe")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("load")
    p.add_argument("model")
    p.add_argument("--dtype", default=None)
    q = sub.add_parser("fp16")
    q.add_argument("model")
    q.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.what == "load":
        load(args.model, args.dtype)
    else:
        fp16_check(args.model, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
