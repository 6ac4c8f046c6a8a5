"""Train the testbed NLLB-MoE many-to-many on the synthetic corpus (CPU or GPU), resumable.

    python -m experiments.testbed.train --data experiments/testbed/data --tokenizer experiments/testbed/data/tokenizer \
        --out outputs/testbed-train --model-out experiments/testbed/model --max-minutes 60

Same architecture and routing as NLLB-200 MoE (our MoeLayer: fp32 router, top-2, expert output
masking with fairseq's training semantics: a whole token's expert output is zeroed with probability
``eom``, no rescaling, and multiplied by ``1 - eom`` at inference), plus what the TESTBED notes
found necessary: our own load-balancing loss (NLLB/GShard form: E * sum_e mean_prob_e * top1_share_e
per MoE layer) and router z-loss computed from the router logits, fairseq initialisation (embeddings
N(0, d^-1/2), Xavier-uniform matrices), no expert capacity dropping while training.

Every ``--save-minutes`` the full state (model, optimiser, step, elapsed time) goes to
``OUT/checkpoint.pt`` (written to a temporary name, then renamed); a rerun resumes from it. Batches
are a deterministic function of (seed, step), so a resumed run sees the batches it would have seen.
At the end the model is saved in the HF layout with its tokenizer to ``--model-out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pruning.model.build import NllbMoeForPruning, build_empty_model, init_random_weights
from pruning.model.moe import MoeLayer, Routing
from pruning.topology import Topology


@dataclass
class TrainConfig:
    data: str = field(default="experiments/testbed/data", metadata={"help": "corpus directory"})
    tokenizer: str = field(default="experiments/testbed/data/tokenizer", metadata={"help": "tokenizer directory"})
    out: str = field(default="outputs/testbed128-train", metadata={"help": "checkpoints and logs (outside git)"})
    model_out: str = field(default="experiments/testbed/model128", metadata={"help": "final HF-layout model"})
    d_model: int = 128
    ffn: int = field(default=64, metadata={"help": "FFN width of every expert (and of dense FFNs, if any)"})
    layers: int = 4
    sparse_step: int = field(default=1, metadata={"help": "every N-th layer is MoE; 1: every layer (no dense FFN)"})
    experts: int = 128
    heads: int = 4
    dropout: float = 0.1
    eom: float = 0.2
    lr: float = 2e-3
    warmup: int = 400
    batch_tokens: int = 4000
    label_smoothing: float = 0.1
    balance_loss: float = 0.01
    z_loss: float = 0.001
    max_minutes: float = 60.0
    max_steps: int = 0
    save_minutes: float = 5.0
    eval_every: int = 500
    eval_sentences: int = 40
    seed: int = 0
    threads: int = 0
    device: str = "cpu"
    save_dtype: str = "bf16"


# ---- data -----------------------------------------------------------------------------------------
class Batches:
    """Random direction per example, sentences tokenized once; batches are a function of (seed, step)."""

    def __init__(self, cfg: TrainConfig, tokenizer):  # noqa: ANN001
        from experiments.testbed.corpus import read_manifest, read_train

        manifest = read_manifest(cfg.data)
        self.codes = [entry["code"] for entry in manifest["languages"]]
        self.tokenizer = tokenizer
        self.ids = {}
        for code in self.codes:
            lines = read_train(cfg.data, code)
            self.ids[code] = [tokenizer(line, add_special_tokens=False)["input_ids"] for line in lines]
        self.lang_id = {code: tokenizer.convert_tokens_to_ids(code) for code in self.codes}
        self.directions = [(s, t) for s in self.codes for t in self.codes if s != t]
        self.cfg = cfg
        mean_len = sum(len(x) for v in self.ids.values() for x in v) / sum(len(v) for v in self.ids.values())
        self.per_batch = max(8, int(cfg.batch_tokens / (mean_len + 2)))

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        rng = random.Random(self.cfg.seed * 1_000_003 + step)
        sources, targets = [], []
        for _ in range(self.per_batch):
            src, tgt = rng.choice(self.directions)
            n = min(len(self.ids[src]), len(self.ids[tgt]))
            i = rng.randrange(n)
            sources.append([self.lang_id[src], *self.ids[src][i], self.tokenizer.eos_token_id])
            targets.append([self.lang_id[tgt], *self.ids[tgt][i], self.tokenizer.eos_token_id])
        return collate(sources, targets, pad=self.tokenizer.pad_token_id, eos=self.tokenizer.eos_token_id)


def collate(sources: list[list[int]], targets: list[list[int]], *, pad: int, eos: int) -> dict[str, torch.Tensor]:
    """Encoder `[src_lang] x </s>`; labels `[tgt_lang] y </s>`; decoder input = labels shifted right after `</s>`."""

    def pad_to(seqs: list[list[int]]) -> torch.Tensor:
        width = max(len(s) for s in seqs)
        return torch.tensor([s + [pad] * (width - len(s)) for s in seqs])

    input_ids, labels = pad_to(sources), pad_to(targets)
    decoder_input_ids = torch.cat([torch.full_like(labels[:, :1], eos), labels[:, :-1]], dim=1)
    return {
        "input_ids": input_ids,
        "attention_mask": (input_ids != pad).long(),
        "decoder_input_ids": decoder_input_ids,
        "decoder_attention_mask": torch.cat([torch.ones_like(labels[:, :1]), (labels[:, :-1] != pad).long()], dim=1),
        "labels": labels,
    }


# ---- model ----------------------------------------------------------------------------------------
def make_model(cfg: TrainConfig, vocab_size: int, *, device: torch.device) -> NllbMoeForPruning:
    topology = Topology(
        encoder_layers=cfg.layers,
        decoder_layers=cfg.layers,
        encoder_sparse_step=cfg.sparse_step,
        decoder_sparse_step=cfg.sparse_step,
        num_experts=cfg.experts,
        d_model=cfg.d_model,
        ffn_dim=cfg.ffn,
        vocab_size=vocab_size,
        encoder_attention_heads=cfg.heads,
        decoder_attention_heads=cfg.heads,
    )
    config = topology.to_hf_config(max_position_embeddings=256, dropout=cfg.dropout, moe_token_dropout=cfg.eom)
    model = build_empty_model(config, dtype=torch.float32, device=device)
    init_random_weights(model, seed=cfg.seed, scheme="fairseq")
    for param in model.parameters():
        param.requires_grad_(True)
    return model


class RoutingTap:
    """Collects each MoE layer's Routing during a forward (a hook: forward itself keeps no state)."""

    def __init__(self, model: NllbMoeForPruning):
        self.routings: list[Routing] = []
        self.handles = [moe.register_forward_hook(self._hook) for _, _, moe in model.moe_layers()]

    def _hook(self, module: MoeLayer, inputs, output) -> None:  # noqa: ANN001
        self.routings.append(output[1])

    def pop(self) -> list[Routing]:
        out, self.routings = self.routings, []
        return out


