"""`nllb-prune stats`: routing statistics of a model over FLORES directions (also under torchrun)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pruning.config import add_dataclass_flags, resolve
from pruning.stats.options import StatsOptions

NAME = "stats"
HELP = (
    "Count, per MoE layer and expert, how a model routes FLORES sentences (teacher forcing or beam search), "
    "per direction, into a statistics file. Several processes: torchrun --nproc-per-node N -m pruning stats ..."
)


@dataclass
class StatsConfig(StatsOptions):
    """Flags of ``nllb-prune stats`` (keys of ``conf/collect_stats.yaml``)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_flags(parser, StatsConfig)


def run(args: argparse.Namespace) -> int:
    import os

    from pruning.stats.collect import collect_statistics

    config = resolve(StatsConfig, args)
    path = collect_statistics(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {path}")
    return 0
