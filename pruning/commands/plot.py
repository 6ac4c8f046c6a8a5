"""`nllb-prune plot`: PNG pictures of routing statistics and of an expert index."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from pruning.config import ConfigError, add_dataclass_flags, required, resolve
from pruning.locking import claim_output

NAME = "plot"
HELP = "Draw expert-usage heatmaps (from statistics), experts kept per layer and language similarity (from an index)."


@dataclass
class PlotConfig:
    """Flags of ``nllb-prune plot`` (keys of ``conf/plot.yaml``)."""

    stats: str = field(default="", metadata={"help": "statistics (.safetensors or the paper's .json): per-language usage heatmaps"})
    experts: str = field(default="", metadata={"help": "expert index (experts.json): experts per layer and language similarity"})
    out: str = required(help="directory for the PNG files")
    langs: list[str] = field(default_factory=list, metadata={"help": "languages for the heatmaps, comma-separated (default: the first --max-langs)"})
    max_langs: int = field(default=8, metadata={"help": "heatmaps drawn when --langs is not given"})
    metric: str = field(default="topk", metadata={"help": "score shown by the heatmaps (a registered metric)"})

    def validate(self) -> None:
        if not self.stats and not self.experts:
            raise ConfigError("give --stats (usage heatmaps) and/or --experts (experts per layer, language similarity)")
        if self.max_langs < 0:
            raise ConfigError(f"--max-langs must be >= 0, got {self.max_langs}")
        from metrics import get_metric

        get_metric(self.metric)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_flags(parser, PlotConfig)


def run(args: argparse.Namespace) -> int:
    config = resolve(PlotConfig, args)
    with claim_output(config.out, command=NAME, kind="folder"):
        written = draw(config)
    for path in written:
        print(f"wrote {path}")
    return 0


def draw(config: PlotConfig) -> list[Path]:
    """Draw every picture ``config`` asks for; return the files written."""
    from pruning.index import read_index, validate_index
    from pruning.plots import plot_experts_per_layer, plot_language_similarity, plot_usage_heatmap
    from pruning.stats.paper_json import languages_of, load_statistics
    from pruning.topology import NLLB_MOE_54B

    out = Path(config.out)
    written: list[Path] = []
    topology = NLLB_MOE_54B
    if config.stats:
        stats = load_statistics(config.stats)
        topology = stats.topology
        langs = list(config.langs) or languages_of(stats.directions)[: config.max_langs]
        for lang in langs:
            written.append(plot_usage_heatmap(stats, lang, out / f"usage-{lang}.png", metric=config.metric))
    if config.experts:
        index = read_index(config.experts)
        validate_index(index, topology, min_per_layer=1, what=config.experts)
        written.append(plot_experts_per_layer(index, topology, out / "experts-per-layer.png"))
        if index.kind == "lang":
            for side in ("decoder", "encoder"):
                if sum(1 for ids in index.entries.values() if any(topology.side_of_id(i) == side for i in ids)) >= 2:
                    written.append(plot_language_similarity(index, topology, out / f"similarity-{side}.png", side=side))  # type: ignore[arg-type]
        else:
            print(f"note: language similarity needs a per-language index; {config.experts} is of kind {index.kind!r}")
    return written
