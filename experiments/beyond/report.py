"""Results table and curves of the criterion x policy study (experiments/beyond/study.py).

    python -m experiments.beyond.report [--results experiments/results/beyond]

Writes ``README.md`` (tables, the winner at each pruned share against the paper's importance + drop)
and ``curves.png`` (mean chrF++ and off-target rate against the pruned share) into ``--results``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

BASELINE = ("importance", "drop")
"""The paper's setting: importance scores, pruned experts dropped."""
POLICY_ORDER = ["drop", "skip", "substitute", "merge"]
GRANULARITY = {"lang": "per-language selection (encoder by source, decoder by target)", "global": "one global expert set for every direction"}


def load_runs(results: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((results / "runs").glob("*.json"))]


def by_config(runs: list[dict[str, Any]]) -> dict[tuple[str, str, float], dict[str, Any]]:
    """``{(criterion, policy, pruned share): run}`` of the pruned runs."""
    return {(r["criterion"], r["policy"], r["pruned_share"]): r for r in runs if r["policy"] not in ("full", "floor")}


def share_kept(score: float, full: dict[str, Any] | None, floor: dict[str, Any] | None) -> float | None:
    """(score - floor) / (full - floor): the share of what the experts add over the no-expert floor."""
    if full is None or floor is None or full["mean_chrf++"] == floor["mean_chrf++"]:
        return None
    return (score - floor["mean_chrf++"]) / (full["mean_chrf++"] - floor["mean_chrf++"])


