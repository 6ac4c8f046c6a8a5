"""The testbed tokenizer: one sentencepiece model over all languages, wrapped as an NLLB tokenizer.

    python -m experiments.testbed.tokenizer --data experiments/testbed/data \
        --out experiments/testbed/data/tokenizer

Writes ``sentencepiece.bpe.model`` (a BPE model, under the file name NLLB uses) and the files of
``NllbTokenizer.save_pretrained``; load with ``NllbTokenizer.from_pretrained(out)`` or
``AutoTokenizer.from_pretrained(out)`` (the fast tokenizer is converted from the sentencepiece model).

Ids follow the released NLLB tokenizer's layout:

    0 <s>   1 <pad>   2 </s>   3 <unk>   4 .. n   sentencepiece pieces 3 .. n-1 (spm id + 1)
    n+1 .. n+L   the L language codes, sorted      n+L+1   <mask>          (n = spm vocabulary size)

so the model's ``vocab_size`` is ``len(tokenizer)`` = n + L + 2. Encoding (non-legacy NLLB behaviour):
source ``[src_lang] tokens </s>``, target labels ``[tgt_lang] tokens </s>``.

Why BPE and not unigram: sentencepiece's unigram trainer seeds its candidate pieces from the distinct
words of the corpus and drops every candidate found in only one distinct word, so the uninflected
words of the isolating language (qmi_Latn), however frequent, never became pieces (13.8 pieces per
sentence against 8.4 with BPE at the same vocabulary size).

Deterministic: sentences in a fixed order (languages as in corpus.json, lines in file order), no
shuffling or sampling of the input (``input_sentence_size=0``), one thread, fixed random seed.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from experiments.testbed.corpus import read_manifest, read_train
from experiments.testbed.synthlangs import SOURCE
from pruning.errors import UserError

if TYPE_CHECKING:
    from transformers import NllbTokenizer

SPM_FILE = "sentencepiece.bpe.model"
DEFAULT_VOCAB_SIZE = 4000
"""sentencepiece pieces. 4,000 gives 7-11 pieces per sentence on the default corpus (more in the
low-resource languages) and keeps the embedding of a d_model-128 model at 0.5M parameters; 8,000
would give 6-8 pieces at twice the embedding and output-projection cost."""
MODEL_MAX_LENGTH = 1024  # NLLB's max_position_embeddings


class TokenizerError(UserError):
    """Bad tokenizer settings or input."""


def training_sentences(data_dir: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """(language codes in corpus.json order, every training sentence of every language in that order)."""
    manifest = read_manifest(data_dir)
    codes = [entry["code"] for entry in manifest["languages"]]
    sentences = [line for code in codes for line in read_train(data_dir, code)]
    return codes, sentences


def train_sentencepiece(sentences: list[str], *, vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = 0) -> bytes:
    """A BPE sentencepiece model (serialised) over ``sentences``.

    When the corpus cannot fill ``vocab_size`` pieces, sentencepiece names the largest size it can;
    the model is then trained with that size.
    """
    if vocab_size < 100:
        raise TokenizerError(f"--vocab-size must be at least 100, got {vocab_size}")
    try:
        return _train(sentences, vocab_size=vocab_size, seed=seed)
    except RuntimeError as err:
        largest = re.search(r"set it to a value <= (\d+)", str(err))
        if largest is None:
            raise
        return _train(sentences, vocab_size=int(largest.group(1)), seed=seed)


def _train(sentences: list[str], *, vocab_size: int, seed: int) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    # every letter in both cases: a capital seen only at the start of a dev sentence must not be <unk>
    letters = {ch for sentence in sentences for ch in sentence}
    cased = {variant for ch in letters for variant in (ch.upper(), ch.lower()) if len(variant) == 1}
    required = "".join(sorted((letters | cased) - {" "}))
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,  # every character of every script gets a piece: no <unk> in the corpus
        required_chars=required,
        num_threads=1,
        input_sentence_size=0,  # use every sentence ...
        shuffle_input_sentence=False,  # ... in the given order
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # the ids NllbTokenizer expects of the spm model
        minloglevel=2,
    )  # fmt: skip
    return model.getvalue()


def make_tokenizer(spm_path: str | os.PathLike[str], codes: list[str]) -> "NllbTokenizer":
    """An ``NllbTokenizer`` over ``spm_path`` with ``codes`` as language tokens (ids laid out as NLLB's)."""
    import sentencepiece as spm
    from tokenizers import AddedToken
    from transformers import NllbTokenizer

    first = spm.SentencePieceProcessor(model_file=str(spm_path)).get_piece_size() + 1  # + fairseq offset
    languages = sorted(codes)
    added = {first + i: AddedToken(code, normalized=False, special=True) for i, code in enumerate(languages)}
    added[first + len(languages)] = AddedToken("<mask>", normalized=True, lstrip=True, special=True)
    source = SOURCE if SOURCE in codes else languages[0]
    target = next(code for code in codes if code != source) if len(codes) > 1 else source
    return NllbTokenizer(
        vocab_file=str(spm_path),
        src_lang=source,
        tgt_lang=target,
        additional_special_tokens=languages,
        added_tokens_decoder=added,
        model_max_length=MODEL_MAX_LENGTH,
    )


def build(
    data_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = 0,
) -> Path:
    """Train the sentencepiece model on the corpus at ``data_dir`` and save the tokenizer to ``out``.

    Everything is written to a temporary folder next to ``out`` that then replaces ``out``.
    """
    codes, sentences = training_sentences(data_dir)
    model = train_sentencepiece(sentences, vocab_size=vocab_size, seed=seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        (tmp / SPM_FILE).write_bytes(model)
        make_tokenizer(tmp / SPM_FILE, codes).save_pretrained(tmp)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _replace_dir(new: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load(path: str | os.PathLike[str]) -> "NllbTokenizer":
    from transformers import NllbTokenizer

    if not (Path(path) / SPM_FILE).is_file():
        raise TokenizerError(f"no {SPM_FILE} in {path}: build the tokenizer with `python -m experiments.testbed.tokenizer --data DATA --out {path}`")
    return NllbTokenizer.from_pretrained(str(path))


def describe(tokenizer: "NllbTokenizer", codes: list[str]) -> str:
    ids = ", ".join(f"{code} {tokenizer.convert_tokens_to_ids(code)}" for code in sorted(codes))
    return (
        f"len(tokenizer) = {len(tokenizer)} (model vocab_size); sentencepiece pieces {tokenizer.sp_model_size}\n"
        f"<s> {tokenizer.bos_token_id}, <pad> {tokenizer.pad_token_id}, </s> {tokenizer.eos_token_id}, "
        f"<unk> {tokenizer.unk_token_id}, <mask> {tokenizer.mask_token_id}\n"
        f"language codes: {ids}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.testbed.tokenizer", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="corpus directory (written by experiments.testbed.corpus)")
    parser.add_argument("--out", required=True, help="tokenizer directory to write")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help=f"sentencepiece pieces (default {DEFAULT_VOCAB_SIZE})")
    parser.add_argument("--seed", type=int, default=0, help="sentencepiece random seed (default 0)")
    args = parser.parse_args(argv)
    try:
        out = build(args.data, args.out, vocab_size=args.vocab_size, seed=args.seed)
        codes, sentences = training_sentences(args.data)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tokenizer = load(out)
    print(describe(tokenizer, codes))
    lengths = {}
    for code in codes:
        lines = read_train(args.data, code)
        lengths[code] = sum(len(tokenizer(line).input_ids) - 2 for line in lines) / len(lines)
    print("mean pieces per training sentence: " + ", ".join(f"{c} {n:.1f}" for c, n in lengths.items()))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
