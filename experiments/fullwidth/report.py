"""The rehearsal's results as a table, each measured peak beside its bound and beside ``plan``'s figure.

    python -m experiments.fullwidth.report [--results experiments/results/fullwidth_cpu.json]

Writes the markdown file beside the JSON. ``plan`` is asked for the same job on this machine
(``--device cpu``: the process runtime instead of a CUDA context), at the rehearsal's topology, dtype
and batch, and must be within 10% of the measured peak.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

from pruning.plan import GIB, Hardware, Workload, plan_model, plan_statistics
from pruning.topology import Topology

RESULTS = Path(__file__).resolve().parents[1] / "results"


def planned(record: dict[str, Any]) -> dict[str, float]:
    """Plan figures for the steps that have one: step name -> bytes."""
    topology = Topology.from_dict(record["topology"])
    machine = Hardware(1, 24 * GIB, "cpu")
    workload = record["workload"]
    stats_load = Workload(dtype="bf16", batch_tokens=workload["stats_tokens"])
    kept = sum(record["kept_experts"].values())
    rows = kept / topology.num_moe_layers
    out: dict[str, float] = {}
    one = plan_statistics(topology, machine, stats_load)
    out["stats teacher, 1 process"] = one["total_bytes"]
    two = plan_statistics(topology, Hardware(2, 12 * GIB, "cpu"), stats_load)
    if two["expert_parallel"] == 2:
        out["stats teacher, torchrun 2 x expert-parallel 2 (gloo)"] = 2 * two["total_bytes"]
    translate = Workload(dtype="bf16", batch=workload["translate_sentences"], beam=4, src_len=workload["src_len"], max_length=workload["max_length"])
    model = plan_model("export", topology, machine, translate, experts=kept, router_rows=rows)
    out["load_model (drop export)"] = model["weights_bytes"] + model["bytes"]["runtime"]
    out["translate 8 sentences (beam 4)"] = model["total_bytes"]
    greedy = Workload(dtype="bf16", batch=workload["translate_sentences"], beam=1, src_len=workload["src_len"], max_length=workload["max_length"])
    out["evaluate 8 sentences (greedy)"] = plan_model("export", topology, machine, greedy, experts=kept, router_rows=rows)["total_bytes"]
    return out


def table(record: dict[str, Any]) -> str:
    plans = planned(record)
    lines = [
        "| step | wall s | peak RssAnon GB | read GB | bound | bound GB | met | plan GB | plan / measured | checks |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for step in record["steps"]:
        bound = step.get("bound") or {}
        plan = plans.get(step["step"])
        ratio = plan / step["peak_rss_anon_bytes"] if plan else None
        checks = ", ".join(f"{k}: {v}" for k, v in step.items() if isinstance(v, bool) and k not in ("cache_dropped",))
        lines.append(
            f"| {step['step']} | {step['wall_s']:.1f} | {step['peak_rss_anon_bytes'] / 1e9:.2f} | {step['read_bytes'] / 1e9:.2f} | "
            f"{bound.get('what', '')} | {bound['bytes'] / 1e9:.2f} | {'yes' if bound.get('met') else 'NO'} | "
            if bound
            else f"| {step['step']} | {step['wall_s']:.1f} | {step['peak_rss_anon_bytes'] / 1e9:.2f} | {step['read_bytes'] / 1e9:.2f} | | | | "
        )
        lines[-1] += (f"{plan / 1e9:.2f} | {ratio:.3f} | " if plan else " | | ") + f"{checks} |"
    return "\n".join(lines)


def write(results: Path) -> Path:
    record = json.loads(results.read_text())
    if "topology" not in record:  # a run recorded before run.py stored them: the generator's defaults, the run's sentences
        import shlex

        from experiments.fullwidth.generate import RehearsalConfig
        from experiments.fullwidth.run import workload_of

        words = shlex.split(record["command"])
        sentences = int(words[words.index("--sentences") + 1]) if "--sentences" in words else 32
        record["topology"] = RehearsalConfig(out="").topology().to_dict()
        record["workload"] = workload_of(sentences)
    md = results.with_suffix(".md")
    body = [
        "# Full-width rehearsal on this CPU machine\n",
        f"- command: `{record['command']}` (then `python -m experiments.fullwidth.report`)",
        f"- date: {record['date']}; machine: {record['machine']}; python {record['python']}, torch {record['torch']}, transformers {record['transformers']}",
        f"- model: {record['topology']['encoder_layers']}+{record['topology']['decoder_layers']} layers, d_model {record['topology']['d_model']}, "
        f"ffn {record['topology']['ffn_dim']}, {record['topology']['num_experts']} experts per MoE layer, vocabulary {record['topology']['vocab_size']}; "
        f"weights {record['weights_bytes'] / 1e9:.2f} GB in bf16, largest tensor {record['largest_tensor_bytes'] / 1e9:.2f} GB",
        f"- pruned export ({', '.join(f'{k}: {v}' for k, v in record['kept_experts'].items())} experts): {record['pruned_export_bytes'] / 1e9:.2f} GB",
        f"- memory: peak over time of the summed RssAnon of the command's process tree; reads: /proc/PID/io read_bytes with the page "
        f"cache dropped before each step (starting python and importing the toolkit reads {record['baseline_read_bytes'] / 1e9:.2f} GB of libraries)",
        "",
        table(record),
        "",
        "Routing of the rehearsal model (own top-16 vs the 16 experts all languages use most, share of top-1 assignments):",
        "",
        "```",
        json.dumps(record.get("routing_own_vs_shared_top16"), indent=1),
        "```",
    ]
    md.write_text("\n".join(body) + "\n")
    return md


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.fullwidth.report")
    parser.add_argument("--results", type=Path, default=RESULTS / "fullwidth_cpu.json")
    args = parser.parse_args(argv)
    print(f"wrote {write(args.results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
