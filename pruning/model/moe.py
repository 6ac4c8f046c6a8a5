"""The NLLB-MoE expert layer, with fairseq's eval-time routing semantics.

Dimension legend: B batch, S sequence, T = B*S tokens, E experts kept in this layer, D d_model,
F ffn width, K = 2 choices per token.

Routing (fairseq ``top2gating``, eval mode; reference page section 2):
- logits = x @ wg.T in fp32; probs = softmax over the layer's (kept, active) experts;
- 1st choice = argmax(probs); 2nd = argmax of the logits with the 1st masked out;
- padding tokens are routed nowhere and take no capacity;
- capacity = ceil(capacity_fraction * T); positions: 1st choices in token order, then 2nd choices;
- combine weights g1/(g1+g2), g2/(g1+g2) computed AFTER capacity dropping;
- output = sum_k weight_k * (1 - eom) * expert_k(x)   (expert output masking at inference).

The router decides and returns a :class:`Routing` (data, no state on ``self``); the dispatch turns
``(x, routing)`` into the output. Statistics collection observes the routing through a forward hook.

Pruned-expert policies (``nllb-prune export --policy skip|substitute|merge``; ``drop`` is the paper's and
needs nothing here): a layer may keep router rows of pruned experts, after the rows of its kept
experts (R router rows >= E experts with weights). :class:`ExtraRows` says what serves each extra
row: a kept expert (``merge``: the expert the pruned one was folded into) or a stored constant output
vector (``substitute``: the pruned expert's mean output). The router and the :class:`Routing` it
returns (what statistics hooks see: R rows, original expert ids) are unchanged; the layer maps router
rows to *slots* (``row_slot`` [R]: slots 0..E-1 are the experts, slots E..E+P-1 the P constant
vectors), hands the dispatch a routing over slots without the constant assignments, and adds
``weight * constant`` for those. A layer without extra rows runs exactly the code it always ran.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

TOP_K = 2


@dataclass
class Routing:
    """What the router decided for T tokens."""

    logits: torch.Tensor
    """[T, E] fp32 router logits (inactive experts at -inf)."""
    probs: torch.Tensor
    """[T, E] fp32 softmax gate probabilities over the layer's active experts."""
    expert_idx: torch.Tensor
    """[T, K] long: local indices (rows of this layer's router) of the 1st and 2nd choice."""
    weights: torch.Tensor
    """[T, K] fp32 combine weights after capacity dropping (0 where not dispatched)."""
    dispatched: torch.Tensor
    """[T, K] bool: the assignment survived padding and capacity."""
    token_mask: torch.Tensor
    """[T] bool: True for real (non-padding) tokens."""
    expert_ids: torch.Tensor
    """[E] long: the original expert index (0..127 in NLLB-200) of each local expert."""


class Router(nn.Module):
    """``wg``: one fp32 row per kept expert, no bias. Routing runs in fp32 whatever the model dtype."""

    expert_ids: torch.Tensor
    """[R] long buffer: the original index of every router row."""

    def __init__(self, *, d_model: int, expert_ids: Sequence[int], capacity_fraction: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(len(expert_ids), d_model, dtype=torch.float32))
        self.register_buffer("expert_ids", torch.tensor(list(expert_ids), dtype=torch.long), persistent=False)
        self.capacity_fraction = capacity_fraction
        # [E] bool or None: experts a direction may use (multi-direction exports); set between calls.
        self.active: Optional[torch.Tensor] = None

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # Keep the router in fp32 when the model is cast to bf16/fp16: routing must not change with dtype.
        # The fp32 values are kept (moved to the new device), not the cast ones cast back: a round trip
        # through bf16 would change the router's decisions.
        fp32 = self.weight.data
        super()._apply(fn, recurse)
        if self.weight.is_floating_point() and self.weight.dtype != torch.float32 and fp32.dtype == torch.float32:
            self.weight.data = fp32.to(device=self.weight.device)
        return self

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor) -> Routing:
        """x: [T, D]; token_mask: [T] bool (True = real token)."""
        num_tokens = x.shape[0]
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        if self.active is not None:
            logits = logits.masked_fill(~self.active.to(logits.device), float("-inf"))
        probs = torch.softmax(logits, dim=-1)  # [T, E]
        top1 = probs.argmax(dim=-1)  # [T]
        if self.num_experts > 1:
            top2 = logits.scatter(1, top1[:, None], float("-inf")).argmax(dim=-1)  # [T]
        else:
            top2 = top1
        expert_idx = torch.stack([top1, top2], dim=1)  # [T, K]
        chosen = token_mask[:, None].expand(-1, TOP_K).clone()  # [T, K]
        if self.num_experts == 1:
            chosen[:, 1] = False
        if self.active is not None and int(self.active.sum()) < 2:
            chosen[:, 1] = False
        capacity = math.ceil(self.capacity_fraction * num_tokens)
        dispatched = chosen & (_positions(expert_idx, chosen, self.num_experts) < capacity)
        gates = probs.gather(1, expert_idx) * dispatched  # [T, K]
        denom = gates.sum(dim=1, keepdim=True).clamp(min=torch.finfo(gates.dtype).eps)
        return Routing(
            logits=logits,
            probs=probs,
            expert_idx=expert_idx,
            weights=gates / denom,
            dispatched=dispatched,
            token_mask=token_mask,
            expert_ids=self.expert_ids,
        )


