"""nllb-prune export --model M --experts experts.json (--src L --tgt L | --langs L1,L2 | --pairs a-b,..) --out DIR
[--policy drop|skip|substitute|merge --stats stats.safetensors] [--quantize int8|int4 [--quantize-dense] [--group-size 128]]"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Optional

from pruning.config import DTYPE_CHOICES, ConfigError, add_dataclass_flags, required, resolve
from pruning.locking import claim_output
from pruning.policy import POLICIES, check_policy

NAME = "export"
HELP = "Write a pruned single-GPU checkpoint: the dense part plus the experts an expert index keeps for some directions."


@dataclass
class ExportOptions:
    """The export's flags (also ``prune``'s): source, target directions, storage, pruned-expert policy."""

    model: str = required(help="source checkpoint: HF-layout directory, fairseq *-shared.pt or its directory, or an export")
    out: str = required(help="export directory (must not exist unless --overwrite)")
    src: Optional[str] = field(default=None, metadata={"help": "source language of the one direction to export (with --tgt)"})
    tgt: Optional[str] = field(default=None, metadata={"help": "target language of the one direction to export (with --src)"})
    langs: list[str] = field(default_factory=list, metadata={"help": "export every direction between these languages, comma-separated"})
    pairs: list[str] = field(default_factory=list, metadata={"help": "export these directions src-tgt, comma-separated"})
    dtype: str = field(default="bf16", metadata={"help": "storage dtype of the weights (routers stay fp32)", "choices": DTYPE_CHOICES})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing export directory"})
    shard_gb: float = field(default=4.0, metadata={"help": "maximum shard size in GiB (memory does not depend on it: tensors are streamed)"})
    policy: str = field(
        default="drop",
        metadata={
            "help": "treatment of pruned experts: drop (router rows removed, the paper's), skip (rows kept, a token routed to a "
            "pruned expert gets nothing from it; no statistics needed), substitute (rows kept, answered by "
            "the expert's mean output; needs --stats from `stats --expert-outputs`), merge (folded into the kept expert "
            "they co-activate with most, frequency-weighted; needs --stats)",
            "choices": POLICIES,
        },
    )
    stats: str = field(default="", metadata={"help": "statistics file of the unpruned model (for --policy substitute|merge)"})
    quantize: str = field(
        default="",
        metadata={
            "help": "store the kept experts' weights quantized: int8 (one scale per output channel) or int4 (min/max per group "
            "of --group-size input features); scales in fp32, routers stay fp32 (pruning/quant.py)"
        },
    )
    quantize_dense: bool = field(default=False, metadata={"help": "with --quantize: also the dense linear layers (attention projections, dense FFNs)"})
    group_size: Optional[int] = field(default=None, metadata={"help": "int4: input features per group (default 128; must divide d_model and the FFN width)"})

    def quant_spec(self):  # noqa: ANN201 - Optional[pruning.quant.QuantSpec]
        """The requested quantization (None: float weights); raises on a bad combination of the flags."""
        return quant_spec(self.quantize, dense=self.quantize_dense, group_size=self.group_size)

    def validate_export(self) -> None:
        if not self.shard_gb > 0:
            raise ConfigError(f"--shard-gb must be positive, got {self.shard_gb}")
        check_policy(self.policy, self.stats or None)
        self.quant_spec()

    def directions(self) -> list[tuple[str, str]]:
        from pruning.export import parse_directions

        return parse_directions(src=self.src, tgt=self.tgt, langs=self.langs, pairs=self.pairs)


def quant_spec(scheme: str, *, dense: bool, group_size: Optional[int]):  # noqa: ANN201
    """``--quantize/--quantize-dense/--group-size`` -> a :class:`pruning.quant.QuantSpec` or None."""
    from pruning.quant import SCHEMES, QuantSpec

    if not scheme:
        extra = [flag for flag, given in (("--quantize-dense", dense), ("--group-size", group_size is not None)) if given]
        if extra:
            raise ConfigError(f"{' and '.join(extra)} need(s) --quantize int8|int4")
        return None
    if scheme not in SCHEMES:
        raise ConfigError(f"--quantize must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    return QuantSpec.make(scheme, dense=dense, group_size=group_size)


@dataclass
class ExportConfig(ExportOptions):
    """Flags of ``nllb-prune export`` (keys of a ``conf/*.yaml`` given with ``--config``)."""

    experts: str = required(help="expert index (the paper's experts.json format: per language, per direction or one list)")

    def validate(self) -> None:
        self.validate_export()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_flags(parser, ExportConfig)


def run(args: argparse.Namespace) -> int:
    from pruning.export import export_checkpoint, summarize
    from pruning.manifest import read_manifest
    from pruning.model.loading import parse_dtype

    config = resolve(ExportConfig, args)
    directions = config.directions()
    with claim_output(config.out, command=NAME, kind="directory"):
        out = export_checkpoint(
            config.model,
            experts=config.experts,
            out=config.out,
            directions=directions,
            dtype=parse_dtype(config.dtype),
            overwrite=config.overwrite,
            max_shard_bytes=int(config.shard_gb * 2**30),
            policy=config.policy,
            stats=config.stats or None,
            quantize=config.quant_spec(),
        )
    print(f"source {config.model}")
    for line in summarize(out, read_manifest(out) or {}):
        print(line)
    return 0
