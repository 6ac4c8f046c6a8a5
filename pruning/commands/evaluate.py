"""nllb-prune evaluate --model DIR --data FLORES_DIR --split devtest (--pairs .. | --langs ..) --out scores.tsv"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass, field
from typing import Optional

from pruning.config import DTYPE_CHOICES, ConfigError, add_dataclass_flags, required, resolve
from pruning.locking import claim_output

NAME = "evaluate"
HELP = "Translate FLORES-200 directions and score chrF++ and spBLEU (sacrebleu); write the paper's per-direction TSV."


@dataclass
class EvaluateConfig:
    """Flags of ``nllb-prune evaluate`` (keys of ``conf/evaluate.yaml``)."""

    model: str = required(help="model: a pruned export, an HF-layout directory or a fairseq checkpoint")
    data: str = required(help="FLORES-200 directory (holding dev/ and devtest/, or flores200_dataset/)")
    split: str = field(default="devtest", metadata={"help": "FLORES split: dev or devtest"})
    pairs: list[str] = field(default_factory=list, metadata={"help": "directions src-tgt, comma-separated"})
    langs: list[str] = field(default_factory=list, metadata={"help": "evaluate every direction between these languages, comma-separated"})
    out: str = required(help="score file to write (TSV); hypotheses go to OUT_STEM.hyp/, the summary to OUT_STEM.summary.json")
    max_sentences: Optional[int] = field(default=None, metadata={"help": "score only the first N sentences of each direction"})
    compare: Optional[str] = field(default=None, metadata={"help": "another score TSV (ours or the paper's): print per-direction and mean deltas"})
    spm: str = field(
        default="flores200",
        metadata={"help": "spBLEU tokenizer: flores200 (SPM-200), flores101 (SPM-100) or none", "choices": ["flores200", "flores101", "none"]},
    )
    beam: int = field(default=4, metadata={"help": "beam size (1 = greedy)"})
    max_length: int = field(default=200, metadata={"help": "most target tokens generated per sentence"})
    batch_tokens: int = field(default=4096, metadata={"help": "most padded source tokens per batch"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when available), cpu, cuda or cuda:N"})
    dtype: Optional[str] = field(default=None, metadata={"help": "bf16 | fp16 | fp32 (default: the checkpoint's)", "choices": DTYPE_CHOICES})
    lid: Optional[str] = field(
        default=None,
        metadata={"help": "language-identification model (fastText .bin/.ftz with FLORES labels, or `nllb-prune train-lid` JSON): adds the off-target rate"},
    )
    zero_experts: bool = field(
        default=False, metadata={"help": "the no-expert floor: every expert output zeroed, so MoE layers add nothing; routing still runs"}
    )
    long_input: str = field(
        default="error",
        metadata={
            "help": "a sentence longer than the model's positions: error (before translating anything), truncate or split (as translate --long-input)",
            "choices": ["error", "truncate", "split"],
        },
    )

    def validate(self) -> None:
        if bool(self.pairs) == bool(self.langs):
            raise ConfigError("give exactly one of --pairs src-tgt,... and --langs L1,L2,...")
        if self.max_sentences is not None and self.max_sentences < 1:
            raise ConfigError(f"--max-sentences must be positive, got {self.max_sentences}")
        from pruning.model.loading import check_device

        check_device(self.device)
        if self.long_input not in ("error", "truncate", "split"):
            raise ConfigError(f"--long-input must be error, truncate or split, got {self.long_input!r}")
        self.decoding().validate()

    def decoding(self):  # noqa: ANN201 - DecodingOptions, imported lazily
        from pruning.translate import DecodingOptions

        return DecodingOptions(beam=self.beam, max_length=self.max_length, batch_tokens=self.batch_tokens)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_flags(parser, EvaluateConfig)


def run(args: argparse.Namespace) -> int:
    from pruning.evaluate import output_paths

    config = resolve(EvaluateConfig, args)
    tsv, hypotheses, summary = output_paths(config.out)
    with claim_output(tsv, command=NAME, companions=(hypotheses, summary)):
        return evaluate(config)


def evaluate(config: EvaluateConfig) -> int:
    from pruning.evaluate import check_data, compare_scores, eval_directions, evaluate_model, read_scores
    from pruning.translate import load_for_translation

    directions = eval_directions(pairs=config.pairs, langs=config.langs)
    check_data(config.data, split=config.split, directions=directions, max_sentences=config.max_sentences)  # before loading the model
    other = read_scores(config.compare) if config.compare else None  # a bad file fails before any translation
    lid = None
    if config.lid:
        from pruning.evaluate import check_lid_targets
        from pruning.lid import load_lid

        lid = load_lid(config.lid)
        check_lid_targets(lid, [tgt for _, tgt in directions])  # before loading the model
    warnings.formatwarning = lambda message, *_args, **_kwargs: f"warning: {message}\n"
    model = load_for_translation(config.model, device=config.device, dtype=config.dtype)
    if config.zero_experts:
        model.set_no_experts(True)
    result = evaluate_model(
        model,
        data=config.data,
        out=config.out,
        directions=directions,
        split=config.split,
        max_sentences=config.max_sentences,
        options=config.decoding(),
        spm=config.spm,
        model_path=config.model,
        lid=lid,
        progress=sys.stderr.isatty(),
        long_input=config.long_input,
    )
    mean = result.summary["mean"]
    show = {k: ("NA" if v is None else f"{v:.2f}") for k, v in mean.items()}
    off_target = f"  off-target {show['off_target']}%" if "off_target" in show else ""
    print(f"mean over {len(result.scores)} direction(s): spBLEU {show['spBLEU']}  chrF++ {show['chrF++']}{off_target}")
    if lid is not None:
        identity = result.summary["lid"]
        print(f"off-target: language identifier {identity['kind']} {identity['path']} (sha256 {identity['sha256'][:12]})")
    print(f"signature: {result.summary['signature']}")
    for metric, signature in result.summary["sacrebleu_signatures"].items():
        print(f"sacrebleu {metric}: {signature}")
    print(f"wrote {result.tsv}, {result.summary_path}, hypotheses in {result.hypotheses}/")
    if other is not None:
        ours = read_scores(result.tsv)
        print(f"compared with {config.compare}:")
        for line in compare_scores(ours, other, what=str(config.compare)).lines():
            print(line)
    return 0
