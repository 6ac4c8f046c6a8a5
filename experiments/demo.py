"""`make demo`: the whole path on the embedded default model, offline, through the real CLI.

    statistics (teacher forcing on dev) -> select (the paper's setting: importance, fixed per layer,
    3:1, per language, 80% pruned: 36 of 128 experts per encoder MoE layer, 12 per decoder one)
    -> export (all testbed languages, one checkpoint; pruned experts dropped as in the paper, and
    skipped: --policy skip) -> translate -> evaluate full, drop, skip and the no-expert floor -> plots

Writes everything under --out, the results in ``OUT/demo.json`` (per-direction chrF++ of the full
model, both pruned exports and the no-expert floor, with their off-target rates from the testbed's
language identifier ``experiments/testbed/lid.json``). ``--record`` also writes
``experiments/results/demo.json`` (a plain ``make demo`` changes no tracked file). The default model
is the 128-expert testbed in ``experiments/testbed/model128`` (``--model`` for another, e.g. the
16-expert ``experiments/testbed/model``); ``--tiny`` runs the same steps on the tiny random
real-topology fixture instead (noise translations).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

from pruning.cli import main as cli
from pruning.versions import versions

TESTBED = Path("experiments/testbed")
RESULTS = Path("experiments/results/demo.json")
COLUMNS = ("full", "pruned", "pruned-skip", "no-experts")
"""Evaluated models: the unpruned one, the pruned export with dropped experts, the same experts with --policy skip,
and the unpruned one with every expert output zeroed (the floor: what the dense layers alone do)."""


def step(number: int, total: int, text: str) -> None:
    print(f"\n[{number}/{total}] {text}", flush=True)


def run_cli(*args: str) -> None:
    print("  $ nllb-prune " + " ".join(args), flush=True)
    code = cli(list(args))
    if code != 0:
        raise SystemExit(f"demo: `nllb-prune {' '.join(args)}` failed with status {code}")


def tiny_inputs(out: Path) -> tuple[Path, Path, list[str]]:
    """The tiny fixture and a small FLORES-layout directory in three real NLLB codes."""
    from tests import fixtures

    fixtures.main(["--out", str(out / "tiny")])
    flores = out / "tiny-flores"
    langs = ["fra_Latn", "deu_Latn", "eng_Latn"]
    for split, seed in (("dev", 10), ("devtest", 20)):
        (flores / split).mkdir(parents=True, exist_ok=True)
        for i, lang in enumerate(langs):
            lines = fixtures.sentences(12, seed=seed + i)
            (flores / split / f"{lang}.{split}").write_text("\n".join(lines) + "\n")
    return out / "tiny" / "hf", flores, langs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--tiny", action="store_true", help="use the tiny random fixture instead of the testbed")
    parser.add_argument("--directions", type=int, default=12, help="directions evaluated (seeded sample)")
    parser.add_argument("--sentences", type=int, default=50, help="devtest sentences per evaluated direction")
    parser.add_argument("--stats-sentences", type=int, default=100, help="dev sentences per direction for the statistics")
    parser.add_argument("--record", action="store_true", help="also write experiments/results/demo.json (tracked)")
    parser.add_argument("--model", type=Path, default=TESTBED / "model128", help="the trained testbed to prune")
    args = parser.parse_args(argv)
    started = time.time()
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model: Path = args.model
    if args.tiny or not (model / "config.json").is_file():
        if not args.tiny:
            print(f"demo: no trained testbed in {model} (train it with `make testbed`); using the tiny fixture")
        model, flores, langs = tiny_inputs(out)
        ratio, min_per_layer, evaluated = "0.8", "4", [(s, t) for s in langs for t in langs if s != t]
        max_length = "12"  # random weights never stop on their own
    else:
        flores = TESTBED / "data" / "flores"
        langs = sorted(p.name.split(".")[0] for p in (flores / "dev").glob("*.dev"))
        # the paper's 80% at 3:1 needs enough experts per layer: 36/12 of 128; the 16-expert testbed gets 75% (6/2)
        num_experts = json.loads((model / "config.json").read_text())["num_experts"]
        ratio, min_per_layer = ("0.8", "4") if num_experts >= 64 else ("0.75", "1")
        max_length = "64"
        every = [(s, t) for s in langs for t in langs if s != t]
        evaluated = sorted(random.Random(0).sample(every, min(args.directions, len(every))))
    pairs = ",".join(f"{s}-{t}" for s, t in evaluated)
    total = 6

    step(1, total, f"routing statistics by teacher forcing on dev ({len(langs)} languages, all directions)")
    stats = out / "stats.safetensors"
    run_cli(
        "stats",
        "--model",
        str(model),
        "--data",
        str(flores),
        "--split",
        "dev",
        "--langs",
        ",".join(langs),
        "--max-sentences",
        str(args.stats_sentences),
        "--out",
        str(stats),
        "--no-progress",
    )

    step(2, total, f"select: importance, fixed per layer, 3:1, per language, --ratio {ratio}")
    experts = out / "experts.json"
    run_cli(
        "select",
        "--stats",
        str(stats),
        "--metric",
        "importance",
        "--strategy",
        "per-layer",
        "--ratio",
        ratio,
        "--enc-dec",
        "3:1",
        "--granularity",
        "lang",
        "--min-per-layer",
        min_per_layer,
        "--out",
        str(experts),
    )

    step(3, total, "export one pruned checkpoint serving every direction (each routes over its own experts)")
    pruned = out / "pruned"
    run_cli("export", "--model", str(model), "--experts", str(experts), "--langs", ",".join(langs), "--out", str(pruned), "--dtype", "bf16")
    run_cli("info", str(pruned))
    skipped = out / "pruned-skip"  # the same experts; a token routed to a pruned one gets nothing from it
    run_cli(
        "export", "--model", str(model), "--experts", str(experts), "--langs", ",".join(langs), "--out", str(skipped), "--dtype", "bf16", "--policy", "skip"
    )

    decoding = ["--beam", "2", "--max-length", max_length, "--device", "cpu", "--dtype", "fp32"]  # translate and evaluate alike
    step(4, total, "translate a few sentences with the pruned model")
    src, tgt = evaluated[0]
    sample = out / "sample.src"
    from pruning.data.flores import FloresDir

    sample.write_text("\n".join(FloresDir(flores).read(src, "devtest")[:3]) + "\n")
    run_cli(
        "translate",
        "--model",
        str(pruned),
        "--src",
        src,
        "--tgt",
        tgt,
        "--input",
        str(sample),
        "--output",
        str(out / "sample.hyp"),
        *decoding,
    )
    for line_in, line_out in zip(sample.read_text().splitlines(), (out / "sample.hyp").read_text().splitlines()):
        print(f"  {src}: {line_in}\n  {tgt}: {line_out}")

    step(5, total, f"evaluate full, pruned (drop, skip) and no experts at all: {len(evaluated)} directions x {args.sentences} devtest sentences, chrF++")
    common = [
        "--data",
        str(flores),
        "--split",
        "devtest",
        "--pairs",
        pairs,
        "--max-sentences",
        str(args.sentences),
        *decoding,
        "--spm",
        "none",
    ]
    lid = TESTBED / "lid.json"
    if not args.tiny and model.parent == TESTBED and lid.is_file():
        common += ["--lid", str(lid)]  # off-target rate (the tiny fixture's languages are not the identifier's)
    run_cli("evaluate", "--model", str(model), "--out", str(out / "full.tsv"), *common)
    run_cli("evaluate", "--model", str(pruned), "--out", str(out / "pruned.tsv"), *common, "--compare", str(out / "full.tsv"))
    run_cli("evaluate", "--model", str(skipped), "--out", str(out / "pruned-skip.tsv"), *common, "--compare", str(out / "full.tsv"))
    run_cli("evaluate", "--model", str(model), "--zero-experts", "--out", str(out / "no-experts.tsv"), *common, "--compare", str(out / "full.tsv"))

    step(6, total, "plots: expert usage per language, experts kept per layer, language similarity")
    run_cli("plot", "--stats", str(stats), "--experts", str(experts), "--out", str(out / "plots"))

    from pruning.evaluate import read_scores

    scores = {name: read_scores(out / f"{name}.tsv") for name in COLUMNS}
    rows = {d: {name: scores[name][d]["chrF++"] for name in COLUMNS} for d in sorted(scores["full"])}
    mean = {name: round(sum(r[name] for r in rows.values()) / len(rows), 2) for name in COLUMNS}
    off_target = {}
    if "--lid" in common:
        off_target = {name: round(sum(scores[name][d]["off_target"] for d in rows) / len(rows), 2) for name in COLUMNS}
    result = {
        "model": str(model),
        "experts": str(experts),
        "selection": f"importance, per-layer, 3:1, per language, ratio {ratio}",
        "columns": {
            "pruned": "export --policy drop (the paper's)",
            "pruned-skip": "export --policy skip",
            "no-experts": "the full model with every expert output zeroed (evaluate --zero-experts): the floor",
        },
        "directions": len(rows),
        "sentences": args.sentences,
        "beam": 2,
        "metric": "chrF++ (sacrebleu, word_order=2)",
        "mean_chrf++": mean,
        "chrf++": rows,
        "seconds": round(time.time() - started, 1),
        **({"mean_off_target_%": off_target, "lid": str(TESTBED / "lid.json")} if off_target else {}),
        "command": "make demo (" + " ".join(["python -m experiments.demo", *sys.argv[1:]]) + ")",
        "device": "cpu",
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    if args.record and not args.tiny:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    (out / "demo.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{'direction':<22}" + "".join(f"{name:>13}" for name in COLUMNS))
    for d, r in [*rows.items(), ("mean", mean), *([("off-target %", off_target)] if off_target else [])]:
        print(f"{d:<22}" + "".join(f"{r[name]:>13.2f}" for name in COLUMNS))
    print(f"\ndemo finished in {result['seconds']} s; outputs in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
