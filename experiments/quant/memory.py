"""Memory of quantized exports at NLLB-200's width: export bytes and load peak, measured, beside ``plan``'s figures.

    python -m experiments.fullwidth.generate --out /work/q-rehearsal --layout hf --dtype bf16 --experts 48
    python -m experiments.quant.memory --rehearsal /work/q-rehearsal --work /work/q-memory
    python -m experiments.quant.memory --plan-only        # the plan table for the real NLLB-200 only

Part 1 (measured): the full-width rehearsal (d_model 2048, FFN 8192, vocabulary 256,206, 4+4 layers,
one MoE layer per side) is exported as NLLB-200 80% pruned keeps a layer (36 encoder, 12 decoder
experts) at bf16, int8, int8+dense, int4 and int4+dense; each export and a ``load_model`` of it (bf16
compute) run as separate processes measured by :func:`experiments.fullwidth.measure.measure` (peak of
the summed RssAnon of the process tree). The rehearsal holds 48 experts per MoE layer instead of 128:
an export reads only the kept experts and a load only the export, so neither figure depends on the
experts the source has beyond those (its routers are 0.5 MB smaller). ``plan``'s weights for the same
export (``--device cpu``: weights + 0.3 GiB runtime) stand beside each load peak.

Part 2 (planned): ``plan`` for the real NLLB-200 at 80% pruned (the paper's 288 experts per direction),
one direction and a multi-direction export (the paper's released per-language index for
``--langs``), batch 16 x beam 4, on 16 / 24 / 32 GB GPUs, at bf16 / int8 / int8+dense / int4 / int4+dense:
GiB per device, fits, and the largest batch that fits.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path("experiments/results/quant")
STORAGE = {
    "bf16": [],
    "int8": ["--quantize", "int8"],
    "int8+dense": ["--quantize", "int8", "--quantize-dense"],
    "int4": ["--quantize", "int4"],
    "int4+dense": ["--quantize", "int4", "--quantize-dense"],
}
KEEP = {"encoder": 36, "decoder": 12}
"""NLLB-200 at 80% pruned, 3:1 (the paper's): experts kept per encoder / decoder MoE layer."""
PAPER_INDEX = Path("../shared/data/nllb-pruning-paper/experts.json")
PAPER_LANGS = "eng_Latn,fra_Latn,deu_Latn"
GIB = 2**30


def rehearsal_index(model: Path, out: Path) -> Path:
    from pruning.checkpoint.reader import open_checkpoint

    topology = open_checkpoint(model).topology
    ids = [topology.global_id(side, layer, e) for _, side, layer in topology.iter_moe_layers() for e in range(KEEP[side])]
    out.write_text(json.dumps(ids) + "\n")
    return out


def planned_weights(model: Path, storage: str) -> int:
    """``plan``'s bytes for the weights of this export (what a CPU load holds besides the runtime)."""
    from pruning.checkpoint.reader import open_checkpoint
    from pruning.plan import Hardware, Workload, plan_model

    topology = open_checkpoint(model).topology
    flags = STORAGE[storage]
    workload = Workload("bf16", batch=1, beam=1, src_len=1, max_length=1, quantize=flags[1] if flags else "", quantize_dense="--quantize-dense" in flags)
    kept = sum(KEEP[side] for _, side, _ in topology.iter_moe_layers())
    part = plan_model("load", topology, Hardware(1, 64 * GIB, "cpu"), workload, experts=kept, router_rows=kept / topology.num_moe_layers)
    return int(part["weights_bytes"])


def measured(rehearsal: Path, work: Path) -> list[dict[str, Any]]:
    from experiments.fullwidth.measure import measure

    work.mkdir(parents=True, exist_ok=True)
    index = rehearsal_index(rehearsal, work / "experts.json")
    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    for storage, flags in STORAGE.items():
        out = work / storage.replace("+", "_")
        if out.exists():
            shutil.rmtree(out)
        export = measure(
            [sys.executable, "-m", "pruning", "export", "--model", str(rehearsal), "--experts", str(index), "--out", str(out), "--dtype", "bf16", *flags],
            env=env,
            drop_cache=False,
        )
        if export.returncode:
            raise SystemExit(f"export {storage} failed: {export.output_tail}")
        nbytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        load = measure([sys.executable, "-c", f"from pruning import load_model; load_model({str(out)!r}, dtype='bf16')"], env=env, drop_cache=False)
        if load.returncode:
            raise SystemExit(f"load {storage} failed: {load.output_tail}")
        plan = planned_weights(out, storage)
        rows.append(
            {
                "storage": storage,
                "export_bytes": nbytes,
                "export_peak_rss_anon": export.peak_rss_anon_bytes,
                "export_s": round(export.wall_s, 1),
                "load_peak_rss_anon": load.peak_rss_anon_bytes,
                "load_s": round(load.wall_s, 1),
                "plan_weights_bytes": plan,
                "plan_load_bytes": plan + int(0.30 * GIB),
            }
        )
        print(rows[-1], flush=True)
        shutil.rmtree(out)
    return rows


def planned(args: argparse.Namespace) -> list[dict[str, Any]]:
    from pruning.export import parse_directions
    from pruning.plan import Hardware, Workload, build_plan, kept_from_index, kept_from_ratio
    from pruning.topology import NLLB_MOE_54B

    rows = []
    for storage, flags in STORAGE.items():
        for memory in (16, 24, 32):
            workload = Workload("bf16", batch=16, beam=4, quantize=flags[1] if flags else "", quantize_dense="--quantize-dense" in flags)
            hardware = Hardware(1, memory * GIB, "cuda")
            one = build_plan(NLLB_MOE_54B, hardware, workload, kept_from_ratio(NLLB_MOE_54B, 0.8, "3:1"))["translation_one_direction"]
            row = {
                "storage": storage,
                "gpu_GiB": memory,
                "one_direction_GiB": round(one["total_bytes"] / GIB, 2),
                "one_direction_fits": one["fits"],
                "one_direction_largest_batch": one["largest_batch"],
                "one_direction_weights_GiB": round(one["weights_bytes"] / GIB, 2),
            }
            if args.index.is_file():
                kept = kept_from_index(NLLB_MOE_54B, args.index, parse_directions(langs=args.langs.split(",")))
                multi = build_plan(NLLB_MOE_54B, hardware, workload, kept)["translation_multi_direction"]
                row.update(
                    {
                        "multi_direction_GiB": round(multi["total_bytes"] / GIB, 2),
                        "multi_direction_fits": multi["fits"],
                        "multi_direction_largest_batch": multi["largest_batch"],
                        "multi_direction_weights_GiB": round(multi["weights_bytes"] / GIB, 2),
                        "multi_direction_experts": kept.union,
                    }
                )
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rehearsal", type=Path, default=Path("/work/q-rehearsal"))
    parser.add_argument("--work", type=Path, default=Path("/work/q-memory"))
    parser.add_argument("--plan-only", action="store_true")
    parser.add_argument("--index", type=Path, default=PAPER_INDEX, help="per-language index for the multi-direction plan (the paper's)")
    parser.add_argument("--langs", default=PAPER_LANGS)
    args = parser.parse_args(argv)
    from pruning.versions import versions

    path = RESULTS / "memory.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    payload = {
        "measured": previous.get("measured") if args.plan_only else measured(args.rehearsal, args.work),
        "planned": planned(args),
        "command": " ".join(["python -m experiments.quant.memory", *sys.argv[1:]]),
        "rehearsal": json.loads((args.rehearsal / "rehearsal.json").read_text()) if (args.rehearsal / "rehearsal.json").is_file() else None,
        "multi_direction": {"index": "the pruning paper's released experts.json (per language, 288 per direction)", "langs": args.langs},
        "device": "cpu (2 cores; no GPU lent to this task)",
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    (RESULTS / "memory.md").write_text(markdown(payload))
    print(markdown(payload))
    return 0


def markdown(payload: dict[str, Any]) -> str:
    lines = ["# Quantized exports: memory", "", f"- command: `{payload['command']}`; {payload['device']}; {payload['versions']}; {payload['date']}", ""]
    if payload.get("measured"):
        lines += [
            "## Measured: full-width rehearsal, one MoE layer per side keeping 36 (encoder) / 12 (decoder) experts, load in bf16",
            "",
            "| storage | export GiB | export peak RssAnon GiB | load peak RssAnon GiB | plan: weights + runtime GiB | load / plan |",
            "|---|---|---|---|---|---|",
        ]
        for r in payload["measured"]:
            lines.append(
                f"| {r['storage']} | {r['export_bytes'] / GIB:.2f} | {r['export_peak_rss_anon'] / GIB:.2f} | {r['load_peak_rss_anon'] / GIB:.2f} | "
                f"{r['plan_load_bytes'] / GIB:.2f} | {r['load_peak_rss_anon'] / r['plan_load_bytes']:.3f} |"
            )
        lines.append("")
    multi = payload["multi_direction"]
    lines += [
        "## Planned: NLLB-200 54.5B, 80% pruned (288 experts per direction), batch 16 x beam 4, src 64 + 200 tokens",
        "",
        f"Multi-direction: the union of the paper's per-language experts over every direction between {multi['langs']}.",
        "",
        "| storage | GPU GiB | one direction: GiB, fits, largest batch | multi-direction: GiB, fits, largest batch |",
        "|---|---|---|---|",
    ]
    for r in payload["planned"]:
        one = f"{r['one_direction_GiB']:.2f}, {'fits' if r['one_direction_fits'] else 'no'}, {r['one_direction_largest_batch']}"
        many = (
            f"{r['multi_direction_GiB']:.2f}, {'fits' if r['multi_direction_fits'] else 'no'}, {r['multi_direction_largest_batch']} ({r['multi_direction_experts']} experts)"
            if "multi_direction_GiB" in r
            else ""
        )
        lines.append(f"| {r['storage']} | {r['gpu_GiB']} | {one} | {many} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