def _positions(expert_idx: torch.Tensor, chosen: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, K] position of each assignment in its expert's queue: all 1st choices, then all 2nd."""
    one_hot = F.one_hot(expert_idx, num_experts) * chosen[..., None]  # [T, K, E]
    first = one_hot[:, 0].cumsum(0) - 1  # [T, E]
    second = one_hot[:, 1].cumsum(0) - 1 + one_hot[:, 0].sum(0, keepdim=True)  # [T, E]
    pos1 = first.gather(1, expert_idx[:, :1])
    pos2 = second.gather(1, expert_idx[:, 1:])
    return torch.cat([pos1, pos2], dim=1)  # [T, K]


class StackedExperts(nn.Module):
    """E feed-forward experts stored stacked, ready for a grouped GEMM.

    fc1_weight [E, F, D], fc1_bias [E, F], fc2_weight [E, D, F], fc2_bias [E, D]; ReLU in between.
    """

    def __init__(self, *, num_experts: int, d_model: int, ffn_dim: int):
        super().__init__()
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, ffn_dim, d_model))
        self.fc1_bias = nn.Parameter(torch.empty(num_experts, ffn_dim))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, d_model, ffn_dim))
        self.fc2_bias = nn.Parameter(torch.empty(num_experts, d_model))

    @property
    def num_experts(self) -> int:
        return self.fc1_weight.shape[0]

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """x: [N, D] -> [N, D] through expert ``e`` (local index)."""
        h = F.relu(F.linear(x, self.fc1_weight[e], self.fc1_bias[e]))  # [N, F]
        return F.linear(h, self.fc2_weight[e], self.fc2_bias[e])  # [N, D]