def paired(run: dict[str, Any], baseline: dict[str, Any]) -> tuple[float, int, int]:
    """Mean chrF++ difference over the shared directions, and how many directions got better / worse."""
    shared = sorted(set(run["chrf++"]) & set(baseline["chrf++"]))
    diffs = [run["chrf++"][d] - baseline["chrf++"][d] for d in shared]
    return sum(diffs) / len(diffs), sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def chrf_table(
    configs: dict[tuple[str, str, float], dict[str, Any]],
    *,
    policy: str,
    shares: list[float],
    criteria: list[str],
    full: dict[str, Any] | None = None,
    floor: dict[str, Any] | None = None,
) -> str:
    header = ["criterion"] + [f"{100 * s:.1f}% pruned" for s in shares]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for criterion in criteria:
        cells = [criterion]
        for share in shares:
            run, base = configs.get((criterion, policy, share)), configs.get((*BASELINE, share))
            if run is None:
                cells.append("-")
                continue
            delta = "" if base is None or (criterion, policy) == BASELINE else f" ({paired(run, base)[0]:+.1f})"
            off = run.get("mean_off_target")
            share = share_kept(run["mean_chrf++"], full, floor)
            cells.append(f"{run['mean_chrf++']:.1f}{delta}" + (f" [{share:.2f}]" if share is not None else "") + (f" / {off:.1f}%" if off is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def winners(configs: dict[tuple[str, str, float], dict[str, Any]], shares: list[float]) -> list[str]:
    lines = []
    for share in shares:
        base = configs.get((*BASELINE, share))
        candidates = [(run["mean_chrf++"], key) for key, run in configs.items() if key[2] == share]
        if base is None or not candidates:
            continue
        best_score, best = max(candidates)
        delta, better, worse = paired(configs[best], base)
        if best[:2] == BASELINE:
            lines.append(f"- {100 * share:.1f}% pruned: the paper's importance + drop is best ({base['mean_chrf++']:.2f} chrF++).")
        else:
            lines.append(
                f"- {100 * share:.1f}% pruned: **{best[0]} + {best[1]}** {best_score:.2f} chrF++ vs importance + drop "
                f"{base['mean_chrf++']:.2f} ({delta:+.2f}; better in {better}, worse in {worse} of {len(base['chrf++'])} directions)."
            )
    return lines


def plot_curves(configs: dict[tuple[str, str, float], dict[str, Any]], full: dict[str, Any] | None, out: Path, floor: dict[str, Any] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = sorted({k[1] for k in configs}, key=POLICY_ORDER.index)
    fig, axes = plt.subplots(2, len(policies), figsize=(4.6 * len(policies), 7.5), sharex=True, sharey="row", squeeze=False)
    criteria = sorted({k[0] for k in configs})
    colors = {c: plt.cm.tab20(i % 20) for i, c in enumerate(criteria)}
    for col, policy in enumerate(policies):
        for criterion in criteria:
            points = sorted((k[2], r) for k, r in configs.items() if k[0] == criterion and k[1] == policy)
            if not points:
                continue
            x = [100 * s for s, _ in points]
            style = {"color": colors[criterion], "marker": "o", "ms": 3, "lw": 2.4 if criterion == "importance" else 1.2}
            axes[0, col].plot(x, [r["mean_chrf++"] for _, r in points], label=criterion, **style)
            if all(r.get("mean_off_target") is not None for _, r in points):
                axes[1, col].plot(x, [r["mean_off_target"] for _, r in points], **style)
        if full is not None:
            axes[0, col].axhline(full["mean_chrf++"], color="black", ls=":", lw=1, label="unpruned")
        if floor is not None:
            axes[0, col].axhline(floor["mean_chrf++"], color="red", ls="--", lw=1, label="no experts (floor)")
        axes[0, col].set_title(f"policy: {policy}")
        axes[1, col].set_xlabel("experts pruned (%)")
    axes[0, 0].set_ylabel("mean chrF++")
    axes[1, 0].set_ylabel("off-target hypotheses (%)")
    axes[0, -1].legend(fontsize=7, loc="lower left")
    fig.suptitle("Testbed: expert criterion x treatment of pruned experts (per-language selection)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def report(results: Path) -> Path:
    runs = load_runs(results)
    if not runs:
        raise SystemExit(f"no runs in {results / 'runs'}: run python -m experiments.beyond.study first")
    full = next((r for r in runs if r["policy"] == "full"), None)
    floor = next((r for r in runs if r["policy"] == "floor"), None)
    configs = by_config(runs)
    shares = sorted({k[2] for k in configs})
    criteria = sorted({k[0] for k in configs}, key=lambda c: (c != "importance", c))
    first = runs[0]
    parts = [
        "# Criterion x policy on the testbed",
        "",
        "Generated by `python -m experiments.beyond.report` from `runs/*.json` (made by "
        "`python -m experiments.beyond.study`, config `experiments/beyond/conf/study.yaml`; `make beyond-study`).",
        f"Testbed model `{first['model']}`, statistics `{first['stats']}` (dev, teacher forcing, `--expert-outputs`), "
        f"{first['directions']} directions x {first['max_sentences']} {first['split']} sentences, greedy; "
        f"{GRANULARITY.get(first.get('granularity', 'lang'), first.get('granularity'))} with a fixed count per layer; "
        f"off-target rate from the testbed's own language identifier (`{first.get('lid')}`).",
        "",
        f"Made on {first.get('device', '?')} with {', '.join(f'{k} {v}' for k, v in sorted(first.get('versions', {}).items()))}, "
        f"{min(r.get('date', '?') for r in runs)} to {max(r.get('date', '?') for r in runs)}.",
        "",
        f"Unpruned: {full['mean_chrf++']:.2f} chrF++, {_fmt(full.get('mean_off_target'))}% off-target." if full else "",
        f"No experts at all (every expert output zeroed, the floor): {floor['mean_chrf++']:.2f} chrF++, "
        f"{_fmt(floor.get('mean_off_target'))}% off-target. In brackets: the share of the experts' contribution kept, "
        "(score - floor) / (full - floor)."
        if floor
        else "No-expert floor: not run (runs made before it was part of the grid).",
        "",
        *(
            [
                "What the numbers say, and why: [FINDINGS.md](FINDINGS.md) (hand-written). Metric agreement and "
                "calibration stability: [analysis/](analysis/README.md).",
                "",
            ]
            if (results / "FINDINGS.md").is_file()
            else []
        ),
        "## Which combination wins",
        "",
        *winners(configs, shares),
        "",
    ]
    for policy in POLICY_ORDER:
        if any(k[1] == policy for k in configs):
            parts += [
                f"## Policy `{policy}`: mean chrF++ (difference to importance + drop, paired over directions) / off-target %",
                "",
                chrf_table(configs, policy=policy, shares=shares, criteria=criteria, full=full, floor=floor),
                "",
            ]
    plot = plot_curves(configs, full, results / "curves.png", floor)
    parts += [f"![curves]({plot.name})", ""]
    readme = results / "README.md"
    readme.write_text("\n".join(parts))
    return readme


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="experiments/results/beyond")
    args = parser.parse_args()
    print(report(Path(args.results)))


if __name__ == "__main__":
    main()
