"""The inputs of statistics collection: tokenized, padded batches of one direction.

Token conventions (docs/statistics.md): encoder input ``[src_lang] tokens </s>``; decoder labels
``[tgt_lang] tokens </s>``; decoder input the labels shifted right behind ``decoder_start_token_id``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from pruning.data.batching import length_batches


# ---- inputs ------------------------------------------------------------------------------------
@dataclass
class Batch:
    """Sentences of one direction, tokenized and padded (right)."""

    input_ids: torch.Tensor
    """[B, S] ``[src_lang] tokens </s>`` then padding."""
    attention_mask: torch.Tensor
    """[B, S] 1 for real source tokens."""
    labels: Optional[list[list[int]]]
    """Per sentence ``[tgt_lang] tokens </s>`` (teacher mode), or None (beam mode)."""
    sentences: list[int]
    """Line numbers (0-based) of the sentences in the FLORES files."""


def encode(tokenizer: Any, texts: list[str], *, lang: str, target: bool) -> list[list[int]]:
    """Token ids of ``texts``: ``[lang] tokens </s>`` for the source or (``target``) the labels."""
    if target:
        tokenizer.tgt_lang = lang
        return tokenizer(text_target=texts, add_special_tokens=True)["input_ids"]
    tokenizer.src_lang = lang
    return tokenizer(texts, add_special_tokens=True)["input_ids"]


def pad(sequences: list[list[int]], *, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, max len] and mask [B, max len]."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


def decoder_inputs(labels: list[list[int]], *, start_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher forcing: labels shifted right behind ``start_id``; mask = one real position per label."""
    label_ids, mask = pad(labels, pad_id=pad_id)  # [B, L]
    inputs = torch.cat([torch.full_like(label_ids[:, :1], start_id), label_ids[:, :-1]], dim=1)  # [B, L]
    inputs = inputs.masked_fill(mask == 0, pad_id)
    return inputs, mask


def make_batches(
    sources: list[list[int]],
    labels: Optional[list[list[int]]],
    *,
    batch_tokens: int,
    pad_id: int,
    first_line: int = 0,
    chunk_sentences: Optional[int] = None,
) -> list[Batch]:
    """Group sentences (longest first) so that ``B * max(longest source, longest label) <= batch_tokens``.

    A sentence longer than ``batch_tokens`` gets a batch of its own. The grouping depends only on the
    lengths, never on the number of processes. Sentence ``i`` is line ``first_line + i`` of the split;
    with ``chunk_sentences`` K, batches are made within each chunk (lines ``[cK, (c+1)K)``), chunk by
    chunk, so that a batch never mixes chunks.
    """
    sizes = [max(len(sources[i]), len(labels[i]) if labels is not None else 0) for i in range(len(sources))]
    groups = length_batches(sizes, batch_tokens=batch_tokens, group=(lambda i: (first_line + i) // chunk_sentences) if chunk_sentences else None)
    batches = []
    for group in groups:
        ids, mask = pad([sources[i] for i in group], pad_id=pad_id)
        lines = [first_line + i for i in group]
        batches.append(Batch(ids, mask, [labels[i] for i in group] if labels is not None else None, lines))
    return batches


def hypothesis_labels(sequences: torch.Tensor, *, eos_id: int) -> list[list[int]]:
    """Labels ``[tgt_lang] tokens </s>`` of generated sequences ``[start, tgt_lang, tokens, </s>, pad..]``."""
    labels = []
    for row in sequences.tolist():
        body = row[1:]
        end = next((i for i in range(1, len(body)) if body[i] == eos_id), len(body) - 1)
        labels.append(body[: end + 1])
    return labels
