"""Routing counters of MoE layer calls, accumulated by forward hooks (:class:`RoutingCollector`).

Dimension legend: T tokens routed by one layer call, R router rows of the layer (its kept experts),
E experts of the unpruned layer, C = 6 per-expert counters (:data:`ROW_COUNTERS`), Ls MoE layers of a side.

Counters are computed in the hook with a few vectorised ops per layer call and accumulated on the
model's device in float64; they move to the CPU once per direction (:meth:`RoutingCollector.take`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from pruning.data.directions import SHORT_SIDE
from pruning.model.moe import MoeLayer, Routing
from pruning.stats.counters import BASE_COUNTERS, MAX_COUNTERS
from pruning.stats.outputs import GATE_RATIO_BINS, GATE_RATIO_HIST, OUTPUT_COUNTERS, gate_ratio_histogram, output_counters, tap_dispatch

ROW_COUNTERS = ("top1", "top2", "gate", "conf1", "conf2", "rank")
"""The per-expert counters, in the row order of the accumulators ([Ls, C, E]); ``tokens`` is kept apart."""
assert set(ROW_COUNTERS) | {"tokens"} == set(BASE_COUNTERS)


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
