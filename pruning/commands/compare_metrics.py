"""`nllb-prune compare-metrics --stats S`: how much the expert-importance criteria agree, per side and layer."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pruning.config import ConfigError, add_dataclass_flags, required, resolve
from pruning.locking import claim_output
from pruning.select import GranularityOptions, KeepOptions, SelectOptions

NAME = "compare-metrics"
HELP = (
    "Rank correlation (Spearman) of expert scores and Jaccard of kept sets between every pair of metrics, "
    "per side and MoE layer: a table, a TSV/JSON file and a heatmap."
)


@dataclass
class CompareMetricsConfig(GranularityOptions, KeepOptions):
    """Flags of ``nllb-prune compare-metrics`` (keys of ``conf/compare_metrics.yaml``): select's keep and
    granularity groups (same meaning, same defaults) plus the metrics to compare."""

    stats: str = required(help="statistics: our .safetensors file or the paper's stats-*.json")
    out: str = required(help="directory for metric-agreement.tsv, .json and .png")
    metrics: list[str] = field(
        default_factory=list, metadata={"help": "metrics to compare, comma-separated (default: every registered metric the file can score)"}
    )
    directions: list[str] = field(
        default_factory=list, metadata={"help": "use only these directions src-tgt of the statistics, comma-separated (default: all)"}
    )
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def selection(self, metric: str = "importance") -> SelectOptions:
        """The ``select`` options these flags mean, for ``metric``."""
        return SelectOptions.from_groups(self, metric=metric)

    def validate(self) -> None:
        if self.strategy == "budget":
            raise ConfigError("compare-metrics compares kept sets at --ratio or --keep: use --strategy per-layer or global (budget is not offered)")
        if self.metrics and len(set(self.metrics)) < 2:
            raise ConfigError(f"--metrics needs at least two metrics to compare, got {self.metrics}")
        for metric in self.metrics or ["importance"]:
            self.selection(metric).validate()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_flags(parser, CompareMetricsConfig)


def run(args: argparse.Namespace) -> int:
    from pruning.analysis import print_report

    config = resolve(CompareMetricsConfig, args)
    with claim_output(config.out, command=NAME, kind="folder"):
        result, written = compare(config)
    return print_report(summary_lines(result), written)


def compare(config: CompareMetricsConfig) -> tuple[Any, list[Path]]:
    """Compute the agreement and write the TSV, JSON and PNG into ``config.out``."""
    from pruning.analysis import compare_metrics, computable_metrics, restrict_directions, rows_tsv
    from pruning.atomic import write_text
    from pruning.plots import plot_metric_agreement
    from pruning.stats.paper_json import load_statistics

    stats = restrict_directions(load_statistics(config.stats), config.directions)
    metrics, notes = computable_metrics(stats, config.metrics)
    result = compare_metrics(stats, config.selection(metrics[0]), metrics, progress=config.progress)
    result.notes.extend(notes + list(result.plan.notes))
    out = Path(config.out)
    columns = ["unit", "side", "layer", "metric_a", "metric_b", "spearman", "jaccard"]
    written = [write_text(out / "metric-agreement.tsv", rows_tsv(columns, result.rows))]
    document = {
        "command": "nllb-prune compare-metrics",
        "settings": dataclasses.asdict(config),
        "statistics": {"path": str(Path(config.stats).resolve()), "directions": len(stats.directions)},
        "kept": {"total": result.plan.total, "encoder": result.plan.encoder, "decoder": result.plan.decoder, "per_layer": result.plan.per_layer},
        "metrics": metrics,
        "notes": result.notes,
        "mean_over_layers": {side: _summary(result, side) for side in result.sides},
        "rows": result.rows,
    }
    written.append(write_text(out / "metric-agreement.json", json.dumps(document, indent=1, allow_nan=True) + "\n"))
    kept = f"{result.plan.total} experts kept per direction" + (
        f" ({result.plan.per_layer[0]}/{result.plan.per_layer[1]} per enc/dec layer)" if result.plan.per_layer else ""
    )
    title = f"{Path(config.stats).name}: mean over {config.granularity} entries and MoE layers; {kept}"
    written.append(plot_metric_agreement(metrics, {side: result.matrices(side) for side in result.sides}, out / "metric-agreement.png", title=title))
    return result, written


def _summary(result: Any, side: str) -> list[dict[str, Any]]:
    rho, jac = result.matrices(side)
    index = {name: i for i, name in enumerate(result.metrics)}
    return [
        {"metric_a": a, "metric_b": b, "spearman": float(rho[index[a], index[b]]), "jaccard": float(jac[index[a], index[b]])}
        for i, a in enumerate(result.metrics)
        for b in result.metrics[i + 1 :]
    ]


def summary_lines(result: Any) -> list[str]:
    """The printed table: per pair of metrics, mean Spearman and Jaccard over entries and layers, per side."""
    lines = [f"note: {note}" for note in result.notes]
    sides = result.sides
    width = max(len(f"{a} ~ {b}") for a in result.metrics for b in result.metrics)
    header = f"{'metrics':<{width}}" + "".join(f"  {s + ' rho':>8}  {s + ' J':>6}" for s in sides)
    lines += ["mean over entries and MoE layers (rho: Spearman of scores, J: Jaccard of kept sets)", header]
    summaries = {side: _summary(result, side) for side in sides}
    for k, pair in enumerate(summaries[sides[0]] if sides else []):
        cells = "".join(f"  {summaries[s][k]['spearman']:>8.3f}  {summaries[s][k]['jaccard']:>6.3f}" for s in sides)
        lines.append(f"{pair['metric_a'] + ' ~ ' + pair['metric_b']:<{width}}{cells}")
    return lines
