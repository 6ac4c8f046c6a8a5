"""Collect routing statistics: hooks on every MoE layer, teacher forcing or beam search, over FLORES directions.

Dimension legend: B sentences in a batch, S source length, L target (label) length, T tokens routed by
one layer call, R router rows of the layer (its kept experts), E experts of the unpruned layer,
C = 6 per-expert counters (:data:`ROW_COUNTERS`), Ls MoE layers of a side.

Token conventions (docs/statistics.md):
- encoder input: the NLLB tokenizer's ``[src_lang] tokens </s>``; every non-padding position counts
  for the source language (``enc``);
- decoder labels: ``[tgt_lang] tokens </s>``; decoder input: the labels shifted right behind
  ``decoder_start_token_id`` (``</s>``): ``[</s>, tgt_lang] tokens``; one position per label, every one
  of them counts for the target language (``dec``); padding never counts (``decoder_attention_mask``);
- beam mode: the hypothesis beam search returns, ``[tgt_lang] tokens </s>`` (cut after its first
  ``</s>``), is run through the model with teacher forcing like a reference, so its routing is counted
  exactly once per position; the routing inside the search (discarded beams, cached steps) is not counted.

Counters are computed in the hook with a few vectorised ops per layer call and accumulated on the
model's device in float64; they move to the CPU once per direction (:meth:`RoutingCollector.take`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from pruning.config import ConfigError
from pruning.model.moe import MoeLayer, Routing
from pruning.stats.chunking import ChunkTable, chunk_layout, chunks_from_flat, num_chunk_values
from pruning.data.directions import SHORT_SIDE, direction_key, split_direction
from pruning.stats.counters import BASE_COUNTERS, MAX_COUNTERS, RoutingStats, StatsError
from pruning.stats.outputs import GATE_RATIO_BINS, GATE_RATIO_HIST, OUTPUT_COUNTERS, gate_ratio_histogram, output_counters, tap_dispatch

ROW_COUNTERS = ("top1", "top2", "gate", "conf1", "conf2", "rank")
"""The per-expert counters, in the row order of the accumulators ([Ls, C, E]); ``tokens`` is kept apart."""
assert set(ROW_COUNTERS) | {"tokens"} == set(BASE_COUNTERS)

MODES = ("teacher", "beam")
_VOLATILE_CONFIG_KEYS = {"transformers_version", "torch_dtype", "dtype", "output_router_logits", "architectures"}


# ---- counters of one layer call ------------------------------------------------------------------
def routing_counters(routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """Counters of one MoE layer call, per router row: ``([C, R] float64, tokens [] float64)``.

    Over the real (non-padding) tokens: top1/top2 = times the row is the router's 1st/2nd choice;
    gate = sum of its gate probability; conf1/conf2 = sum of its probability where 1st/2nd; rank = sum
    of its rank, 1 = the router's 1st choice, 2 = its 2nd, then by decreasing logit (ties: lower row
    first). Rows the router may not choose (logit -inf: inactive for the direction) get no rank and no
    probability. A layer with a single available expert makes no 2nd choice. Capacity dropping does not
    change these counters (the router's choices are counted; at eval capacity nothing is dropped).
    """
    logits, probs, choice = routing.logits, routing.probs, routing.expert_idx  # [T, R] fp32, [T, R] fp32, [T, K]
    mask = routing.token_mask  # [T] bool
    if logits.device.type == "cpu" and not bool(mask.all()):
        # on the CPU, drop the padding first (less to sort); on a GPU, masks avoid a device synchronisation
        logits, probs, choice, mask = logits[mask], probs[mask], choice[mask], mask[mask]
    real = mask.to(torch.float64)  # [T]
    num_rows = logits.shape[1]
    zeros = torch.zeros(num_rows, dtype=torch.float64, device=logits.device)
    if logits.shape[0] == 0:
        return torch.stack([zeros] * len(ROW_COUNTERS)), real.sum()
    first, second = choice[:, 0], choice[:, 1]  # [T], [T]
    available = logits[0] > float("-inf")  # [R]: the active set is the same for every token
    real2 = real * (available.sum() >= 2).to(torch.float64)  # [T]: tokens that have a 2nd choice

    top1 = zeros.index_add(0, first, real)  # [R]
    top2 = zeros.index_add(0, second, real2)
    # one batch's sum in fp32 (T terms of at most 1), accumulated across batches in float64
    gate = (mask.to(probs.dtype) @ probs).to(torch.float64)  # [R]
    conf1 = zeros.index_add(0, first, probs.gather(1, first[:, None])[:, 0].to(torch.float64) * real)
    conf2 = zeros.index_add(0, second, probs.gather(1, second[:, None])[:, 0].to(torch.float64) * real2)
    rank = rank_sums(logits, first=first, second=second, real=real) * available  # [R]
    return torch.stack([top1, top2, gate, conf1, conf2, rank]), real.sum()


def rank_sums(logits: torch.Tensor, *, first: torch.Tensor, second: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """[R] float64: per router row, the sum over real tokens of its rank (1 = ``first``, 2 = ``second``,
    then by decreasing logit, equal logits by increasing row).

    A full per-token sort is the costly part of the counters. On CUDA it is one segmented ``argsort``;
    on the CPU torch sorts rows of 128 slowly (~6 ms for 1000 tokens), so numpy sorts integer keys
    instead (~0.2 ms): the logit's order-preserving integer with the row index in the low bits
    (:func:`_rank_sums_numpy`). Both give the same sums, ties included (tested).
    """
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return _rank_sums_numpy(logits, first=first, second=second, real=real)
    return _rank_sums_torch(logits, first=first, second=second, real=real)


def _rank_sums_torch(logits: torch.Tensor, *, first: torch.Tensor, second: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    num_rows = logits.shape[1]
    # the 1st choice is written last so that it wins when a layer has one expert (first == second)
    key = logits.scatter(1, second[:, None], torch.finfo(logits.dtype).max)
    key = key.scatter(1, first[:, None], float("inf"))  # [T, R]
    order = key.argsort(dim=1, descending=True, stable=True)  # [T, R]: rows from rank 1 to rank R
    position = torch.arange(1, num_rows + 1, dtype=torch.float64, device=logits.device)  # [R]
    zeros = torch.zeros(num_rows, dtype=torch.float64, device=logits.device)
    return zeros.index_add(0, order.reshape(-1), (real[:, None] * position).reshape(-1))


def _rank_sums_numpy(logits: torch.Tensor, *, first: torch.Tensor, second: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    import numpy as np

    num_tokens, num_rows = logits.shape
    shift = max(1, (num_rows - 1).bit_length())
    bits = (logits + 0.0).numpy().view(np.int32)  # [T, R]; + 0.0 turns -0.0 into +0.0
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # int32 increasing with the float value (-inf lowest)
    keys = np.invert(ordered).astype(np.int64)  # decreasing logit first
    keys <<= shift
    keys |= _row_ids(num_rows)[None, :]  # equal logits: lower row first
    tokens = np.arange(num_tokens)
    first, second = first.numpy(), second.numpy()
    keys[tokens, second] = -(1 << (32 + shift)) | second  # before every logit ...
    keys[tokens, first] = -(2 << (32 + shift)) | first  # ... the 1st choice before the 2nd (and wins if they coincide)
    keys.sort(axis=1)
    keys &= (1 << shift) - 1  # [T, R]: rows from rank 1 to rank R
    weights = _positions(num_tokens, num_rows)  # [T*R]: 1..R per token
    real_np = real.numpy()
    if not (real_np == 1).all():
        weights = (weights.reshape(num_tokens, num_rows) * real_np[:, None]).reshape(-1)
    return torch.from_numpy(np.bincount(keys.reshape(-1), weights=weights, minlength=num_rows))


_POSITIONS: dict[int, Any] = {}


def _positions(num_tokens: int, num_rows: int) -> Any:
    """Read-only float64 [num_tokens * num_rows]: 1..num_rows repeated (cached, grown on demand)."""
    import numpy as np

    cached = _POSITIONS.get(num_rows)
    if cached is None or cached.shape[0] < num_tokens * num_rows:
        cached = np.tile(np.arange(1, num_rows + 1, dtype=np.float64), max(num_tokens, 1024))
        cached.flags.writeable = False
        _POSITIONS[num_rows] = cached
    return cached[: num_tokens * num_rows]


def _row_ids(num_rows: int) -> Any:
    import numpy as np

    return np.arange(num_rows, dtype=np.int64)


_OUT_PARTS = ("rows", "out_sum", "coact", GATE_RATIO_HIST)
"""The ``--expert-outputs`` accumulators of a side, in :meth:`RoutingCollector.flat` order."""


# ---- the collector -----------------------------------------------------------------------------
class RoutingCollector:
    """Forward hooks on every :class:`MoeLayer` of a model, accumulating counters while :attr:`enabled`.

    Counters are indexed by the ORIGINAL expert index (``Routing.expert_ids``), so a pruned model's
    counters still have E columns. The hooks only read the layer's output; they never change it.
    """

    def __init__(self, model: Any, *, num_experts: int, expert_outputs: bool = False):
        self.num_experts = num_experts
        self.enabled = True
        self.expert_outputs = expert_outputs
        self._handles = []
        self._tapped: list[tuple[MoeLayer, Any]] = []  # (layer, its own dispatch) to restore on close
        self._layers: dict[str, list[MoeLayer]] = {"enc": [], "dec": []}
        for side, _, moe in model.moe_layers():
            short = SHORT_SIDE[side]
            row = len(self._layers[short])
            self._layers[short].append(moe)
            self._handles.append(moe.register_forward_hook(self._hook(short, row)))
            if expert_outputs:
                self._tapped.append((moe, moe.dispatch))
                moe.dispatch = tap_dispatch(moe.dispatch, self._outputs_hook(short, row), enabled=lambda: self.enabled)
        self._acc: dict[str, torch.Tensor] = {}
        self._tokens: dict[str, torch.Tensor] = {}
        self._out: dict[str, dict[str, torch.Tensor]] = {}  # side -> {"rows" [Ls, C', E], "out_sum" [Ls, E, D], "coact" [Ls, E, E]}
        self.reset()

    def _outputs_hook(self, side: str, row: int):  # noqa: ANN202 - called by the tapped dispatch
        def hook(routing: Routing, expert: torch.Tensor, token: torch.Tensor, k: torch.Tensor, y: torch.Tensor) -> None:
            rows, out_sum, coact = output_counters(routing, expert, token, k, y, num_experts=self.num_experts)
            acc = self._out[side]
            if acc["rows"].device != rows.device:
                self._out[side] = acc = {name: value.to(rows.device) for name, value in acc.items()}
            i_max = OUTPUT_COUNTERS.index("max_abs")
            acc["rows"][row, :i_max] += rows[:i_max]
            acc["rows"][row, i_max] = torch.maximum(acc["rows"][row, i_max], rows[i_max])
            acc["out_sum"][row] += out_sum
            acc["coact"][row] += coact

        return hook

    def _hook(self, side: str, row: int):  # noqa: ANN202 - a forward hook
        def hook(module: MoeLayer, inputs: Any, output: Any) -> None:
            if not self.enabled:
                return
            routing: Routing = output[1]
            counters, tokens = routing_counters(routing)  # [C, R], []
            acc = self._accumulator(side, counters.device)
            acc[row].index_add_(1, routing.expert_ids.to(counters.device), counters)  # [C, E] += [C, R] by id
            self._tokens[side][row] += tokens
            if self.expert_outputs:
                hist = gate_ratio_histogram(routing)  # [B]
                out = self._out[side]
                if out[GATE_RATIO_HIST].device != hist.device:
                    self._out[side] = out = {name: value.to(hist.device) for name, value in out.items()}
                out[GATE_RATIO_HIST][row] += hist

        return hook

    def _accumulator(self, side: str, device: torch.device) -> torch.Tensor:
        acc = self._acc[side]
        if acc.device != device:
            self._acc[side] = acc = acc.to(device)
            self._tokens[side] = self._tokens[side].to(device)
        return acc

    def reset(self) -> None:
        for side, layers in self._layers.items():
            device = layers[0].router.weight.device if layers else torch.device("cpu")
            # [Ls, C, E] and [Ls], float64 on the model's device
            self._acc[side] = torch.zeros(len(layers), len(ROW_COUNTERS), self.num_experts, dtype=torch.float64, device=device)
            self._tokens[side] = torch.zeros(len(layers), dtype=torch.float64, device=device)
            if self.expert_outputs:
                d_model = layers[0].experts.fc1_weight.shape[2] if layers else 0
                self._out[side] = {
                    "rows": torch.zeros(len(layers), len(OUTPUT_COUNTERS), self.num_experts, dtype=torch.float64, device=device),
                    "out_sum": torch.zeros(len(layers), self.num_experts, d_model, dtype=torch.float64, device=device),
                    "coact": torch.zeros(len(layers), self.num_experts, self.num_experts, dtype=torch.float64, device=device),
                    GATE_RATIO_HIST: torch.zeros(len(layers), GATE_RATIO_BINS, dtype=torch.float64, device=device),
                }

    def flat(self) -> torch.Tensor:
        """Every accumulator as one float64 vector on the device (for an all-reduce); see :meth:`unflatten`."""
        parts = [t.reshape(-1) for side in ("enc", "dec") for t in (self._acc[side], self._tokens[side])]
        if self.expert_outputs:  # after the routing counters: [Ls, C', E], [Ls, E, D], [Ls, E, E], [Ls, B] per side
            parts += [self._out[side][name].to(parts[0].device).reshape(-1) for side in ("enc", "dec") for name in _OUT_PARTS]
        return torch.cat(parts)

    def peak_positions(self) -> torch.Tensor:
        """[M] long: the positions in :meth:`flat` of counters combined by maximum, not sum (``max_abs``)."""
        parts = [torch.zeros(t.numel(), dtype=torch.bool) for side in ("enc", "dec") for t in (self._acc[side], self._tokens[side])]
        if self.expert_outputs:
            for side in ("enc", "dec"):
                for name in _OUT_PARTS:
                    mask = torch.zeros(self._out[side][name].shape, dtype=torch.bool)
                    if name == "rows":
                        mask[:, [OUTPUT_COUNTERS.index(c) for c in OUTPUT_COUNTERS if c in MAX_COUNTERS]] = True
                    parts.append(mask.reshape(-1))
        return torch.cat(parts).nonzero().reshape(-1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """``{side: {counter: CPU float64 tensor}}`` from a vector laid out like :meth:`flat`."""
        flat = flat.detach().to("cpu", torch.float64)
        out: dict[str, dict[str, torch.Tensor]] = {}
        start = 0
        for side in ("enc", "dec"):
            acc_shape, n_layers = self._acc[side].shape, self._tokens[side].shape[0]
            acc = flat[start : start + acc_shape.numel()].reshape(acc_shape)  # [Ls, C, E]
            start += acc_shape.numel()
            tokens = flat[start : start + n_layers]  # [Ls]
            start += n_layers
            if n_layers == 0:
                continue
            out[side] = {name: acc[:, i].clone() for i, name in enumerate(ROW_COUNTERS)}
            out[side]["tokens"] = tokens.clone()
        if self.expert_outputs:
            for side in ("enc", "dec"):
                for name in _OUT_PARTS:
                    shape = self._out[side][name].shape
                    value = flat[start : start + shape.numel()].reshape(shape)
                    start += shape.numel()
                    if shape[0] == 0:
                        continue
                    if name == "rows":
                        out[side].update({counter: value[:, i].clone() for i, counter in enumerate(OUTPUT_COUNTERS)})
                    else:
                        out[side][name] = value.clone()
        return out

    def take(self) -> dict[str, dict[str, torch.Tensor]]:
        """The counters so far (moved to the CPU once), then reset."""
        out = self.unflatten(self.flat())
        self.reset()
        return out

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for moe, dispatch in self._tapped:
            moe.dispatch = dispatch
        self._tapped = []


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
    sources: list[list[int]], labels: Optional[list[list[int]]], *, batch_tokens: int, pad_id: int,
    first_line: int = 0, chunk_sentences: Optional[int] = None,
) -> list[Batch]:
    """Group sentences (longest first) so that ``B * max(longest source, longest label) <= batch_tokens``.

    A sentence longer than ``batch_tokens`` gets a batch of its own. The grouping depends only on the
    lengths, never on the number of processes. Sentence ``i`` is line ``first_line + i`` of the split;
    with ``chunk_sentences`` K, batches are made within each chunk (lines ``[cK, (c+1)K)``), chunk by
    chunk, so that a batch never mixes chunks.
    """
    def size(i: int) -> int:
        return max(len(sources[i]), len(labels[i]) if labels is not None else 0)

    def chunk(i: int) -> int:
        return (first_line + i) // chunk_sentences if chunk_sentences else 0

    order = sorted(range(len(sources)), key=lambda i: (chunk(i), -size(i), i))
    groups: list[list[int]] = []
    for i in order:
        if groups and chunk(groups[-1][0]) == chunk(i) and (len(groups[-1]) + 1) * size(groups[-1][0]) <= batch_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
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


# ---- options -----------------------------------------------------------------------------------
@dataclass
class StatsOptions:
    """What ``nllb-prune stats`` collects; each field is a flag and a key of ``conf/collect_stats.yaml``."""

    model: str = field(default="", metadata={"help": "checkpoint: HF-layout directory, fairseq checkpoint, or a pruned export"})
    data: str = field(default="", metadata={"help": "FLORES-200 directory (holding dev/ and devtest/, or flores200_dataset/)"})
    split: str = field(default="dev", metadata={"help": "FLORES split: dev or devtest"})
    langs: list[str] = field(default_factory=list, metadata={"help": "languages, comma-separated: every direction among them"})
    pairs: list[str] = field(default_factory=list, metadata={"help": "directions src-tgt, comma-separated"})
    lang: str = field(default="", metadata={"help": "one language: the directions into and out of it against --partners"})
    partners: list[str] = field(default_factory=list, metadata={"help": "partner languages for --lang, comma-separated"})
    mode: str = field(default="teacher", metadata={"help": "teacher (forcing the reference) or beam (count the beam-search hypothesis)", "choices": MODES})
    beam: int = field(default=4, metadata={"help": "beam size for --mode beam"})
    max_new_tokens: int = field(default=256, metadata={"help": "longest hypothesis for --mode beam, in tokens (its language code included)"})
    batch_tokens: int = field(default=4096, metadata={"help": "padded tokens per batch: sentences x longest (source or target)"})
    max_sentences: int | None = field(default=None, metadata={"help": "use at most N sentences of the split (from --first-sentence)"})
    first_sentence: int = field(default=0, metadata={"help": "first line (0-based) of the split to use; with --chunk-sentences K a multiple of K"})
    chunk_sentences: int | None = field(default=None, metadata={"help": "also keep the counters per chunk of K sentences (lines [cK, (c+1)K)) so that they can be resampled (nllb-prune stability); 0 or unset: off"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto (under torchrun: cuda:LOCAL_RANK)"})
    dtype: str | None = field(default=None, metadata={"help": "fp32, bf16 or fp16 (default: the checkpoint's); routers always run in fp32"})
    dispatch: str = field(default="auto", metadata={"help": "expert dispatch: auto (grouped GEMM where supported), grouped or loop", "choices": ("auto", "grouped", "loop")})
    out: str = field(default="", metadata={"help": "statistics file to write (.safetensors)"})
    resume: bool = field(default=False, metadata={"help": "continue --out: skip the directions it already holds"})
    expert_parallel: int = field(default=1, metadata={"help": "ranks sharing one model's experts (torchrun); world = this x data-parallel size"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    expert_outputs: bool = field(default=False, metadata={"help": "also count expert-output norms, gate x norm, max |activation|, mean output, co-activation and the p2/p1 gate histogram (one process: the experts run twice; docs/statistics.md)"})

    def validate(self) -> None:
        missing = [flag for flag, value in (("--model", self.model), ("--data", self.data), ("--out", self.out)) if not value]
        if missing:
            raise ConfigError(f"missing required setting(s): {', '.join(missing)}")
        given = [flag for flag, value in (("--langs", self.langs), ("--pairs", self.pairs), ("--lang", self.lang)) if value]
        if len(given) != 1:
            what = "none" if not given else " and ".join(given)
            raise ConfigError(f"give exactly one of --langs, --pairs, --lang (with --partners), got {what}")
        if self.lang and not self.partners:
            raise ConfigError("--lang needs --partners: the languages it is translated from and into")
        if self.partners and not self.lang:
            raise ConfigError("--partners is for --lang")
        if self.langs and len(set(self.langs)) < 2:
            raise ConfigError(f"--langs needs at least two languages (every direction among them), got {self.langs}")
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        from pruning.model.loading import check_device

        check_device(self.device)
        for flag, value in (("--beam", self.beam), ("--max-new-tokens", self.max_new_tokens), ("--batch-tokens", self.batch_tokens), ("--expert-parallel", self.expert_parallel)):
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1, got {value}")
        if self.max_sentences is not None and self.max_sentences < 1:
            raise ConfigError(f"--max-sentences must be at least 1, got {self.max_sentences}")
        if self.first_sentence < 0:
            raise ConfigError(f"--first-sentence must be a line number >= 0, got {self.first_sentence}")
        if self.chunk_sentences is not None and self.chunk_sentences < 0:
            raise ConfigError(f"--chunk-sentences must be a number of sentences >= 1 (0: off), got {self.chunk_sentences}")
        if self.chunk_size and self.first_sentence % self.chunk_size:
            raise ConfigError(
                f"--first-sentence {self.first_sentence} must be a multiple of --chunk-sentences {self.chunk_size}, "
                "so that a chunk id names the same sentences in every file"
            )
        self.directions()

    def directions(self) -> list[str]:
        """The directions asked for, in a stable order (no duplicates, no ``x-x``)."""
        if self.pairs:
            out = []
            for pair in self.pairs:
                src, tgt = split_direction(pair, what="--pairs")
                if src == tgt:
                    raise ConfigError(f"--pairs: {pair!r} translates a language into itself")
                out.append(direction_key(src, tgt))
            return list(dict.fromkeys(out))
        if self.langs:
            langs = list(dict.fromkeys(self.langs))
            return [direction_key(s, t) for s in langs for t in langs if s != t]
        partners = [p for p in dict.fromkeys(self.partners) if p != self.lang]
        return [direction_key(self.lang, p) for p in partners] + [direction_key(p, self.lang) for p in partners]

    def languages(self) -> list[str]:
        return sorted({lang for d in self.directions() for lang in split_direction(d)})

    @property
    def chunk_size(self) -> Optional[int]:
        """K of ``--chunk-sentences``, or None when chunking is off (unset or 0)."""
        return self.chunk_sentences or None

    def lines(self, num_lines: int) -> range:
        """The line numbers counted in a split of ``num_lines`` lines (``--first-sentence``, ``--max-sentences``)."""
        end = num_lines if self.max_sentences is None else min(num_lines, self.first_sentence + self.max_sentences)
        return range(self.first_sentence, end)

    def chunk_ids(self, num_lines: int) -> range:
        """The ids of the chunks those lines fall in (``--chunk-sentences`` must be on)."""
        k, lines = self.chunk_size, self.lines(num_lines)
        assert k is not None
        return range(lines.start // k, (lines.stop - 1) // k + 1)


def check_languages(options: StatsOptions, flores: Any) -> None:
    """Every language must have a file in the split (the FLORES reader's error lists the valid codes)."""
    num_lines = flores.num_lines(options.split)
    for lang in options.languages():
        flores.path(lang, options.split)
    if options.first_sentence >= num_lines:
        raise StatsError(f"--first-sentence {options.first_sentence} is past the end of split {options.split} ({num_lines} lines)")


def check_tokenizer_languages(tokenizer: Any, languages: list[str]) -> None:
    from pruning.data.languages import tokenizer_codes

    unknown = [lang for lang in languages if tokenizer.convert_tokens_to_ids(lang) == tokenizer.unk_token_id]
    if unknown:
        known = tokenizer_codes(tokenizer)
        raise StatsError(
            f"the model's tokenizer has no language code for {unknown}; it knows {len(known)} codes"
            + (f": {', '.join(known[:10])} ..." if known else "")
        )


# ---- identity and info ---------------------------------------------------------------------------
def model_identity(model: Any) -> dict[str, Any]:
    """Path, layout, a hash of the config and a cheap fingerprint of the routers (fp32 rows + kept ids).

    The fingerprint does not depend on the dtype, on the device or on expert parallelism (every rank
    holds every router row), so runs that must give the same counters give the same identity.
    """
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    digest = hashlib.sha256()
    kept = 0
    for side, layer, moe in model.moe_layers():
        ids = moe.router.expert_ids.detach().cpu().to(torch.int64)
        kept += len(ids)
        digest.update(f"{side}.{layer}:".encode())
        digest.update(ids.numpy().tobytes())
        digest.update(moe.router.weight.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return {
        "path": str(getattr(model, "source_path", "")),
        "layout": getattr(model, "source_layout", None),
        "config_sha256": config_hash,
        "router_fingerprint": digest.hexdigest()[:32],
        "experts_kept": kept,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }


def versions() -> dict[str, str]:
    import transformers

    import pruning

    return {"torch": torch.__version__, "transformers": transformers.__version__, "nllb-prune": pruning.__version__}


def collection_info(options: StatsOptions, model: Any, *, expert_parallel: int, data_parallel: int, data_root: Path) -> dict[str, Any]:
    """What made these counters (stored in the file's ``info``)."""
    identity = model_identity(model)
    identity["path"] = os.path.abspath(options.model)
    info: dict[str, Any] = {
        "model": identity,
        "data": {"dir": os.path.abspath(data_root), "split": options.split, "max_sentences": options.max_sentences, "first_sentence": options.first_sentence},
        "chunk_sentences": options.chunk_size,
        "mode": options.mode,
        "counted": "teacher-forced reference" if options.mode == "teacher" else "teacher-forced beam-search hypothesis",
        "beam": options.beam if options.mode == "beam" else None,
        "max_new_tokens": options.max_new_tokens if options.mode == "beam" else None,
        "batch_tokens": options.batch_tokens,
        "dispatch": getattr(model, "dispatch_name", options.dispatch),
        "expert_outputs": options.expert_outputs,
        "sentences": {},
        "processes": {"expert_parallel": expert_parallel, "data_parallel": data_parallel},
        "versions": versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return info


_RESUME_KEYS = (
    ("model", "config_sha256"), ("model", "router_fingerprint"), ("data", "split"), ("data", "max_sentences"),
    ("data", "first_sentence"), ("mode",), ("beam",), ("max_new_tokens",), ("expert_outputs",), ("chunk_sentences",),
)
_RESUME_DEFAULTS: dict[tuple[str, ...], Any] = {("data", "first_sentence"): 0}
"""What a file from before an option was collected with (no key in its info)."""


def check_resumable(previous: dict[str, Any], current: dict[str, Any], *, path: Path) -> None:
    """Refuse to add counters to a file collected with other settings (another model, split, mode, beam ...)."""
    infos = previous.get("merged_from", [previous])
    for info in infos:
        diffs = []
        for keys in _RESUME_KEYS:
            old, new = _dig(info, keys), _dig(current, keys)
            if keys == ("expert_outputs",):  # files from before the option have no key: collected without
                old, new = bool(old), bool(new)
            if old is None:
                old = _RESUME_DEFAULTS.get(keys)
            if old != new:
                diffs.append(f"{'.'.join(keys)}: file {old!r}, this run {new!r}")
        if diffs:
            raise StatsError(
                f"--resume: {path} was collected with other settings ({'; '.join(diffs)}); "
                f"write to another --out (and merge later with nllb-prune merge-stats) or drop --resume"
            )


def _dig(info: dict[str, Any], keys: tuple[str, ...]) -> Any:
    value: Any = info
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


# ---- running batches ----------------------------------------------------------------------------
@dataclass
class Decoding:
    """Settings of one direction's forward passes."""

    mode: str
    beam: int
    max_new_tokens: int
    start_id: int
    pad_id: int
    eos_id: int
    tgt_id: int
    synced: bool = False
    """Keep every process stepping until all finished (expert parallelism: every step exchanges tokens)."""


def run_batch(model: Any, collector: RoutingCollector, batch: Batch, decoding: Decoding, *, count: bool = True) -> None:
    """Forward ``batch`` (teacher forcing, or beam search then teacher forcing of the hypothesis) for its routing."""
    device = model.device
    input_ids, attention_mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    labels = batch.labels
    if decoding.mode == "beam":
        with collector.paused():
            sequences = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                num_beams=decoding.beam,
                max_new_tokens=decoding.max_new_tokens,
                forced_bos_token_id=decoding.tgt_id,
                do_sample=False,
                synced_gpus=decoding.synced,
            )
        labels = hypothesis_labels(sequences.cpu(), eos_id=decoding.eos_id)
    assert labels is not None
    decoder_ids, decoder_mask = decoder_inputs(labels, start_id=decoding.start_id, pad_id=decoding.pad_id)
    previous = collector.enabled
    collector.enabled = count
    try:
        # the encoder-decoder stacks only: routing needs no output projection (a [tokens, vocab] product and
        # tensor, 256,206 x 2048 per token at NLLB-200's size)
        model.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_ids.to(device),
            decoder_attention_mask=decoder_mask.to(device),
            use_cache=False,
        )
    finally:
        collector.enabled = previous


def placeholder_batch(decoding: Decoding, *, src_id: int) -> Batch:
    """A one-token batch run (and not counted) by a process with no work left at a step (expert parallelism)."""
    ids = torch.tensor([[src_id, decoding.eos_id]])
    return Batch(ids, torch.ones_like(ids), [[decoding.tgt_id, decoding.eos_id]], [])


# ---- the whole collection ----------------------------------------------------------------------
def collect_statistics(options: StatsOptions) -> Path:
    """Collect every asked direction into ``options.out`` (one process, or every process of torchrun).

    The file is written atomically after each direction (each round of directions when several
    processes share the work), so an interruption loses at most the running one; ``--resume`` skips
    the directions the file holds, after checking that it was collected on the same FLORES files.
    Rank 0 holds ``--out``'s lock (:mod:`pruning.locking`) from before the model loads to the end.
    """
    from pruning.data.flores import FloresDir
    from pruning.locking import claim_output
    from pruning.stats import distributed
    from pruning.stats.provenance import check_same_data, data_fingerprint, record_data

    options.validate()
    distributed.check_launch(options.expert_parallel)
    flores = FloresDir(options.data)
    check_languages(options, flores)
    out = Path(options.out)
    ctx = distributed.setup(expert_parallel=options.expert_parallel, device=options.device)
    held: dict[str, Any] = {}  # rank 0 only: the statistics being written
    claim = contextlib.ExitStack()  # rank 0 only: --out's lock

    def check_out() -> None:
        claim.enter_context(claim_output(out, command="stats"))
        held["previous"] = _previous(out, resume=options.resume)
        held["files"] = data_fingerprint(flores, split=options.split, languages=options.languages())
        if held["previous"] is not None:
            check_same_data(held["previous"].info, held["files"], data_dir=options.data, path=out)

    with claim, contextlib.closing(ctx):  # on any failure: the process group closes, then the lock is released
        ctx.agree(check_out)
        model = _load(options, ctx)
        tokenizer = model.tokenizer
        if tokenizer is None:
            raise StatsError(f"{options.model}: no tokenizer found beside the weights (sentencepiece.bpe.model or tokenizer files)")
        check_tokenizer_languages(tokenizer, options.languages())
        info = collection_info(options, model, expert_parallel=ctx.ep_size, data_parallel=ctx.dp_size, data_root=flores.root)

        def start() -> list[str]:
            info["data"]["files"] = dict(held["files"])
            held["stats"] = _start_stats(held.get("previous"), info, model, out)
            record_data(held["stats"].info, held["files"])
            return held["stats"].directions

        done = set(ctx.agree(start))  # every process learns which directions to skip, not the counters
        todo = [d for d in options.directions() if d not in done]
        collector = RoutingCollector(model, num_experts=model.topology.num_experts, expert_outputs=options.expert_outputs)
        try:
            _collect_rounds(options, ctx, model, collector, flores, todo, held.get("stats"), out)
        finally:
            collector.close()
    return out


def _previous(out: Path, *, resume: bool) -> Optional[RoutingStats]:
    if out.exists() and not resume:
        raise StatsError(f"{out} exists: pass --resume to continue it, or choose another --out")
    return RoutingStats.load(out) if out.exists() else None


def _start_stats(previous: Optional[RoutingStats], info: dict[str, Any], model: Any, out: Path) -> RoutingStats:
    if previous is None:
        return RoutingStats(model.topology, {}, info)
    model.topology.check_same_routing(previous.topology, what=str(out))
    check_resumable(previous.info, info, path=out)
    previous.info.setdefault("sentences", {})
    return previous


def _load(options: StatsOptions, ctx: Any) -> Any:
    from pruning.model.loading import load_model

    if ctx.ep_size > 1:
        from pruning.model.expert_parallel import load_expert_parallel_model

        return load_expert_parallel_model(
            options.model, group=ctx.ep_group, device=ctx.device, dtype=options.dtype, dispatch=options.dispatch,
            progress=options.progress and ctx.is_main,
        )
    return load_model(options.model, ctx.device, options.dtype, dispatch=options.dispatch, progress=options.progress and ctx.is_main)


def _collect_rounds(
    options: StatsOptions, ctx: Any, model: Any, collector: RoutingCollector, flores: Any,
    todo: list[str], stats: Optional[RoutingStats], out: Path,
) -> None:
    from tqdm.auto import tqdm

    tokenizer = model.tokenizer
    show = options.progress and ctx.is_main
    layout = chunk_layout(collector) if options.chunk_size else None
    chunk_ids = options.chunk_ids(flores.num_lines(options.split)) if options.chunk_size else range(0)
    tail = num_chunk_values(layout, len(chunk_ids)) if layout is not None else 0  # chunk values after the counters
    peaks = collector.peak_positions()  # the layout of flat() is fixed: find the max-merged positions once
    bar = tqdm(total=len(todo), desc="directions", unit="dir", disable=not show)
    for start in range(0, len(todo), ctx.dp_size):
        round_dirs = todo[start : start + ctx.dp_size]  # one direction per data-parallel group
        mine = round_dirs[ctx.dp_rank] if ctx.dp_rank < len(round_dirs) else None
        bar.set_postfix_str(", ".join(round_dirs) if len(round_dirs) > 1 else round_dirs[0])
        flat = _run_direction(options, ctx, model, collector, flores, tokenizer, mine, show=show)
        # [len(round), counters + 1 sentence count (+ chunk table and sentences per chunk)]: each group
        # writes its own row; the sum holds them all
        table = flat.new_zeros(len(round_dirs), flat.shape[0])
        if mine is not None:
            table[ctx.dp_rank] = flat
        table = reduce_counters(ctx, table, peaks=peaks)
        if ctx.is_main:
            assert stats is not None
            for direction, row in zip(round_dirs, table):
                counters = collector.unflatten(row[: row.shape[0] - tail - 1])
                if layout is not None:
                    chunks = chunks_from_flat(layout, row[row.shape[0] - tail :], ids=chunk_ids)
                    for side in chunks.counters:
                        counters[side].update(chunks.totals(side))  # exactly the sum of the chunks
                    stats.add_chunks(direction, chunks, chunk_sentences=int(options.chunk_size or 0), what=str(out))
                for side, named in counters.items():
                    for name, value in named.items():
                        stats.add(direction, side, name, value)
                stats.info.setdefault("sentences", {})[direction] = int(row[row.shape[0] - tail - 1])
            stats.info["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            stats.save(out)
        bar.update(len(round_dirs))
    bar.close()


def reduce_counters(ctx: Any, table: torch.Tensor, *, peaks: torch.Tensor) -> torch.Tensor:
    """``table`` [rows, flat] summed over every process, except at ``peaks`` [M] (``max_abs``,
    :meth:`RoutingCollector.peak_positions`): their maximum (expert-parallel ranks share a direction)."""
    peaks = peaks.to(table.device)
    if len(peaks):
        highest = ctx.all_reduce_peak(table[:, peaks].contiguous())
    table = ctx.all_reduce_sum(table)
    if len(peaks):
        table[:, peaks] = highest.to(table.device)
    return table


def _run_direction(
    options: StatsOptions, ctx: Any, model: Any, collector: RoutingCollector, flores: Any, tokenizer: Any,
    direction: Optional[str], *, show: bool,
) -> torch.Tensor:
    """This process's counters for ``direction`` (None: only keep step with the others), flat, + sentences
    (+ with ``--chunk-sentences``: the chunk table and sentences per chunk, :meth:`ChunkTable.flat`)."""
    from tqdm.auto import tqdm

    config = model.config
    batches: list[Batch] = []
    src, tgt = split_direction(direction) if direction else (None, None)
    if direction is not None:
        batches = _direction_batches(options, flores, tokenizer, src=src, tgt=tgt, pad_id=config.pad_token_id)
    mine = batches[ctx.ep_rank :: ctx.ep_size]  # expert-parallel ranks share the direction's batches
    # expert parallelism: every forward exchanges tokens, so every process runs the same number of steps
    # (over the whole world: beam search keeps all processes stepping together, see Decoding.synced)
    steps = ctx.all_reduce_max(len(mine)) if ctx.ep_size > 1 else len(mine)
    any_lang = options.languages()[0]
    decoding = Decoding(
        mode=options.mode, beam=options.beam, max_new_tokens=options.max_new_tokens,
        start_id=config.decoder_start_token_id, pad_id=config.pad_token_id, eos_id=config.eos_token_id,
        tgt_id=tokenizer.convert_tokens_to_ids(tgt or any_lang), synced=ctx.ep_size > 1,
    )
    _route_direction(model, src, tgt)
    collector.reset()
    chunks = _chunk_table(options, collector, flores)
    sentences = 0
    with torch.no_grad():
        for step in tqdm(range(steps), desc=direction or "waiting", unit="batch", leave=False, disable=not show):
            if step < len(mine):
                run_batch(model, collector, mine[step], decoding)
                sentences += len(mine[step].sentences)
                if chunks is not None:
                    chunks.take_batch(collector, mine[step].sentences)
            else:  # no batch left here: run a placeholder so that the expert exchanges stay in step
                placeholder = placeholder_batch(decoding, src_id=tokenizer.convert_tokens_to_ids(src or any_lang))
                run_batch(model, collector, placeholder, decoding, count=False)
    if chunks is not None:
        total = chunks.flat()
        flat = total[: chunks.layout.size]
        return torch.cat([flat, flat.new_tensor([float(sentences)]), total[chunks.layout.size :]])
    flat = collector.flat()
    collector.reset()
    return torch.cat([flat, flat.new_tensor([float(sentences)])])


def _chunk_table(options: StatsOptions, collector: RoutingCollector, flores: Any) -> Optional[ChunkTable]:
    """An empty per-chunk table for one direction (every direction has the same chunks), or None without chunking."""
    if not options.chunk_size:
        return None
    ids = options.chunk_ids(flores.num_lines(options.split))
    device = collector.flat().device
    return ChunkTable(chunk_layout(collector), first_chunk=ids.start, num_chunks=len(ids), chunk_sentences=options.chunk_size, device=device)


def _route_direction(model: Any, src: Optional[str], tgt: Optional[str]) -> None:
    """A pruned export serving several directions routes each over its own experts (its manifest)."""
    if getattr(model, "manifest", None) and hasattr(model, "set_direction"):
        model.set_direction(src, tgt)


def _direction_batches(options: StatsOptions, flores: Any, tokenizer: Any, *, src: str, tgt: str, pad_id: int) -> list[Batch]:
    lines = options.lines(flores.num_lines(options.split))
    sources = flores.read(src, options.split)[lines.start : lines.stop]
    targets = flores.read(tgt, options.split)[lines.start : lines.stop] if options.mode == "teacher" else None
    source_ids = encode(tokenizer, sources, lang=src, target=False)
    label_ids = encode(tokenizer, targets, lang=tgt, target=True) if targets is not None else None
    return make_batches(
        source_ids, label_ids, batch_tokens=options.batch_tokens, pad_id=pad_id, first_line=lines.start, chunk_sentences=options.chunk_size
    )

