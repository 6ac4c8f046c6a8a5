"""`nllb-prune prune`: select + export in one step (statistics -> expert index -> pruned export)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from pruning.commands.export import ExportOptions
from pruning.commands.select import SelectConfig
from pruning.config import DTYPE_CHOICES, ConfigError, add_dataclass_flags, required, resolve
from pruning.locking import claim_output
from pruning.select import SelectOptions

NAME = "prune"
HELP = "Select experts from routing statistics and export the pruned model in one step (the flags of select + export)."


@dataclass
class PruneConfig(ExportOptions, SelectConfig):
    """Flags of ``nllb-prune prune`` (keys of ``conf/prune.yaml``): those of ``select`` plus the export's.

    ``--langs``/``--pairs``/``--src --tgt`` name the exported directions; the selection is run for
    their languages (``--granularity lang``) or for them (``pair``). ``--dtype`` is both the dtype
    of the export and the one ``--budget-gb`` counts in. The selected index is written into the export
    as ``experts.json`` and the manifest records these flags and the statistics file's sha256.
    """

    langs: list[str] = field(
        default_factory=list, metadata={"help": "export every direction between these languages (comma-separated); selection runs for them"}
    )
    pairs: list[str] = field(
        default_factory=list, metadata={"help": "export these directions src-tgt (comma-separated); selection runs for their languages or for them"}
    )
    dtype: str = field(
        default="bf16", metadata={"help": "storage dtype of the export (routers stay fp32), also the dtype of --budget-gb", "choices": DTYPE_CHOICES}
    )
    stats: str = required(help="statistics to select from (our .safetensors file or the paper's stats-*.json); also --policy substitute|merge's")

    def selection_options(self) -> SelectOptions:
        """The selection part, restricted to what the exported directions need."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(SelectOptions)}
        directions = self.directions()
        values["langs"], values["pairs"] = [], []
        if self.granularity == "lang":
            values["langs"] = sorted({lang for pair in directions for lang in pair})
        elif self.granularity == "pair":
            values["pairs"] = [f"{s}-{t}" for s, t in directions]
        return SelectOptions(**values)

    def validate(self) -> None:
        self.validate_export()
        if not self.directions() and self.granularity != "global":
            raise ConfigError(
                f"--granularity {self.granularity} selects experts per {'language' if self.granularity == 'lang' else 'direction'}: "
                "say which directions to export with --src/--tgt, --langs or --pairs"
            )
        self.selection_options().validate()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_flags(parser, PruneConfig)


def run(args: argparse.Namespace) -> int:
    config = resolve(PruneConfig, args)
    with claim_output(config.out, command=NAME, kind="directory"):
        lines = prune(config)
    for line in lines:
        print(line)
    return 0


def prune(config: PruneConfig, *, progress: bool = True) -> list[str]:
    """Select, then export; returns the lines to print."""
    from pathlib import Path

    from pruning.checkpoint.reader import open_checkpoint
    from pruning.export import export_checkpoint, summarize
    from pruning.index import validate_index
    from pruning.manifest import read_manifest, sha256_file
    from pruning.model.loading import parse_dtype
    from pruning.policy import NEEDS_STATISTICS
    from pruning.select import select_experts
    from pruning.stats.paper_json import load_statistics

    options = config.selection_options()
    topology = open_checkpoint(config.model).topology
    stats = load_statistics(config.stats, topology=topology)
    selection = select_experts(stats, options, expect_topology=topology)
    validate_index(selection.index, selection.topology, min_per_layer=options.min_per_layer, what="selected index")
    record = {
        "command": "prune",
        "options": dataclasses.asdict(options),
        "plan": dataclasses.asdict(selection.plan),
        "statistics": {"file": Path(config.stats).name, "sha256": sha256_file(config.stats), "info": stats.info},
    }
    out = export_checkpoint(
        config.model,
        experts=selection.index,
        out=config.out,
        directions=config.directions(),
        dtype=parse_dtype(config.dtype),
        overwrite=config.overwrite,
        max_shard_bytes=int(config.shard_gb * 2**30),
        selection=record,
        progress=progress,
        policy=config.policy,
        stats=config.stats if config.policy in NEEDS_STATISTICS else None,
        quantize=config.quant_spec(),
    )
    return [*selection.summary(), f"source {config.model}", *summarize(out, read_manifest(out) or {})]
