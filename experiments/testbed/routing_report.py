"""How language-specific is the testbed's routing? From a statistics file (``make testbed-stats``).

    python -m experiments.testbed.routing_report --stats outputs/testbed-stats.safetensors

For each language and side (encoder: the language as source; decoder: as target) and each MoE layer:
the share of the language's top-1 assignments that go to ITS OWN k most used experts, against the
share that the k experts most used by ALL languages take of the same tokens, and uniform k/E.
Language-specific routing shows as own >> shared-top >> uniform.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from pruning.data.directions import split_direction
from pruning.stats.counters import RoutingStats


def per_language_top1(stats: RoutingStats) -> dict[str, dict[str, torch.Tensor]]:
    """side -> language -> [L, E] top-1 counts (encoder by source language, decoder by target)."""
    out: dict[str, dict[str, torch.Tensor]] = {"enc": defaultdict(lambda: 0), "dec": defaultdict(lambda: 0)}  # type: ignore[dict-item]
    for direction in stats.directions:
        src, tgt = split_direction(direction)
        out["enc"][src] = out["enc"][src] + stats.side(direction, "enc")["top1"]
        out["dec"][tgt] = out["dec"][tgt] + stats.side(direction, "dec")["top1"]
    return {side: dict(langs) for side, langs in out.items()}


def specificity(counts: dict[str, torch.Tensor], *, k: int) -> dict[str, dict[str, float]]:
    total = sum(counts.values())  # [L, E]
    shared_top = total.topk(k, dim=1).indices  # [L, k]
    rows = {}
    for lang, c in sorted(counts.items()):
        tokens = c.sum(dim=1)  # [L]
        own = c.topk(k, dim=1).values.sum(dim=1) / tokens
        shared = c.gather(1, shared_top).sum(dim=1) / tokens
        rows[lang] = {"own_top_k": round(float(own.mean()), 3), "shared_top_k": round(float(shared.mean()), 3)}
    return rows


def jaccard_of_top_sets(counts: dict[str, torch.Tensor], *, k: int) -> float:
    """Mean Jaccard similarity between two languages' top-k expert sets, over layers and language pairs."""
    sets = {lang: [set(c[layer].topk(k).indices.tolist()) for layer in range(c.shape[0])] for lang, c in counts.items()}
    langs = sorted(sets)
    values = [len(a & b) / len(a | b) for i, x in enumerate(langs) for y in langs[i + 1 :] for a, b in zip(sets[x], sets[y])]
    return round(sum(values) / len(values), 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stats", default="outputs/testbed-stats.safetensors")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/testbed_routing"))
    args = parser.parse_args(argv)
    stats = RoutingStats.load(args.stats)
    experts = stats.topology.num_experts
    by_side = per_language_top1(stats)
    report = {"stats": args.stats, "k": args.k, "experts_per_layer": experts, "uniform": round(args.k / experts, 3), "sides": {}}
    lines = [
        f"# Testbed routing specificity (k = {args.k} of {experts} experts per layer)",
        "",
        f"Statistics `{args.stats}` (teacher forcing on dev). Share of a language's top-1 assignments taken by its own "
        f"{args.k} most used experts, by the {args.k} experts most used over all languages, and uniform {args.k}/{experts}. "
        f"Mean over the side's MoE layers. Command: `python -m experiments.testbed.routing_report --stats {args.stats} --k {args.k}`.",
        "",
    ]
    for side, name in (("enc", "encoder (language as source)"), ("dec", "decoder (language as target)")):
        rows = specificity(by_side[side], k=args.k)
        jac = jaccard_of_top_sets(by_side[side], k=args.k)
        report["sides"][side] = {"languages": rows, "mean_jaccard_between_languages_top_k": jac}
        lines += [f"## {name}", "", "| language | own top-k | shared top-k |", "|---|---|---|"]
        lines += [f"| {lang} | {r['own_top_k']:.3f} | {r['shared_top_k']:.3f} |" for lang, r in rows.items()]
        mean_own = sum(r["own_top_k"] for r in rows.values()) / len(rows)
        mean_shared = sum(r["shared_top_k"] for r in rows.values()) / len(rows)
        lines += [
            f"| **mean** | **{mean_own:.3f}** | **{mean_shared:.3f}** |",
            "",
            f"Mean Jaccard similarity of two languages' top-{args.k} sets: {jac} (1 = same experts).",
            "",
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
