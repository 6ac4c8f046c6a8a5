"""nllb-prune train-lid --data DIR --split SPLIT [--langs ..] --out lid.json [--eval-data DIR --eval-split devtest]"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Optional

from pruning.config import ConfigError, add_dataclass_flags, required, resolve
from pruning.locking import claim_output

NAME = "train-lid"
HELP = "Train a character n-gram naive-Bayes language identifier (JSON) for `evaluate --lid`, from a FLORES-layout directory."


@dataclass
class TrainLidConfig:
    """Flags of ``nllb-prune train-lid``."""

    data: str = required(help="directory with SPLIT/{lang}.SPLIT text files (FLORES layout)")
    split: str = field(default="dev", metadata={"help": "split folder to train on (e.g. dev, or the testbed's train)"})
    langs: list[str] = field(default_factory=list, metadata={"help": "languages, comma-separated (default: every file of the split)"})
    out: str = required(help="model file to write (JSON)")
    ngram_min: int = field(default=1, metadata={"help": "shortest character n-gram"})
    ngram_max: int = field(default=3, metadata={"help": "longest character n-gram"})
    max_features: Optional[int] = field(
        default=None, metadata={"help": "keep only this many n-grams (the most frequent, summed over languages' relative frequencies)"}
    )
    alpha: float = field(default=1.0, metadata={"help": "additive (Laplace) smoothing of the n-gram counts"})
    max_sentences: Optional[int] = field(default=None, metadata={"help": "train on the first N sentences of each language"})
    eval_data: str = field(default="", metadata={"help": "directory to report accuracy on (default: --data)"})
    eval_split: str = field(default="", metadata={"help": "split to report per-language accuracy on (default: none)"})

    def validate(self) -> None:
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ConfigError(f"--ngram-min/--ngram-max must satisfy 1 <= min <= max, got {self.ngram_min}/{self.ngram_max}")
        if self.eval_data and not self.eval_split:
            raise ConfigError("--eval-data needs --eval-split (which split of it to report accuracy on)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_flags(parser, TrainLidConfig)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pruning.lid import accuracy, read_language_texts, train_naive_bayes

    config = resolve(TrainLidConfig, args)
    with claim_output(config.out, command=NAME):
        texts = read_language_texts(config.data, split=config.split, langs=config.langs, max_sentences=config.max_sentences)
        source = {"data": str(config.data), "split": config.split, "sentences": {c: len(s) for c, s in texts.items()}}
        lid = train_naive_bayes(
            texts,
            ngram_range=(config.ngram_min, config.ngram_max),
            alpha=config.alpha,
            max_features=config.max_features,
            source=source,
        )
        path = lid.save(config.out)
    print(f"wrote {path}: {len(lid.codes)} languages, {len(lid.vocab)} n-grams ({config.ngram_min}-{config.ngram_max}), {path.stat().st_size / 1e3:.0f} kB")
    if config.eval_split:
        held_out = read_language_texts(config.eval_data or config.data, split=config.eval_split, langs=lid.codes)
        scores = accuracy(lid, held_out)
        print(f"accuracy on {Path(config.eval_data or config.data) / config.eval_split} (% of sentences identified as their language):")
        for code, value in scores.items():
            print(f"  {code}\t{value:.2f}\t({len(held_out[code])} sentences)")
        print(f"  mean\t{sum(scores.values()) / len(scores):.2f}")
    return 0