def router_losses(routings: list[Routing]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over MoE layers of the balance loss E * sum_e(mean prob_e * top1 share_e) and the z-loss."""
    balance, z = [], []
    for r in routings:
        real = r.token_mask
        probs = r.probs[real]  # [T_real, E]
        n_experts = probs.shape[1]
        share = torch.bincount(r.expert_idx[real, 0], minlength=n_experts).float() / max(1, int(real.sum()))
        balance.append(n_experts * (probs.mean(0) * share).sum())
        z.append(torch.logsumexp(r.logits[real], dim=-1).pow(2).mean())
    return torch.stack(balance).mean(), torch.stack(z).mean()


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.lr * math.sqrt(cfg.warmup / (step + 1))


# ---- evaluation -----------------------------------------------------------------------------------
def quick_chrf(model: NllbMoeForPruning, tokenizer, cfg: TrainConfig, directions: list[tuple[str, str]]) -> dict[str, float]:  # noqa: ANN001
    import sacrebleu

    from pruning.data.flores import FloresDir

    flores = FloresDir(Path(cfg.data) / "flores")
    was_training = model.training
    model.eval()
    scores = {}
    with torch.no_grad():
        for src, tgt in directions:
            sources = flores.read(src, "devtest")[: cfg.eval_sentences]
            refs = flores.read(tgt, "devtest")[: cfg.eval_sentences]
            tokenizer.src_lang = src
            batch = tokenizer(sources, return_tensors="pt", padding=True).to(model.device)
            out = model.generate(**batch, forced_bos_token_id=tokenizer.convert_tokens_to_ids(tgt), num_beams=1, max_new_tokens=64)
            hyps = tokenizer.batch_decode(out, skip_special_tokens=True)
            scores[f"{src}-{tgt}"] = sacrebleu.corpus_chrf(hyps, [refs], word_order=2).score
    model.train(was_training)
    return scores


# ---- loop -----------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> Path:
    from experiments.testbed.tokenizer import load as load_tokenizer
    from pruning.model.saving import save_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(cfg.tokenizer)
    batches = Batches(cfg, tokenizer)
    model = make_model(cfg, len(tokenizer), device=device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
    step, elapsed = 0, 0.0
    checkpoint = out / "checkpoint.pt"
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if state["config"] != asdict(cfg) | {"max_minutes": state["config"]["max_minutes"], "max_steps": state["config"]["max_steps"]}:
            print("warning: resuming with a different config than the checkpoint's")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = int(state["step"]), float(state["elapsed"])
        print(f"resumed from {checkpoint} at step {step} ({elapsed / 60:.1f} min)")
    tap = RoutingTap(model)
    log = open(out / "log.jsonl", "a")
    eval_dirs = [
        (batches.codes[0], batches.codes[1]),
        (batches.codes[1], batches.codes[0]),
        (batches.codes[2], batches.codes[-1]),
        (batches.codes[-1], batches.codes[3]),
    ]
    last_save = time.time()
    started = time.time() - elapsed
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {batches.per_batch} sentences per batch, {len(batches.directions)} directions")
    while True:
        elapsed = time.time() - started
        if (cfg.max_steps and step >= cfg.max_steps) or elapsed > cfg.max_minutes * 60:
            break
        torch.manual_seed(cfg.seed * 7919 + step)
        batch = {k: v.to(device) for k, v in batches.batch(step).items()}
        labels = batch.pop("labels")
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        logits = model(**batch).logits
        tap_routings = tap.pop()
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=tokenizer.pad_token_id, label_smoothing=cfg.label_smoothing
        )
        balance, z = router_losses(tap_routings)
        loss = ce + cfg.balance_loss * balance + cfg.z_loss * z
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 50 == 0:
            tokens = int(batch["attention_mask"].sum() + batch["decoder_attention_mask"].sum())
            record = {
                "step": step,
                "minutes": round((time.time() - started) / 60, 2),
                "ce": round(ce.item(), 4),
                "balance": round(balance.item(), 4),
                "z": round(z.item(), 3),
                "lr": lr_at(step, cfg),
                "tokens": tokens,
            }
            print(json.dumps(record), flush=True)
            log.write(json.dumps(record) + "\n")
            log.flush()
        if cfg.eval_every and step % cfg.eval_every == 0:
            scores = quick_chrf(model, tokenizer, cfg, eval_dirs)
            model.set_no_experts(True)
            floor = quick_chrf(model, tokenizer, cfg, eval_dirs)
            model.set_no_experts(False)
            record = {
                "step": step,
                "minutes": round((time.time() - started) / 60, 2),
                "chrf++": scores,
                "mean_chrf++": round(sum(scores.values()) / len(scores), 2),
                "floor_chrf++": round(sum(floor.values()) / len(floor), 2),
            }
            print(json.dumps(record), flush=True)
            log.write(json.dumps(record) + "\n")
            log.flush()
        if time.time() - last_save > cfg.save_minutes * 60:
            save_checkpoint(checkpoint, model, optimizer, step, time.time() - started, cfg)
            last_save = time.time()
    save_checkpoint(checkpoint, model, optimizer, step, time.time() - started, cfg)
    model.eval()
    from pruning.model.loading import parse_dtype

    path = save_model(model, cfg.model_out, dtype=parse_dtype(cfg.save_dtype), tokenizer=tokenizer, overwrite=True)
    summary = {
        "steps": step,
        "minutes": round((time.time() - started) / 60, 1),
        "config": asdict(cfg),
        "params": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"saved {path} after {step} steps")
    return path


def save_checkpoint(path: Path, model: nn.Module, optimizer, step: int, elapsed: float, cfg: TrainConfig) -> None:  # noqa: ANN001
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "elapsed": elapsed, "config": asdict(cfg)}, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    from pruning.config import add_dataclass_flags, resolve

    parser = argparse.ArgumentParser(prog="python -m experiments.testbed.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(parser, TrainConfig)
    cfg = resolve(TrainConfig, parser.parse_args(argv))
    train(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
