"""nllb-prune plan --model M|nllb-moe-54b --gpus N --gpu-mem 32GB [--experts experts.json --src/--tgt|--langs|--pairs]
[--quantize int8|int4 [--quantize-dense]] [--json]"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Optional

from pruning.config import DTYPE_CHOICES, ConfigError, add_dataclass_flags, required, resolve

NAME = "plan"
HELP = "Memory plan before any work: statistics (expert-parallel size, largest batch), the pruned export, translation; fits or not, and what would."


@dataclass
class PlanConfig:
    model: str = required(help="checkpoint (only its config and tensor list are read) or a preset: nllb-moe-54b")
    gpus: int = field(default=1, metadata={"help": "devices per job (statistics may use them all for --expert-parallel)"})
    gpu_mem: str = required(help="memory per device, e.g. 32GB, 24GiB, 80G (GB read as GiB, as GPUs are labelled)")
    device: str = field(default="cuda", metadata={"help": "cuda (GPU memory) or cpu (this machine's memory: --gpu-mem is its RAM)", "choices": ["cuda", "cpu"]})
    dtype: str = field(default="bf16", metadata={"help": "bf16 | fp16 (V100s have no bf16) | fp32", "choices": DTYPE_CHOICES})
    batch_tokens: int = field(default=4096, metadata={"help": "statistics: tokens per side in one step (stats --batch-tokens)"})
    batch: int = field(default=16, metadata={"help": "translation: sentences at once"})
    beam: int = field(default=4, metadata={"help": "translation: beam size"})
    src_len: int = field(default=64, metadata={"help": "translation: source tokens per sentence"})
    max_length: int = field(default=200, metadata={"help": "translation: most target tokens (translate --max-length)"})
    experts: str = field(default="", metadata={"help": "an expert index (select --out) to size the export exactly"})
    src: str = field(default="", metadata={"help": "with --experts: the direction's source language"})
    tgt: str = field(default="", metadata={"help": "with --experts: the direction's target language"})
    langs: list[str] = field(default_factory=list, metadata={"help": "with --experts: every direction between these languages"})
    pairs: list[str] = field(default_factory=list, metadata={"help": "with --experts: these directions src-tgt"})
    ratio: Optional[float] = field(default=None, metadata={"help": "without --experts: share of experts pruned (default 0.8, the paper's)"})
    enc_dec: str = field(default="3:1", metadata={"help": "without --experts: encoder:decoder split of the kept experts"})
    quantize: str = field(default="", metadata={"help": "translation models stored quantized as export --quantize makes them: int8 | int4"})
    quantize_dense: bool = field(default=False, metadata={"help": "with --quantize: the dense linear layers too (export --quantize-dense)"})
    group_size: Optional[int] = field(default=None, metadata={"help": "int4 group size (default 128)"})
    json: bool = field(default=False, metadata={"help": "print the plan as JSON"})

    def validate(self) -> None:
        if self.gpus < 1:
            raise ConfigError(f"--gpus must be a positive integer, got {self.gpus}")
        if self.experts and self.ratio is not None:
            raise ConfigError("give --experts (an index) or --ratio, not both")
        if (self.src or self.tgt or self.langs or self.pairs) and not self.experts:
            raise ConfigError("--src/--tgt, --langs and --pairs choose directions of an --experts index")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_flags(parser, PlanConfig)


def run(args: argparse.Namespace) -> int:
    from pruning.export import parse_directions
    from pruning.plan import Hardware, Workload, build_plan, format_plan, kept_from_index, kept_from_ratio, parse_memory, resolve_topology

    config = resolve(PlanConfig, args)
    topology = resolve_topology(config.model)
    hardware = Hardware(config.gpus, parse_memory(config.gpu_mem), config.device)
    workload = Workload(
        config.dtype,
        config.batch_tokens,
        config.batch,
        config.beam,
        config.src_len,
        config.max_length,
        config.quantize,
        config.quantize_dense,
        config.group_size,
    )
    if config.experts:
        directions = parse_directions(src=config.src or None, tgt=config.tgt or None, langs=config.langs, pairs=config.pairs)
        kept = kept_from_index(topology, config.experts, directions)
    else:
        kept = kept_from_ratio(topology, 0.8 if config.ratio is None else config.ratio, config.enc_dec)
    plan = build_plan(topology, hardware, workload, kept)
    print(json.dumps(plan, indent=2) if config.json else "\n".join(format_plan(plan)))
    return 0
