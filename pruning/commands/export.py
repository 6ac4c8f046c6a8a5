"""nllb-prune export --model M --experts experts.json (--src L --tgt L | --langs L1,L2 | --pairs a-b,..) --out DIR"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Optional

from pruning.config import ConfigError, add_dataclass_flags, resolve

NAME = "export"
HELP = "Write a pruned single-GPU checkpoint: the dense part plus the experts an expert index keeps for some directions."

DTYPE_CHOICES = ["bf16", "fp16", "fp32"]


@dataclass
class ExportConfig:
    """Flags of ``nllb-prune export`` (keys of a ``conf/*.yaml`` given with ``--config``)."""

    model: str = field(default="", metadata={"help": "source checkpoint: HF-layout directory, fairseq *-shared.pt or its directory, or an export"})
    experts: str = field(default="", metadata={"help": "expert index (the paper's experts.json format: per language, per direction or one list)"})
    out: str = field(default="", metadata={"help": "export directory (must not exist unless --overwrite)"})
    src: Optional[str] = field(default=None, metadata={"help": "source language of the one direction to export (with --tgt)"})
    tgt: Optional[str] = field(default=None, metadata={"help": "target language of the one direction to export (with --src)"})
    langs: list[str] = field(default_factory=list, metadata={"help": "export every direction between these languages, comma-separated"})
    pairs: list[str] = field(default_factory=list, metadata={"help": "export these directions src-tgt, comma-separated"})
    dtype: str = field(default="bf16", metadata={"help": "storage dtype of the weights (routers stay fp32)", "choices": DTYPE_CHOICES})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing export directory"})
    shard_gb: float = field(default=4.0, metadata={"help": "maximum shard size in GiB (bounds the export's memory use)"})

    def validate(self) -> None:
        missing = [flag for flag, value in (("--model", self.model), ("--experts", self.experts), ("--out", self.out)) if not value]
        if missing:
            raise ConfigError(f"missing required setting(s): {', '.join(missing)}")
        if self.dtype not in DTYPE_CHOICES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if not self.shard_gb > 0:
            raise ConfigError(f"--shard-gb must be positive, got {self.shard_gb}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_flags(parser, ExportConfig)


def run(args: argparse.Namespace) -> int:
    from pruning.export import export_checkpoint, parse_directions, summarize
    from pruning.manifest import read_manifest
    from pruning.model.loading import parse_dtype

    config = resolve(ExportConfig, args)
    directions = parse_directions(src=config.src, tgt=config.tgt, langs=config.langs, pairs=config.pairs)
    out = export_checkpoint(
        config.model,
        experts=config.experts,
        out=config.out,
        directions=directions,
        dtype=parse_dtype(config.dtype),
        overwrite=config.overwrite,
        max_shard_bytes=int(config.shard_gb * 2**30),
    )
    print(f"source {config.model}")
    for line in summarize(out, read_manifest(out) or {}):
        print(line)
    return 0
