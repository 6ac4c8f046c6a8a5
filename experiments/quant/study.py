"""What quantized weights cost in chrF++ and off-target rate: full and pruned exports at bf16, int8, int4, paired.

    python -m experiments.quant.study                                   # the embedded 16-expert testbed
    python -m experiments.quant.study --model experiments/testbed/model128 --keep 48 --enc-keep 36 --name testbed128

Through the real CLI, as ``make demo`` does: routing statistics (teacher forcing on dev), the paper's
selection (importance, fixed per layer, per language; ``--keep``/``--enc-keep`` experts per direction),
then one export per (model, storage) serving every evaluated direction:

* models: ``full`` (an index keeping every expert, so that the unpruned model goes through the same
  export and quantization), and the pruned ones with ``--policy drop`` (the paper's) and ``skip``;
* storage: ``bf16`` (the reference of every pairing), ``int8``, ``int8+dense``, ``int4``, ``int4+dense``
  (``int4/32``: groups of 32 instead of 128);
* the no-expert floor: the unpruned model with every expert's fc2 weight and bias zeroed, so that the
  MoE layers add nothing (what every pruning result must beat), evaluated the same way.

Each is scored by ``nllb-prune evaluate`` (chrF++, the off-target rate from the testbed's language
identifier) on the same directions and sentences, computed in ``--compute`` (fp32: only the stored
weights differ). Paired differences against the same model at bf16, per direction, with a bootstrap 95%
interval over directions. Writes ``experiments/results/quant/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from pruning.cli import main as cli

RESULTS = Path("experiments/results/quant")
STORAGE = ("bf16", "int8", "int8+dense", "int4", "int4+dense", "int4/32")


def run_cli(*args: str) -> None:
    print("  $ nllb-prune " + " ".join(args), flush=True)
    code = cli(list(args))
    if code != 0:
        raise SystemExit(f"study: `nllb-prune {' '.join(args)}` failed with status {code}")


def storage_flags(storage: str) -> list[str]:
    """``int4+dense/32`` -> ``--quantize int4 --quantize-dense --group-size 32``; ``bf16`` -> []."""
    if storage == "bf16":
        return []
    base, _, group = storage.partition("/")
    scheme, _, dense = base.partition("+")
    flags = ["--quantize", scheme]
    if dense:
        flags.append("--quantize-dense")
    if group:
        flags += ["--group-size", group]
    return flags


def full_index(model: Path, out: Path) -> Path:
    """An index of one list holding every expert: the unpruned model as an export."""
    from pruning.checkpoint.reader import open_checkpoint

    topology = open_checkpoint(model).topology
    out.write_text(json.dumps(list(range(topology.num_total_experts))) + "\n")
    return out


def no_expert_floor(model: Path, out: Path) -> Path:
    """A copy of ``model`` whose experts output nothing (every fc2 weight and bias zeroed)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, out)
    for shard in out.glob("*.safetensors"):
        tensors = load_file(str(shard))
        for name in tensors:
            if ".experts." in name and ".fc2." in name:
                tensors[name].zero_()
        save_file(tensors, str(shard), metadata={"format": "pt"})
    return out