Dispatch = Callable[..., torch.Tensor]
"""``dispatch(x [T, D], routing, experts[, observe]) -> [T, D]``: the weighted sum of the experts' outputs."""
Observer = Callable[[Routing, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""``observe(routing, expert [N] local row, token [N], k [N] choice, y [N, D])``: each dispatched assignment's
raw expert output (before the combine weight), sorted by expert with token order kept within an expert.
Dispatches that accept it hand statistics the outputs they compute anyway (``stats --expert-outputs``)."""


@dataclass(frozen=True)
class ExtraRows:
    """Router rows of pruned experts kept for routing only, in router order after the kept experts' rows.

    ``ids[j]``: the original index of the pruned expert whose router row is extra row j;
    ``to[j]``: the original index of the kept expert that serves that row's assignments (``merge``),
    or None: the assignment contributes the layer's next stored constant output (``substitute``;
    ``constant_outputs`` rows follow the None entries in order).
    """

    ids: tuple[int, ...] = ()
    to: tuple[Optional[int], ...] = ()

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.to):
            raise ValueError(f"ExtraRows: {len(self.ids)} ids but {len(self.to)} targets")

    @property
    def num_constants(self) -> int:
        return sum(t is None for t in self.to)

    def row_slots(self, expert_ids: Sequence[int]) -> list[int]:
        """Slot of every router row (kept rows first): kept row i -> i; extra rows -> target or constant."""
        local = {int(e): i for i, e in enumerate(expert_ids)}
        slots, constants = list(range(len(local))), 0
        for pruned, target in zip(self.ids, self.to):
            if pruned in local:
                raise ValueError(f"expert {pruned} has weights in this layer and cannot also be an extra router row")
            if target is None:
                slots.append(len(local) + constants)
                constants += 1
            elif target not in local:
                raise ValueError(f"extra router row of expert {pruned} is served by expert {target}, which the layer does not keep")
            else:
                slots.append(local[target])
        return slots


def sorted_loop_dispatch(x: torch.Tensor, routing: Routing, experts: StackedExperts, observe: Optional[Observer] = None) -> torch.Tensor:
    """Sort the T*K assignments by expert and run each expert once on its tokens.

    Never allocates [E, T, D]: memory is O(T*K*D). Returns the weighted sum [T, D] (before EOM scaling).
    ``observe`` (statistics) also receives every dispatched assignment's raw output, see :data:`Observer`.
    """
    flat_expert = routing.expert_idx.reshape(-1)  # [T*K]
    flat_token = torch.arange(x.shape[0], device=x.device).repeat_interleave(TOP_K)  # [T*K]
    flat_weight = routing.weights.reshape(-1)  # [T*K]
    keep = routing.dispatched.reshape(-1)
    flat_expert, flat_token, flat_weight = flat_expert[keep], flat_token[keep], flat_weight[keep]
    order = torch.argsort(flat_expert, stable=True)
    flat_expert, flat_token, flat_weight = flat_expert[order], flat_token[order], flat_weight[order]
    counts = torch.bincount(flat_expert, minlength=experts.num_experts).tolist()
    out = torch.zeros_like(x)
    raw = x.new_empty(flat_token.shape[0], x.shape[1]) if observe is not None else None  # [N, D]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tokens = flat_token[start : start + n]
        y = experts.expert_forward(e, x[tokens])  # [n, D]
        if raw is not None:
            raw[start : start + n] = y
        out.index_add_(0, tokens, y * flat_weight[start : start + n, None].to(y.dtype))
        start += n
    if observe is not None:
        flat_k = torch.arange(TOP_K, device=x.device).repeat(x.shape[0])[keep][order]  # [N]
        observe(routing, flat_expert, flat_token, flat_k, raw)
    return out


def grouped_mm_dispatch(x: torch.Tensor, routing: Routing, experts: StackedExperts, observe: Optional[Observer] = None) -> torch.Tensor:
    """All experts of the layer as two grouped GEMMs over the stacked weights; no host synchronisation.

    Every one of the T*K assignments is computed (dropped/padding ones get weight 0), so shapes never
    depend on the routing: no ``.tolist()``, no boolean indexing, CUDA-graph friendly. ``observe``
    (statistics only) receives the dispatched assignments' raw outputs (boolean indexing, so a sync).
    """
    flat_expert = routing.expert_idx.reshape(-1)  # [T*K]
    order = torch.argsort(flat_expert, stable=True)  # [T*K]
    sorted_expert = flat_expert[order]
    tokens = order // TOP_K  # [T*K] token of each sorted assignment
    weight = (routing.weights * routing.dispatched).reshape(-1)[order]  # [T*K]
    counts = torch.bincount(sorted_expert, minlength=experts.num_experts)  # [E]
    offsets = torch.cumsum(counts, 0).to(torch.int32)  # [E] group ends
    xs = x[tokens]  # [T*K, D]
    h = torch._grouped_mm(xs, experts.fc1_weight.transpose(1, 2), offs=offsets)  # [T*K, F]
    h = F.relu(h + experts.fc1_bias[sorted_expert])
    y = torch._grouped_mm(h, experts.fc2_weight.transpose(1, 2), offs=offsets)  # [T*K, D]
    y = y + experts.fc2_bias[sorted_expert]
    if observe is not None:
        dispatched = routing.dispatched.reshape(-1)[order]  # [T*K]
        observe(routing, sorted_expert[dispatched], tokens[dispatched], (order % TOP_K)[dispatched], y[dispatched])
    y = torch.where(weight[:, None] > 0, y * weight[:, None].to(y.dtype), torch.zeros((), dtype=y.dtype, device=y.device))
    out = torch.zeros_like(x)
    out.index_add_(0, tokens, y)
    return out


DISPATCHES: dict[str, Dispatch] = {"loop": sorted_loop_dispatch, "grouped": grouped_mm_dispatch}


def grouped_mm_supported(*, device: torch.device, dtype: torch.dtype, d_model: int, ffn_dim: int) -> tuple[bool, str]:
    """Whether ``torch._grouped_mm`` can run these shapes here, and why not when it cannot."""
    if not hasattr(torch, "_grouped_mm"):
        return False, f"torch {torch.__version__} has no torch._grouped_mm"
    itemsize = torch.empty((), dtype=dtype).element_size()
    if (d_model * itemsize) % 16 or (ffn_dim * itemsize) % 16:
        return False, f"rows of {d_model}/{ffn_dim} {dtype} elements are not multiples of 16 bytes"
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        if major < 9:
            return False, f"grouped GEMM needs a Hopper-class GPU (sm_90+), this is sm_{major}x"
        if dtype != torch.bfloat16:
            return False, f"grouped GEMM on CUDA needs bfloat16, the model is {dtype}"
        return True, "CUDA sm_90+ bf16"
    if device.type == "cpu":
        return True, "CPU grouped GEMM"
    return False, f"no grouped GEMM on {device.type}"


def choose_dispatch(name: str, *, device: torch.device, dtype: torch.dtype, d_model: int, ffn_dim: int) -> tuple[str, str]:
    """``auto`` -> ``grouped`` where supported, else ``loop``. Returns (name, reason)."""
    if name not in ("auto", *DISPATCHES):
        raise ValueError(f"--dispatch must be one of auto, {', '.join(DISPATCHES)}; got {name!r}")
    ok, why = grouped_mm_supported(device=device, dtype=dtype, d_model=d_model, ffn_dim=ffn_dim)
    if name == "grouped" and not ok:
        raise ValueError(f"--dispatch grouped is unavailable: {why}")
    if name == "auto":
        return ("grouped", why) if ok else ("loop", why)
    return name, why


class MoeLayer(nn.Module):
    """Router + stacked experts; replaces ``transformers``' ``NllbMoeSparseMLP`` inside each MoE layer.

    ``expert_ids`` are the original indices of the experts this layer keeps (all of them unpruned).
    ``extra_rows`` (pruned-expert policies, see the module docstring) adds router rows that no expert
    weights of their own serve. Called as HF's layer calls its ``ffn``:
    ``(hidden [B, S, D], attention_mask)`` -> ``(out, routing)``.
    """

    def __init__(
        self,
        *,
        d_model: int,
        ffn_dim: int,
        expert_ids: Sequence[int],
        eom: float = 0.2,
        capacity_fraction: float = 1.0,
        dispatch: Optional[Dispatch] = None,
        extra_rows: Optional[ExtraRows] = None,
    ):
        super().__init__()
        extra = extra_rows or ExtraRows()
        self.router = Router(d_model=d_model, expert_ids=[*expert_ids, *extra.ids], capacity_fraction=capacity_fraction)
        self.experts = StackedExperts(num_experts=len(expert_ids), d_model=d_model, ffn_dim=ffn_dim)
        self.eom = eom
        self.dispatch: Dispatch = dispatch or sorted_loop_dispatch
        self.extra_rows = extra
        # [P, D] mean outputs of the substituted experts (model dtype), or None
        if extra.num_constants:
            self.constant_outputs: Optional[nn.Parameter] = nn.Parameter(torch.empty(extra.num_constants, d_model))
        else:
            self.register_parameter("constant_outputs", None)
        # [R] long: router row -> slot (see the module docstring), or None for a plain layer
        slots = torch.tensor(extra.row_slots(expert_ids), dtype=torch.long) if extra.ids else None
        self.register_buffer("row_slot", slots, persistent=False)
        # [R] bool or None: rows whose assignments contribute nothing for the current direction (a multi-
        # direction ``skip`` export: experts of the union that the direction does not keep); set between calls
        self.silenced: Optional[torch.Tensor] = None
        # True: the layer adds nothing (the router still routes, hooks still see it): the no-expert floor
        self.no_experts = False

    @property
    def expert_ids(self) -> list[int]:
        """Original indices of the experts with weights here (router rows 0..E-1)."""
        return self.router.expert_ids.tolist()[: self.experts.num_experts]

    @property
    def router_ids(self) -> list[int]:
        """Original index of every router row: the kept experts, then the extra (pruned) rows."""
        return self.router.expert_ids.tolist()

    def forward(self, hidden: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
        batch, seq, d_model = hidden.shape
        token_mask = token_mask_from_attention(attention_mask, batch=batch, seq=seq, device=hidden.device)
        x = hidden.reshape(batch * seq, d_model)  # [T, D]
        routing = self.router(x, token_mask)
        if self.no_experts:
            return torch.zeros_like(hidden), routing
        served = routing if self.silenced is None else silence(routing, self.silenced)
        if self.row_slot is None:
            out = self.dispatch(x, served, self.experts)  # [T, D]
        else:
            out = self._slot_forward(x, served)  # [T, D]
        if self.training and self.eom > 0:
            # fairseq's expert output masking: drop a whole token's expert output, no rescaling.
            keep = torch.rand(out.shape[0], 1, device=out.device) >= self.eom
            out = out * keep.to(out.dtype)
        elif self.eom > 0:
            out = out * (1.0 - self.eom)
        return out.reshape(batch, seq, d_model), routing

    def _slot_forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:  # only when row_slot is set
        """Dispatch over slots (experts) and add the constant outputs; [T, D] before EOM scaling."""
        to_experts, constant = slot_routing(routing, self.row_slot, num_experts=self.experts.num_experts)
        out = self.dispatch(x, to_experts, self.experts)  # [T, D]
        if self.constant_outputs is None:
            return out
        slot = self.row_slot[routing.expert_idx]  # [T, K]
        weight = routing.weights * (routing.dispatched & constant)  # [T, K] fp32, 0 off the constant assignments
        values = self.constant_outputs[(slot - self.experts.num_experts).clamp(min=0)]  # [T, K, D]
        return out + (values * weight[..., None].to(values.dtype)).sum(dim=1)


def silence(routing: Routing, silenced: torch.Tensor) -> Routing:
    """``routing`` whose assignments to ``silenced`` [R] rows are not dispatched; weights unchanged (not renormalised)."""
    hit = silenced.to(routing.expert_idx.device)[routing.expert_idx]  # [T, K]
    return dataclasses.replace(routing, dispatched=routing.dispatched & ~hit)


def slot_routing(routing: Routing, row_slot: torch.Tensor, *, num_experts: int) -> tuple[Routing, torch.Tensor]:
    """The routing a dispatch over E experts sees, and [T, K] bool: the assignment goes to a constant slot.

    ``expert_idx`` become slots (constant assignments point at slot 0 and are not dispatched); the
    combine weights stay those of the router rows, so a token whose two choices share a slot gets
    (w1 + w2) x that expert's output. ``probs`` [T, E] sums the probabilities of the rows of each slot
    (``logits`` = their log), ``expert_ids`` are the kept experts' ids: an output tap sees merged rows
    as their kept expert, and never sees constant assignments.
    """
    slot = row_slot[routing.expert_idx]  # [T, K]
    constant = slot >= num_experts  # [T, K]
    # slots < E + P <= R (one constant per extra row at most): [T, R] holds them all, no host sync
    probs = torch.zeros_like(routing.probs).index_add(1, row_slot, routing.probs)[:, :num_experts]  # [T, E]
    return (
        Routing(
            logits=probs.log(),
            probs=probs,
            expert_idx=slot.masked_fill(constant, 0),
            weights=routing.weights,
            dispatched=routing.dispatched & ~constant,
            token_mask=routing.token_mask,
            expert_ids=routing.expert_ids[:num_experts],
        ),
        constant,
    )


def token_mask_from_attention(attention_mask: Optional[torch.Tensor], *, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """[B*S] bool, True for real tokens, from the mask HF hands to its layers' ``ffn``.

    Accepts None (no padding), a 2-D [B, S] 0/1 mask, or HF's 4-D additive (0 / large negative) or
    boolean mask [B, 1, Q, K]. In the 4-D case the current S tokens are the last S keys and the last
    query row sees every non-padding key (encoder: any row; decoder: the causal row of the last query).
    """
    if attention_mask is None:
        return torch.ones(batch * seq, dtype=torch.bool, device=device)
    if attention_mask.dim() == 2:
        real = attention_mask[:, -seq:].bool()
    elif attention_mask.dim() == 4:
        row = attention_mask[:, 0, -1, -seq:]  # [B, S]
        real = row if row.dtype == torch.bool else row == 0
    else:
        raise ValueError(f"attention mask must be 2-D or 4-D, got shape {tuple(attention_mask.shape)}")
    if real.shape != (batch, seq):
        raise ValueError(f"attention mask covers {tuple(real.shape)} tokens, hidden states have {(batch, seq)}")
    return real.reshape(batch * seq).to(device)
