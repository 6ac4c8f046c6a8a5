"""nllb-prune info PATH"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

from pruning.config import add_dataclass_flags, resolve

NAME = "info"
HELP = "Show a checkpoint's layout, topology, dtype, and parameter/byte counts (dense, experts, per layer)."


@dataclass
class InfoConfig:
    path: str = field(metadata={"help": "checkpoint: HF-layout directory, fairseq *-shared.pt (or its directory), or an export"})
    json: bool = field(default=False, metadata={"help": "print JSON instead of a table"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_flags(parser, InfoConfig, positional=("path",))


def run(args: argparse.Namespace) -> int:
    from pruning.info import describe_checkpoint, format_description

    config = resolve(InfoConfig, args)
    info = describe_checkpoint(config.path)
    print(json.dumps(info, indent=2) if config.json else format_description(info))
    return 0