def paired(a: dict[str, float], b: dict[str, float], *, seed: int = 0, rounds: int = 10000) -> dict[str, Any]:
    """Mean of ``a - b`` over directions, bootstrap 95% interval over directions, directions better / worse."""
    keys = sorted(a)
    diffs = [a[k] - b[k] for k in keys]
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(rounds))
    return {
        "mean": round(statistics.fmean(diffs), 3),
        "ci95": [round(means[int(0.025 * rounds)], 3), round(means[int(0.975 * rounds) - 1], 3)],
        "better": sum(d > 0 for d in diffs),
        "worse": sum(d < 0 for d in diffs),
        "largest_drop": round(min(diffs), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("experiments/testbed/model"))
    parser.add_argument("--data", type=Path, default=Path("experiments/testbed/data/flores"))
    parser.add_argument("--lid", type=Path, default=Path("experiments/testbed/lid.json"))
    parser.add_argument("--work", type=Path, default=Path("outputs/quant-study"))
    parser.add_argument("--name", default="testbed16", help="results file stem under experiments/results/quant/")
    parser.add_argument("--keep", type=int, default=12, help="experts kept per direction (16-expert testbed: 12 of 64 = 81.25%% pruned)")
    parser.add_argument("--enc-keep", type=int, default=8, help="of which encoder experts (3:1 per layer: 4 + 4 encoder, 2 + 2 decoder)")
    parser.add_argument("--policies", default="drop,skip")
    parser.add_argument("--storage", default=",".join(STORAGE))
    parser.add_argument("--directions", type=int, default=24, help="evaluated directions (seeded sample)")
    parser.add_argument("--sentences", type=int, default=100, help="devtest sentences per direction")
    parser.add_argument("--stats-sentences", type=int, default=100)
    parser.add_argument("--beam", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--compute", default="fp32", help="compute dtype of every evaluation (fp32 | bf16)")
    args = parser.parse_args(argv)
    started = time.time()
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    langs = sorted(p.name.split(".")[0] for p in (args.data / "dev").glob("*.dev"))
    every = [(s, t) for s in langs for t in langs if s != t]
    evaluated = sorted(random.Random(0).sample(every, min(args.directions, len(every))))
    pairs = ",".join(f"{s}-{t}" for s, t in evaluated)
    storages = args.storage.split(",")
    if storages[0] != "bf16":
        raise SystemExit("study: --storage must start with bf16 (the reference of every pairing)")

    stats = work / "stats.safetensors"
    if not stats.exists():
        run_cli(
            "stats",
            "--model",
            str(args.model),
            "--data",
            str(args.data),
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
    experts = work / "experts.json"
    if not experts.exists():
        run_cli(
            "select",
            "--stats",
            str(stats),
            "--metric",
            "importance",
            "--strategy",
            "per-layer",
            "--keep",
            str(args.keep),
            "--enc-keep",
            str(args.enc_keep),
            "--granularity",
            "lang",
            "--min-per-layer",
            "1",
            "--out",
            str(experts),
        )
    indices = {"full": (full_index(args.model, work / "all-experts.json"), "drop")}
    indices.update({p: (experts, p) for p in args.policies.split(",")})

    common = [
        "--data",
        str(args.data),
        "--split",
        "devtest",
        "--pairs",
        pairs,
        "--max-sentences",
        str(args.sentences),
        "--beam",
        str(args.beam),
        "--max-length",
        str(args.max_length),
        "--device",
        "cpu",
        "--dtype",
        args.compute,
        "--spm",
        "none",
    ]
    if args.lid.is_file():
        common += ["--lid", str(args.lid)]
    from pruning.evaluate import read_scores

    def evaluate(model: Path, name: str) -> dict[str, dict[str, Any]]:
        scores = work / "scores" / f"{name}.tsv"
        if not scores.exists():
            scores.parent.mkdir(exist_ok=True)
            run_cli("evaluate", "--model", str(model), "--out", str(scores), *common)
        return read_scores(scores)

    results: dict[str, dict[str, dict[str, Any]]] = {}
    floor = work / "floor"
    if not floor.exists():
        no_expert_floor(args.model, floor)
    results["no-expert floor"] = evaluate(floor, "floor")
    sizes: dict[str, int] = {}
    for model_name, (index, policy) in indices.items():
        for storage in storages:
            name = f"{model_name}@{storage}"
            out = work / "exports" / name.replace("@", "-").replace("+", "_").replace("/", "g")
            if not out.exists():
                run_cli(
                    "export",
                    "--model",
                    str(args.model),
                    "--experts",
                    str(index),
                    "--langs",
                    ",".join(langs),
                    "--out",
                    str(out),
                    "--dtype",
                    "bf16",
                    "--policy",
                    policy,
                    *storage_flags(storage),
                )
            sizes[name] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            results[name] = evaluate(out, name.replace("@", "-").replace("+", "_").replace("/", "g"))

    chrf = {name: {d: s["chrF++"] for d, s in scores.items()} for name, scores in results.items()}
    off = {name: {d: s.get("off_target") for d, s in scores.items()} for name, scores in results.items()}
    rows = []
    for name in results:
        model_name, _, storage = name.partition("@")
        row: dict[str, Any] = {
            "model": model_name,
            "storage": storage or "bf16",
            "mean_chrf++": round(statistics.fmean(chrf[name].values()), 2),
            "mean_off_target_%": round(statistics.fmean(v for v in off[name].values() if v is not None), 2)
            if any(v is not None for v in off[name].values())
            else None,
            "export_bytes": sizes.get(name),
        }
        if storage and storage != "bf16":
            row["vs_bf16"] = paired(chrf[name], chrf[f"{model_name}@bf16"])
        rows.append(row)
    from pruning.versions import versions

    payload = {
        "what": "chrF++ / off-target of full and pruned exports by weight storage, paired with the same model at bf16",
        "model": str(args.model),
        "directions": evaluated,
        "sentences": args.sentences,
        "beam": args.beam,
        "compute_dtype": args.compute,
        "selection": f"importance, per-layer, per language, keep {args.keep} (encoder {args.enc_keep}) per direction",
        "pruned_share": None,
        "rows": rows,
        "chrf++": chrf,
        "off_target_%": off,
        "command": " ".join(["python -m experiments.quant.study", *sys.argv[1:]]),
        "device": "cpu (no GPU lent to this task)",
        "versions": versions(),
        "seconds": round(time.time() - started, 1),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    from pruning.checkpoint.reader import open_checkpoint

    total = open_checkpoint(args.model).topology.num_total_experts
    payload["pruned_share"] = round(1 - args.keep / total, 4)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(payload))
    print(markdown(payload))
    return 0


def markdown(payload: dict[str, Any]) -> str:
    lines = [
        f"# Quantized weights on {payload['model']} ({payload['name'] if 'name' in payload else ''})".replace(" ()", ""),
        "",
        f"- command: `{payload['command']}`",
        f"- {len(payload['directions'])} directions x {payload['sentences']} devtest sentences, beam {payload['beam']}, compute {payload['compute_dtype']}, {payload['device']}",
        f"- selection: {payload['selection']} ({100 * payload['pruned_share']:.2f}% of experts pruned)",
        f"- versions: {payload['versions']}; {payload['date']}",
        "",
        "| model | storage | chrF++ | off-target % | export MB | chrF++ vs bf16 (mean, 95% CI over directions) | better / worse | largest drop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        vs = row.get("vs_bf16")
        delta = f"{vs['mean']:+.2f} [{vs['ci95'][0]:+.2f}, {vs['ci95'][1]:+.2f}]" if vs else ""
        counts = f"{vs['better']} / {vs['worse']}" if vs else ""
        drop = f"{vs['largest_drop']:+.2f}" if vs else ""
        size = f"{row['export_bytes'] / 1e6:.2f}" if row.get("export_bytes") else ""
        lines.append(
            f"| {row['model']} | {row['storage'] if row['model'] != 'no-expert floor' else '-'} | {row['mean_chrf++']:.2f} | "
            f"{row['mean_off_target_%'] if row['mean_off_target_%'] is not None else ''} | {size} | {delta} | {counts} | {drop} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
