"""Translate with an NLLB-MoE model (full, or a pruned export): batching, decoding, direction routing.

* The source is tokenised by the NLLB tokenizer with ``src_lang`` (``[src_code] tokens </s>``); the
  target is forced to start with the target language code (``forced_bos_token_id``).
* Sentences are sorted by length (longest first) and cut into batches of at most ``batch_tokens``
  padded source tokens (at least one sentence per batch); outputs come back in input order.
* Blank input lines give blank output lines without running the model.
* A pruned export serving several directions routes each direction over its own experts
  (``model.set_direction``, from the export's manifest) before translating it.
* A source longer than the model's positions (``max_position_embeddings``, 1,024 for NLLB-200, its
  language code and ``</s>`` included) is, by ``long_input`` (``--long-input``): an error before anything
  is translated (``error``, the default), cut to its first tokens (``truncate``), or translated in pieces
  of at most that many tokens, cut before a word where one starts in the piece's second half, whose
  translations are joined by a space (``split``); both with a warning naming the line.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from pruning.data.batching import length_batches
from pruning.errors import UserError

__all__ = ["DecodingOptions", "TranslateError", "translate_sentences"]

LONG_INPUT_CHOICES = ("error", "truncate", "split")
"""What happens to a source longer than the model's positions (see the module doc)."""


class TranslateError(UserError):
    """A translation request cannot be met: unknown language code, no tokenizer, bad options."""


@dataclass(frozen=True)
class DecodingOptions:
    """Decoding settings; each is a flag of ``nllb-prune translate`` / ``evaluate``."""

    beam: int = 4
    """Beam size (1 = greedy)."""
    max_length: int = 200
    """Most target tokens generated per sentence (the forced language code not counted)."""
    batch_tokens: int = 4096
    """Most padded source tokens per batch (sentences count x longest sentence)."""

    def validate(self) -> None:
        for flag, value in (("--beam", self.beam), ("--max-length", self.max_length), ("--batch-tokens", self.batch_tokens)):
            if value < 1:
                raise TranslateError(f"{flag} must be a positive integer, got {value}")

    def signature(self) -> str:
        return f"beam:{self.beam}|max_new_tokens:{self.max_length}|batch_tokens:{self.batch_tokens}|sampling:no"


def language_token_id(tokenizer: Any, code: str, *, flag: str) -> int:
    """The tokenizer's id of language code ``code``; a clear error, naming ``flag``, when it does not know the code."""
    token_id = tokenizer.convert_tokens_to_ids(code)
    if token_id is None or token_id == tokenizer.unk_token_id:
        from pruning.data.languages import tokenizer_codes

        known = tokenizer_codes(tokenizer)
        close = [c for c in known if c[:3] == code[:3]]
        hint = f" (did you mean {', '.join(close[:4])}?)" if close else ""
        shown = f": {', '.join(known[:12])}{' ...' if len(known) > 12 else ''}" if known else ""
        raise TranslateError(f"{flag} {code!r} is not a language code of this model's tokenizer{hint}; it knows {len(known)} codes{shown}")
    return int(token_id)


class _BeyondTokenizer:
    """A logits processor: ids the tokenizer cannot decode (embedding rows past its vocabulary) are never chosen."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.size :] = float("-inf")  # [batch * beams, vocab]
        return scores


def vocabulary_limit(model: Any, tokenizer: Any) -> Any:
    """Processors keeping generation inside the tokenizer's ids.

    NLLB-200's embedding has 256,206 rows, its tokenizer 256,204 ids: the padding rows at the end were
    never trained, and a tokenizer cannot decode them. Empty when the model's vocabulary is no larger.
    """
    from transformers import LogitsProcessorList

    rows = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    return LogitsProcessorList([_BeyondTokenizer(len(tokenizer))] if rows > len(tokenizer) else [])


def check_direction_codes(tokenizer: Any, directions: Sequence[tuple[str, str]]) -> None:
    """Every direction's languages must be codes of ``tokenizer`` (before anything is translated)."""
    for src, tgt in directions:
        language_token_id(tokenizer, src, flag=f"direction {src}-{tgt}: source language")
        language_token_id(tokenizer, tgt, flag=f"direction {src}-{tgt}: target language")


