"""One process of the expert-parallel test (tests/test_stats_distributed.py), started by torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node 4 -m tests.dist_worker \
        --model HF_DIR --logits OUT_DIR -- STATS_ARGS... [--- MORE_STATS_ARGS...]

Joins the gloo group, runs ``nllb-prune stats`` once per ``---``-separated argument list (the real
command path, under torchrun), then runs one padded batch per rank through the expert-parallel model
(every rank holding 1/world of the experts) and saves inputs and logits to ``OUT_DIR/rank{r}.pt``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist


def main(argv: list[str]) -> int:
    split = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--logits", required=True)
    args = parser.parse_args(argv[:split])
    runs, current = [], []
    for item in argv[split + 1 :]:
        if item == "---":
            runs.append(current)
            current = []
        else:
            current.append(item)
    runs.append(current)

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from pruning.cli import main as cli

    for run in runs:
        rc = cli(["stats", *run])
        if rc != 0:
            return rc
    save_logits(args.model, args.logits)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def save_logits(model_path: str, out_dir: str) -> None:
    from pruning.model.expert_parallel import load_expert_parallel_model
    from tests.fixtures import sentences

    rank = dist.get_rank()
    model = load_expert_parallel_model(model_path)
    tok = model.tokenizer
    tok.src_lang, tok.tgt_lang = "fra_Latn", "deu_Latn"
    # a different padded batch on every rank, so that tokens really travel between ranks
    batch = tok(sentences(2 + rank, seed=50 + rank), text_target=sentences(2 + rank, seed=60 + rank), padding=True, return_tensors="pt")
    labels = batch.pop("labels")
    decoder_input_ids = torch.cat([torch.full_like(labels[:, :1], 2), labels[:, :-1]], dim=1)
    inputs = {**batch, "decoder_input_ids": decoder_input_ids, "decoder_attention_mask": (labels != tok.pad_token_id).long()}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    held = {f"{side}.{layer}": moe.experts.num_experts for side, layer, moe in model.moe_layers()}
    os.makedirs(out_dir, exist_ok=True)
    torch.save({"inputs": dict(inputs), "logits": logits, "held": held}, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
