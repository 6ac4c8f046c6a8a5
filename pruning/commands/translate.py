"""nllb-prune translate --model DIR --src L --tgt L [--input F] [--output F] [--beam 4] ..."""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pruning.atomic import write_text
from pruning.config import DTYPE_CHOICES, ConfigError, add_dataclass_flags, required, resolve
from pruning.locking import claim_output

NAME = "translate"
HELP = "Translate lines (stdin or --input) with a full model or a pruned export; output in input order."


@dataclass
class TranslateConfig:
    """Flags of ``nllb-prune translate`` (keys of ``conf/translate.yaml``)."""

    model: str = required(help="model: a pruned export, an HF-layout directory or a fairseq checkpoint")
    src: str = required(help="source language code, e.g. fra_Latn")
    tgt: str = required(help="target language code, e.g. eng_Latn")
    input: Optional[str] = field(default=None, metadata={"help": "file of sentences, one per line (default: stdin)"})
    output: Optional[str] = field(default=None, metadata={"help": "file to write (default: stdout); written to a temporary name, then renamed"})
    beam: int = field(default=4, metadata={"help": "beam size (1 = greedy)"})
    max_length: int = field(default=200, metadata={"help": "most target tokens generated per sentence"})
    batch_tokens: int = field(default=4096, metadata={"help": "most padded source tokens per batch"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when available), cpu, cuda or cuda:N"})
    dtype: Optional[str] = field(default=None, metadata={"help": "bf16 | fp16 | fp32 (default: the checkpoint's)", "choices": DTYPE_CHOICES})
    long_input: str = field(
        default="error",
        metadata={
            "help": "a line longer than the model's positions (max_position_embeddings, 1024 for NLLB-200): error (stop before "
            "translating anything), truncate (translate its first tokens) or split (translate it in pieces joined by a space); "
            "truncate and split warn",
            "choices": ["error", "truncate", "split"],
        },
    )

    def validate(self) -> None:
        from pruning.model.loading import check_device

        check_device(self.device)
        if self.input and not Path(self.input).exists():
            raise ConfigError(f"--input: file {self.input} does not exist")
        if self.input and Path(self.input).is_dir():
            raise ConfigError(f"--input {self.input} is a directory; expected a file of sentences, one per line")
        if self.long_input not in ("error", "truncate", "split"):
            raise ConfigError(f"--long-input must be error, truncate or split, got {self.long_input!r}")
        self.decoding().validate()

    def decoding(self):  # noqa: ANN201 - DecodingOptions, imported lazily
        from pruning.translate import DecodingOptions

        return DecodingOptions(beam=self.beam, max_length=self.max_length, batch_tokens=self.batch_tokens)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_flags(parser, TranslateConfig)


def read_lines(path: Optional[str]) -> list[str]:
    """The lines of ``path`` (a file, a FIFO, ``<(...)``) or of stdin; read once, as UTF-8."""
    text = decode_utf8(_read_bytes(path), what=f"--input {path}" if path else "stdin")
    if text.endswith("\n"):
        text = text[:-1]
    return [line.rstrip("\r") for line in text.split("\n")] if text else []


def _read_bytes(path: Optional[str]) -> bytes | str:
    if path:
        try:
            with open(path, "rb") as handle:  # open(), not Path.read_bytes checks: a FIFO is not a regular file
                return handle.read()
        except OSError as exc:
            raise ConfigError(f"--input {path}: cannot read it ({exc.strerror or exc})") from None
    stream = getattr(sys.stdin, "buffer", None)
    return stream.read() if stream is not None else sys.stdin.read()


def decode_utf8(data: bytes | str, *, what: str) -> str:
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{what} is not valid UTF-8: line {line}, byte {exc.start} ({data[exc.start : exc.start + 1]!r}); convert it, e.g. iconv -t UTF-8"
        ) from None


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
    with contextlib.ExitStack() as claim:
        if config.output:
            claim.enter_context(claim_output(config.output, command=NAME, flag="--output"))
        lines = read_lines(config.input)
        model = load_for_translation(config.model, device=config.device, dtype=config.dtype)
        source = config.input or "stdin"
        outputs = translate_sentences(
            model,
            lines,
            src=config.src,
            tgt=config.tgt,
            options=config.decoding(),
            progress=bool(config.input) and len(lines) > 1,
            long_input=config.long_input,
            line_name=lambda i: f"line {i + 1} of {source}",
        )
        write_lines(config.output, outputs)
    if config.output:
        print(f"wrote {len(outputs)} line(s) to {config.output}", file=sys.stderr)
    return 0