# ---- sources longer than the model's positions -----------------------------------------------------
def source_limit(model: Any) -> Optional[int]:
    """Most source tokens ``model`` reads, its language code and ``</s>`` included (None: unknown)."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def fit_sources(
    encoded: Sequence[list[int]],
    *,
    limit: Optional[int],
    long_input: str,
    tokenizer: Any,
    where: Callable[[int], str],
    warn: Callable[[str], None],
) -> tuple[list[list[int]], list[int]]:
    """Pieces of at most ``limit`` tokens (``[code] tokens </s>``) and, per piece, the index of its source."""
    if long_input not in LONG_INPUT_CHOICES:
        raise TranslateError(f"--long-input must be one of {', '.join(LONG_INPUT_CHOICES)}, got {long_input!r}")
    pieces: list[list[int]] = []
    owners: list[int] = []
    for i, ids in enumerate(encoded):
        fitted = (
            [list(ids)]
            if limit is None or len(ids) <= limit
            else _cut(list(ids), limit=limit, long_input=long_input, tokenizer=tokenizer, name=where(i), warn=warn)
        )
        pieces += fitted
        owners += [i] * len(fitted)
    return pieces, owners


def _cut(ids: list[int], *, limit: int, long_input: str, tokenizer: Any, name: str, warn: Callable[[str], None]) -> list[list[int]]:
    """One source longer than ``limit``: an error, its first tokens, or its pieces (each ``[code] tokens </s>``)."""
    head, tail = len(getattr(tokenizer, "prefix_tokens", [0])), len(getattr(tokenizer, "suffix_tokens", [0]))
    prefix, body, suffix = ids[:head], ids[head : len(ids) - tail], ids[len(ids) - tail :]
    room = limit - head - tail
    too_long = f"{name} has {len(ids)} tokens, more than the {limit} positions the model reads (max_position_embeddings, its language code and </s> included)"
    if long_input == "error":
        raise TranslateError(f"{too_long}; choose --long-input truncate (keep its first {room} tokens) or split (translate it in pieces)")
    if long_input == "truncate":
        warn(f"{too_long}: translated its first {room} tokens only")
        return [prefix + body[:room] + suffix]
    parts = split_tokens(body, size=room, word_start=lambda t: str(tokenizer.convert_ids_to_tokens(t)).startswith("\u2581"))
    warn(f"{too_long}: translated in {len(parts)} pieces joined by a space")
    return [prefix + part + suffix for part in parts]


def split_tokens(body: list[int], *, size: int, word_start: Callable[[int], bool]) -> list[list[int]]:
    """``body`` in pieces of at most ``size`` tokens, each cut before a word start in its second half if there is one."""
    pieces, start = [], 0
    while len(body) - start > size:
        end = start + size
        cut = next((j for j in range(end, start + size // 2, -1) if word_start(body[j])), end)
        pieces.append(body[start:cut])
        start = cut
    pieces.append(body[start:])
    return pieces


def _stderr_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def translate_sentences(
    model: Any,
    sentences: Sequence[str],
    *,
    src: str,
    tgt: str,
    options: DecodingOptions = DecodingOptions(),
    tokenizer: Any = None,
    progress: bool = False,
    long_input: str = "error",
    line_name: Callable[[int], str] = lambda i: f"sentence {i + 1}",
    warn: Callable[[str], None] = _stderr_warning,
) -> list[str]:
    """Translate ``sentences`` from ``src`` to ``tgt``; returns one line per input line, in input order.

    ``long_input`` (:data:`LONG_INPUT_CHOICES`) treats sources longer than the model's positions;
    ``line_name(i)`` names sentence ``i`` in its error or warning.
    """
    options.validate()
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise TranslateError("the model has no tokenizer: put sentencepiece.bpe.model or tokenizer_config.json beside its weights")
    language_token_id(tokenizer, src, flag="--src")
    tgt_id = language_token_id(tokenizer, tgt, flag="--tgt")
    if hasattr(model, "moe_layers"):
        model.set_direction(src, tgt)
    tokenizer.src_lang = src
    todo = [i for i, s in enumerate(sentences) if s.strip()]
    encoded = tokenizer([sentences[i] for i in todo], add_special_tokens=True, verbose=False)["input_ids"] if todo else []
    pieces, owners = fit_sources(
        encoded,
        limit=source_limit(model),
        long_input=long_input,
        tokenizer=tokenizer,
        where=lambda j: line_name(todo[j]),
        warn=warn,
    )
    translated = [""] * len(pieces)
    device = next(model.parameters()).device
    bar = tqdm(total=len(sentences) - len(todo) + len(pieces), desc=f"{src}-{tgt}", unit="sent", disable=not progress)
    bar.update(len(sentences) - len(todo))
    processors = vocabulary_limit(model, tokenizer)
    limit = {"logits_processor": processors} if processors else {}
    with torch.inference_mode():
        for batch in length_batches([len(ids) for ids in pieces], batch_tokens=options.batch_tokens):
            padded = tokenizer.pad({"input_ids": [pieces[j] for j in batch]}, return_tensors="pt")
            generated = model.generate(
                input_ids=padded["input_ids"].to(device),
                attention_mask=padded["attention_mask"].to(device),
                forced_bos_token_id=tgt_id,
                num_beams=options.beam,
                max_new_tokens=options.max_length,
                do_sample=False,
                **limit,
            )  # [batch, <= 1 + 1 + max_length]: decoder start, target code, tokens
            texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
            for j, text in zip(batch, texts):
                translated[j] = text.replace("\n", " ")
            bar.update(len(batch))
    bar.close()
    joined: list[list[str]] = [[] for _ in todo]
    for owner, text in zip(owners, translated):
        joined[owner].append(text)
    outputs = [""] * len(sentences)
    for j, parts in enumerate(joined):
        outputs[todo[j]] = " ".join(part for part in parts if part)
    return outputs


def load_for_translation(path: str, *, device: str = "auto", dtype: Optional[str] = None) -> Any:
    """``load_model`` with a translation-friendly device default (``auto``: CUDA when available)."""
    from pruning.model.loading import load_model, resolve_device

    return load_model(path, device=resolve_device(device), dtype=dtype)


def device_name(model: Any) -> str:
    device = next(model.parameters()).device
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def dtype_name(model: Any) -> str:
    return str(model.model.shared.weight.dtype).replace("torch.", "")
