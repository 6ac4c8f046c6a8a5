"""`nllb-prune merge-stats A B ... --out C`: add the counters of several statistics files."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from pruning.config import ConfigError, add_dataclass_flags, required, resolve
from pruning.locking import claim_output

NAME = "merge-stats"
HELP = (
    "Add the counters of statistics files of one model topology (e.g. the halves of a corpus, or per-language runs) into one "
    "file; a direction counted over the same sentences in several files is kept once, overlapping sentence ranges are refused."
)


@dataclass
class MergeStatsConfig:
    """Flags of ``nllb-prune merge-stats`` (the inputs are positional, or the key ``inputs``)."""

    inputs: list[str] = field(default_factory=list, metadata={"help": "statistics files (.safetensors) to add together"})
    out: str = required(help="merged statistics file to write")

    def validate(self) -> None:
        if len(self.inputs) < 1:
            raise ConfigError("give the statistics files to merge: nllb-prune merge-stats A B ... --out C")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="*", default=[], help="statistics files to merge")
    add_dataclass_flags(parser, MergeStatsConfig)


def run(args: argparse.Namespace) -> int:
    from pruning.stats.counters import merge_files

    # positional files and key=value overrides share argparse's trailing arguments: split them here
    trailing = list(args.files) + list(args.overrides)
    args.overrides = [a for a in trailing if "=" in a]
    files = [a for a in trailing if "=" not in a]
    if files:
        args.inputs = files
    config = resolve(MergeStatsConfig, args)
    with claim_output(config.out, command=NAME, inputs=[("input", item) for item in config.inputs]):
        merged = merge_files(config.inputs)
        path = merged.save(config.out)
    once = merged.kept_once
    kept = (
        f" ({len(once)} of them counted over the same sentences in several files, kept once: {', '.join(once[:6])}{' ...' if len(once) > 6 else ''})"
        if once
        else ""
    )
    print(f"merged {len(config.inputs)} file(s), {len(merged.directions)} direction(s){kept}: wrote {path}")
    return 0
