"""How far each ``--policy`` export is from the full model, on the tiny random fixture (seconds, CPU).

    python -m experiments.policy_check --out /tmp/policy-check [--lines 40 --keep 32]

Builds the tiny real-topology model (tests/fixtures.py), collects statistics with
``nllb-prune stats --expert-outputs`` on a synthetic FLORES-layout directory, exports fra->deu with
``--policy drop|substitute|merge`` (fp32) and, teacher forcing held-out devtest sentences, prints per
policy the per-token KL(full || pruned) and the next-token agreement with the full model. A random
model: it checks that the policies do what they say, it says nothing about translation quality.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from pruning import load_model
from pruning.cli import main as cli

POLICIES = ("drop", "substitute", "merge")


def _batch(model, root: Path, *, n: int):  # noqa: ANN001, ANN202
    tok = model.tokenizer
    tok.src_lang, tok.tgt_lang = "fra_Latn", "deu_Latn"
    src = (root / "flores/devtest/fra_Latn.devtest").read_text().splitlines()[:n]
    tgt = (root / "flores/devtest/deu_Latn.devtest").read_text().splitlines()[:n]
    batch = tok(src, text_target=tgt, padding=True, return_tensors="pt")
    labels = batch.pop("labels")
    decoder = torch.cat([torch.full_like(labels[:, :1], tok.eos_token_id), labels[:, :-1]], 1)
    return {**batch, "decoder_input_ids": decoder}, labels != tok.pad_token_id


def main(argv: list[str] | None = None) -> int:
    from tests import export_fixtures as ef
    from tests import fixtures

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lines", type=int, default=40, help="synthetic sentences per language and split")
    parser.add_argument("--keep", type=int, default=32, help="experts kept per MoE layer")
    args = parser.parse_args(argv)
    root = args.out
    shutil.rmtree(root, ignore_errors=True)
    torch.set_num_threads(1)
    fixtures.make_tokenizer(root / "tok")
    hf = ef.talkative_hf_dir(root / "hf", root / "tok")
    ef.flores_dir(root / "flores", lines=args.lines)
    stats = root / "stats.safetensors"
    langs = ",".join(ef.LANGS)
    if cli(
        [
            "stats",
            "--model",
            str(hf),
            "--data",
            str(root / "flores"),
            "--split",
            "dev",
            "--langs",
            langs,
            "--expert-outputs",
            "--out",
            str(stats),
            "--no-progress",
        ]
    ):
        return 1
    full = load_model(hf)
    ef.write_lang_index(root / "experts.json", full.topology, enc=args.keep, dec=args.keep)
    batch, mask = _batch(full, root, n=16)
    with torch.no_grad():
        reference = full(**batch).logits.float()
    for policy in POLICIES:
        out = root / policy
        flags = ["--src", "fra_Latn", "--tgt", "deu_Latn", "--dtype", "fp32", "--policy", policy, "--stats", str(stats)]
        if cli(["export", "--model", str(hf), "--experts", str(root / "experts.json"), "--out", str(out), *flags]):
            return 1
        with torch.no_grad():
            got = load_model(out)(**batch).logits.float()
        kl = torch.nn.functional.kl_div(got.log_softmax(-1)[mask], reference.log_softmax(-1)[mask], log_target=True, reduction="batchmean")
        agree = (got.argmax(-1) == reference.argmax(-1))[mask].float().mean()
        print(f"{policy:10s} KL(full || pruned) per token {float(kl):.4f}   next-token agreement with full {float(agree):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
