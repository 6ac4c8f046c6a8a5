"""`nllb-prune select`: routing statistics -> expert index (``experts.json``)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from pruning.config import ConfigError, add_dataclass_flags, resolve
from pruning.locking import claim_output
from pruning.select import SelectOptions

NAME = "select"
HELP = "Choose the experts to keep from routing statistics (ours or the paper's JSON) and write an expert index."


@dataclass
class SelectConfig(SelectOptions):
    """Flags of ``nllb-prune select`` (keys of ``conf/select.yaml``): the selection options plus files."""

    stats: str = field(
        default="",
        metadata={"help": "statistics: our .safetensors file or the paper's stats-*.json (optional for a data-free metric with --granularity global)"},
    )
    out: str = field(default="", metadata={"help": "expert index to write (JSON, the paper's experts.json format)"})

    def validate(self) -> None:
        from metrics.router import needs_router_rows

        data_free = needs_router_rows(self.metric) and self.router_model
        missing = [flag for flag, value in (("--stats", self.stats or data_free), ("--out", self.out)) if not value]
        if missing:
            raise ConfigError(f"missing required setting(s): {', '.join(missing)}")
        super().validate()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_flags(parser, SelectConfig)


def run(args: argparse.Namespace) -> int:
    from pruning.index import validate_index, write_index
    from pruning.select import select_experts
    from pruning.stats.paper_json import load_statistics

    config = resolve(SelectConfig, args)
    with claim_output(config.out, command=NAME, inputs=[("--stats", config.stats)] if config.stats else []):
        stats = load_statistics(config.stats) if config.stats else None  # None: a data-free metric (validated)
        selection = select_experts(stats, config)
        validate_index(selection.index, selection.topology, min_per_layer=config.min_per_layer, what="selected index")
        path = write_index(selection.index, config.out)
    for line in selection.summary():
        print(line)
    print(f"wrote {path}")
    return 0
