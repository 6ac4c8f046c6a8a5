"""nllb-prune translate --model DIR --src L --tgt L [--input F] [--output F] [--beam 4] ..."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pruning.atomic import write_text
from pruning.config import ConfigError, add_dataclass_flags, resolve

NAME = "translate"
HELP = "Translate lines (stdin or --input) with a full model or a pruned export; output in input order."


@dataclass
class TranslateConfig:
    """Flags of ``nllb-prune translate`` (keys of ``conf/translate.yaml``)."""

    model: str = field(default="", metadata={"help": "model: a pruned export, an HF-layout directory or a fairseq checkpoint"})
    src: str = field(default="", metadata={"help": "source language code, e.g. fra_Latn"})
    tgt: str = field(default="", metadata={"help": "target language code, e.g. eng_Latn"})
    input: Optional[str] = field(default=None, metadata={"help": "file of sentences, one per line (default: stdin)"})
    output: Optional[str] = field(default=None, metadata={"help": "file to write (default: stdout); written to a temporary name, then renamed"})
    beam: int = field(default=4, metadata={"help": "beam size (1 = greedy)"})
    max_length: int = field(default=200, metadata={"help": "most target tokens generated per sentence"})
    batch_tokens: int = field(default=4096, metadata={"help": "most padded source tokens per batch"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when available), cpu, cuda or cuda:N"})
    dtype: Optional[str] = field(default=None, metadata={"help": "bf16 | fp16 | fp32 (default: the checkpoint's)", "choices": ["bf16", "fp16", "fp32"]})

    def validate(self) -> None:
        missing = [flag for flag, value in (("--model", self.model), ("--src", self.src), ("--tgt", self.tgt)) if not value]
        if missing:
            raise ConfigError(f"missing required setting(s): {', '.join(missing)}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.input and not Path(self.input).is_file():
            raise ConfigError(f"--input: file {self.input} does not exist")
        self.decoding().validate()

    def decoding(self):  # noqa: ANN201 - DecodingOptions, imported lazily
        from pruning.translate import DecodingOptions

        return DecodingOptions(beam=self.beam, max_length=self.max_length, batch_tokens=self.batch_tokens)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_flags(parser, TranslateConfig)


def read_lines(path: Optional[str]) -> list[str]:
    text = Path(path).read_text(encoding="utf-8") if path else sys.stdin.read()
    if text.endswith("\n"):
        text = text[:-1]
    return [line.rstrip("\r") for line in text.split("\n")] if text else []


def write_lines(path: Optional[str], lines: list[str]) -> None:
    body = "".join(f"{line}\n" for line in lines)
    if not path:
        sys.stdout.write(body)
        sys.stdout.flush()
        return
    write_text(path, body)


def run(args: argparse.Namespace) -> int:
    from pruning.translate import load_for_translation, translate_sentences

    config = resolve(TranslateConfig, args)
    lines = read_lines(config.input)
    model = load_for_translation(config.model, device=config.device, dtype=config.dtype)
    outputs = translate_sentences(
        model, lines, src=config.src, tgt=config.tgt, options=config.decoding(), progress=bool(config.input) and len(lines) > 1
    )
    write_lines(config.output, outputs)
    if config.output:
        print(f"wrote {len(outputs)} line(s) to {config.output}", file=sys.stderr)
    return 0
