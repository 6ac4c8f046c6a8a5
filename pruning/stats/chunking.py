"""Counters per chunk of sentences (``nllb-prune stats --chunk-sentences K``), accumulated on the device.

Dimension legend: F elements of a collector's flat vector (:meth:`RoutingCollector.flat`), P of them
chunked (:func:`pruning.stats.counters.is_chunked`), N chunks of the direction.

Chunk ``c`` holds the sentences of lines ``[cK, (c+1)K)`` of the split; batches never mix chunks
(:func:`pruning.stats.batches.make_batches`). After each batch the collector's counters are moved into
the chunk's row of a [N, P] table on the device, and the collector is reset; the counters that are not
chunked (``out_sum``, ``coact``, maxima) go into a running [F] total. The direction's chunked counters
are the sum of its chunk rows, so chunks always add up to the direction.

The layout (which positions of the flat vector belong to which counter) is read from the collector
itself (:meth:`RoutingCollector.unflatten` of ``0 .. F-1``), so it follows whatever counters the
collector holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pruning.stats.counters import MAX_COUNTERS, Chunks, is_chunked


@dataclass(frozen=True)
class ChunkLayout:
    """Where each counter sits in a collector's flat vector."""

    size: int
    """F, elements of the flat vector."""
    chunked: torch.Tensor
    """[P] long: flat positions of the chunked counters, in table-column order."""
    added: torch.Tensor
    """Long: flat positions of the other additive counters (``out_sum``, ``coact``)."""
    maxima: torch.Tensor
    """Long: flat positions of the counters combined by maximum (:data:`MAX_COUNTERS`)."""
    columns: dict[str, dict[str, torch.Tensor]]
    """``{side: {counter: long tensor shaped like the counter}}``: its columns of the [N, P] table."""


def chunk_layout(collector: Any) -> ChunkLayout:
    """The layout of ``collector``'s flat vector (every accumulator a collector holds, in its order)."""
    size = int(collector.flat().numel())
    probe = collector.unflatten(torch.arange(size, dtype=torch.float64))  # {side: {counter: positions as float64}}
    chunked: list[torch.Tensor] = []
    added: list[torch.Tensor] = []
    maxima: list[torch.Tensor] = []
    columns: dict[str, dict[str, torch.Tensor]] = {}
    start = 0
    for side in sorted(probe):
        for name in sorted(probe[side]):
            positions = probe[side][name].to(torch.int64)
            if is_chunked(name, positions):
                chunked.append(positions.reshape(-1))
                columns.setdefault(side, {})[name] = torch.arange(start, start + positions.numel()).reshape(positions.shape)
                start += positions.numel()
            elif name in MAX_COUNTERS:
                maxima.append(positions.reshape(-1))
            else:
                added.append(positions.reshape(-1))
    empty = torch.zeros(0, dtype=torch.int64)
    cat = lambda parts: torch.cat(parts) if parts else empty  # noqa: E731
    return ChunkLayout(size, cat(chunked), cat(added), cat(maxima), columns)


class ChunkTable:
    """One process's counters of one direction per chunk, filled batch by batch (see the module docstring)."""

    def __init__(self, layout: ChunkLayout, *, first_chunk: int, num_chunks: int, chunk_sentences: int, device: torch.device):
        self.layout = layout
        self.first_chunk = first_chunk
        self.chunk_sentences = chunk_sentences
        self.table = torch.zeros(num_chunks, layout.chunked.numel(), dtype=torch.float64, device=device)  # [N, P]
        self.total = torch.zeros(layout.size, dtype=torch.float64, device=device)  # [F], chunked positions unused
        self.sentences = torch.zeros(num_chunks, dtype=torch.float64, device=device)  # [N]
        self._index = {name: getattr(layout, name).to(device) for name in ("chunked", "added", "maxima")}

    def take_batch(self, collector: Any, lines: list[int]) -> None:
        """Move ``collector``'s counters (one batch, of the sentences on ``lines``) into their chunk; reset it."""
        chunk = lines[0] // self.chunk_sentences
        if any(line // self.chunk_sentences != chunk for line in lines):
            raise AssertionError(f"a batch mixes chunks: lines {lines}")  # make_batches never does
        row = chunk - self.first_chunk
        flat = collector.flat().to(self.table.device)  # [F]
        self.table[row] += flat[self._index["chunked"]]
        added, maxima = self._index["added"], self._index["maxima"]
        self.total[added] += flat[added]
        self.total[maxima] = torch.maximum(self.total[maxima], flat[maxima])
        self.sentences[row] += len(lines)
        collector.reset()

    def flat(self) -> torch.Tensor:
        """[F + N*P + N]: the direction's flat counters (chunked ones = the sum of the chunks), the table, sentences per chunk."""
        total = self.total.clone()
        total[self._index["chunked"]] = self.table.sum(0)
        return torch.cat([total, self.table.reshape(-1), self.sentences])


def num_chunk_values(layout: ChunkLayout, num_chunks: int) -> int:
    """Elements after the flat counters in :meth:`ChunkTable.flat`: the table and the sentences per chunk."""
    return num_chunks * (layout.chunked.numel() + 1)


def chunks_from_flat(layout: ChunkLayout, tail: torch.Tensor, *, ids: range) -> Chunks:
    """:class:`Chunks` (CPU) from the part of :meth:`ChunkTable.flat` after the flat counters (summed over processes)."""
    n = len(ids)
    tail = tail.detach().to("cpu", torch.float64)
    table = tail[: n * layout.chunked.numel()].reshape(n, -1)  # [N, P]
    sentences = tail[n * layout.chunked.numel() :]  # [N]
    counters = {side: {name: table[:, cols].clone() for name, cols in named.items()} for side, named in layout.columns.items()}
    return Chunks(torch.tensor(list(ids), dtype=torch.int64), sentences.round().to(torch.int64), counters)
