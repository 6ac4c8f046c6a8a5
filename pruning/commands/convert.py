"""nllb-prune convert SRC --out DIR [--layout hf|fairseq] [--dtype bf16|fp16|fp32]"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Optional

from pruning.config import DTYPE_CHOICES, ConfigError, add_dataclass_flags, resolve
from pruning.locking import claim_output

NAME = "convert"
HELP = "Convert a checkpoint between layouts and dtypes (HF safetensors shards + config, or fairseq shared + rank files), streaming."


@dataclass
class ConvertConfig:
    src: str = field(metadata={"help": "source checkpoint (HF directory, fairseq *-shared.pt or its directory)"})
    out: str = field(metadata={"help": "output directory (must not exist unless --overwrite)"})
    dtype: Optional[str] = field(default=None, metadata={"help": "bf16 | fp16 | fp32 (default: keep the source's)", "choices": DTYPE_CHOICES})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output directory"})
    shard_gb: float = field(default=4.0, metadata={"help": "maximum shard size in GiB (--layout hf)"})
    layout: str = field(
        default="hf",
        metadata={"help": "hf: safetensors shards + config.json; fairseq: checkpoint-shared.pt + checkpoint-rank-{r}.pt", "choices": ["hf", "fairseq"]},
    )

    def validate(self) -> None:
        if self.shard_gb <= 0:
            raise ConfigError(f"--shard-gb must be positive, got {self.shard_gb}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_flags(parser, ConvertConfig, positional=("src",))


def run(args: argparse.Namespace) -> int:
    from pruning.checkpoint.convert import convert_checkpoint
    from pruning.model.loading import parse_dtype

    config = resolve(ConvertConfig, args)
    with claim_output(config.out, command=NAME, kind="directory"):
        out = convert_checkpoint(
            config.src,
            config.out,
            dtype=parse_dtype(config.dtype),
            overwrite=config.overwrite,
            max_shard_bytes=int(config.shard_gb * 2**30),
            layout=config.layout,
        )
    print(f"wrote {out}")
    return 0
