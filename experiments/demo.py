"""`make demo`: the main path end to end on the embedded default model, offline.

Until the trained testbed is committed, the default is the tiny real-topology fixture (random
weights): the steps run for real, the translations are noise.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    args = parser.parse_args(argv)
    from pruning import load_model
    from pruning.checkpoint.convert import convert_checkpoint
    from pruning.info import describe_checkpoint, format_description
    from tests import fixtures

    start = time.time()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    print("[1/3] building the tiny real-topology model in both layouts")
    fixtures.main(["--out", str(out / "tiny")])
    print("[2/3] converting the fairseq layout to HF safetensors (bf16)")
    converted = convert_checkpoint(out / "tiny" / "fairseq", out / "tiny-bf16", dtype=torch.bfloat16, overwrite=True, progress=False)
    print(format_description(describe_checkpoint(converted)))
    print("[3/3] loading and translating")
    model = load_model(converted)
    tok = model.tokenizer
    tok.src_lang = "fra_Latn"
    batch = tok(fixtures.sentences(2, seed=3), return_tensors="pt", padding=True)
    generated = model.generate(**batch, forced_bos_token_id=tok.convert_tokens_to_ids("deu_Latn"), num_beams=2, max_new_tokens=8)
    print(tok.batch_decode(generated, skip_special_tokens=True))
    summary = {"seconds": round(time.time() - start, 1), "model": str(converted), "dispatch": model.dispatch_name}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"done in {summary['seconds']} s; outputs in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
