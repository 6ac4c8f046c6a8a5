"""`nllb-prune stability --stats S`: how many calibration sentences a language's kept set needs (bootstrap over chunks)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pruning.config import ConfigError, add_dataclass_flags, required, resolve
from pruning.locking import claim_output
from pruning.select import SelectOptions

NAME = "stability"
HELP = (
    "Bootstrap chunked statistics (stats --chunk-sentences): Jaccard of the kept set from m chunks against the kept set "
    "from all chunks, for m = 1 .. N, per language and side: a table, a TSV/JSON file and a plot."
)


@dataclass
class StabilityConfig(SelectOptions):
    """Flags of ``nllb-prune stability`` (keys of ``conf/stability.yaml``): the selection options plus these."""

    stats: str = required(help="chunked statistics (.safetensors from nllb-prune stats --chunk-sentences K)")
    out: str = required(help="directory for stability.tsv, .json and .png")
    samples: int = field(default=200, metadata={"help": "bootstrap samples per number of chunks"})
    seed: int = field(default=0, metadata={"help": "seed of the bootstrap (every entry draws the same chunk indices)"})
    threshold: float = field(default=0.9, metadata={"help": "report the fewest sentences from which the mean Jaccard stays at or above this"})
    directions: list[str] = field(
        default_factory=list, metadata={"help": "use only these directions src-tgt of the statistics, comma-separated (default: all)"}
    )
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def validate(self) -> None:
        if self.samples < 1:
            raise ConfigError(f"--samples must be at least 1, got {self.samples}")
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"--threshold is a Jaccard similarity and must be in (0, 1], got {self.threshold}")
        super().validate()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_flags(parser, StabilityConfig)


def run(args: argparse.Namespace) -> int:
    from pruning.analysis import print_report

    config = resolve(StabilityConfig, args)
    with claim_output(config.out, command=NAME, kind="folder"):
        result, written = measure(config)
    return print_report(summary_lines(result), written)


def measure(config: StabilityConfig) -> tuple[Any, list[Path]]:
    """Run the bootstrap and write the TSV, JSON and PNG into ``config.out``."""
    from pruning.analysis import restrict_directions, rows_tsv, stability
    from pruning.atomic import write_text
    from pruning.plots import plot_stability
    from pruning.stats.paper_json import load_statistics

    stats = restrict_directions(load_statistics(config.stats), config.directions)
    result = stability(stats, config, samples=config.samples, seed=config.seed, threshold=config.threshold, progress=config.progress)
    out = Path(config.out)
    columns = ["unit", "side", "chunks", "sentences", "sentences_mean", "mean", "p5", "p95"]
    written = [write_text(out / "stability.tsv", rows_tsv(columns, result.rows))]
    document = {
        "command": "nllb-prune stability",
        "settings": dataclasses.asdict(config),
        "statistics": {"path": str(Path(config.stats).resolve()), "chunk_sentences": result.chunk_sentences},
        "definition": definition(result),
        "notes": result.notes,
        "enough": result.enough,
        "rows": result.rows,
    }
    written.append(write_text(out / "stability.json", json.dumps(document, indent=1) + "\n"))
    curves: dict[str, list[Any]] = {}
    for unit, side in dict.fromkeys((r["unit"], r["side"]) for r in result.rows):
        rows = [r for r in result.rows if r["unit"] == unit and r["side"] == side]
        columns_of = {c: np.array([r[c] for r in rows], dtype=float) for c in ("sentences", "mean", "p5", "p95")}
        curves.setdefault(side, []).append((unit, columns_of["sentences"], columns_of["mean"], columns_of["p5"], columns_of["p95"]))
    title = (
        f"{Path(config.stats).name}: {config.metric}, {config.strategy}, {config.samples} bootstrap samples of m chunks "
        f"of {result.chunk_sentences} sentences (band: 5-95%)"
    )
    written.append(plot_stability(curves, out / "stability.png", threshold=config.threshold, title=title))
    return result, written


def definition(result: Any) -> str:
    return (
        f"sentences needed = the smallest m x K (K = {result.chunk_sentences} sentences per chunk) from which the mean "
        f"Jaccard over the bootstrap samples stays >= {result.threshold} for every larger m; the kept set is a side's "
        "(MoE layer, expert) pairs, compared with the kept set from all chunks"
    )


def summary_lines(result: Any) -> list[str]:
    lines = [f"note: {note}" for note in result.notes]
    lines.append(definition(result))
    for item in result.enough:
        rows = [r for r in result.rows if r["unit"] == item["unit"] and r["side"] == item["side"]]
        first, last = rows[0], rows[-1]
        span = (
            f"mean Jaccard {first['mean']:.3f} [{first['p5']:.3f}, {first['p95']:.3f}] at {first['sentences']} sentences, "
            f"{last['mean']:.3f} [{last['p5']:.3f}, {last['p95']:.3f}] at {last['sentences']}"
        )
        enough = (
            f">= {result.threshold} from {item['sentences']} sentences ({item['chunks']} chunk{'s' if item['chunks'] != 1 else ''})"
            if item["sentences"] is not None
            else f"never >= {result.threshold} with up to {item['of_chunks']} chunks"
        )
        lines.append(f"{item['unit']} {item['side']}: {span}; {enough}")
    return lines
