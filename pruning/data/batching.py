"""Batches of sentences by length: the one grouping ``stats`` and ``translate`` / ``evaluate`` share."""

from __future__ import annotations

from typing import Callable, Optional, Sequence


def length_batches(lengths: Sequence[int], *, batch_tokens: int, group: Optional[Callable[[int], int]] = None) -> list[list[int]]:
    """Indices of ``lengths`` in batches: longest first, each batch's count x its longest <= ``batch_tokens``.

    A sentence longer than ``batch_tokens`` gets a batch of its own; ties keep input order. ``group(i)``
    (e.g. a chunk of sentences) keeps sentences of different groups apart, groups in increasing order.
    The batches depend only on the lengths, never on the number of processes.
    """
    key = group or (lambda i: 0)
    order = sorted(range(len(lengths)), key=lambda i: (key(i), -lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and key(batches[-1][0]) == key(i) and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches
