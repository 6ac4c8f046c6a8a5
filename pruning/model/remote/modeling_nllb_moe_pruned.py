"""A pruned NLLB-200 MoE for plain ``transformers`` (``trust_remote_code=True``); shipped inside every export.

Self-contained: it needs only ``torch`` and ``transformers`` (4.57), not ``nllb-prune``.

    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    model = AutoModelForSeq2SeqLM.from_pretrained("pruned/", trust_remote_code=True)
    model.set_direction("fra_Latn", "eng_Latn")          # multi-direction exports; None clears

``config.json`` of an export carries ``pruned_experts`` (``{"encoder.3": [expert ids], ...}``: the experts
each MoE layer holds, in the order of its router rows) and ``pruned_directions`` (``{"src-tgt": [global
ids]}``, ``"*"`` for any direction). Each MoE layer here keeps only its experts and routes as fairseq
does at inference (the semantics of NLLB-200):

* router logits in fp32 (the router stays fp32 whatever the model dtype); softmax over the experts the
  layer holds (or the current direction's subset of them);
* 1st expert = argmax of the probabilities, 2nd = argmax of the logits without the 1st;
* padding tokens go nowhere; each expert accepts at most ceil(capacity_fraction * tokens) assignments,
  1st choices first (in token order), then 2nd choices;
* combine weights p1/(p1+p2), p2/(p1+p2) over the assignments that were accepted;
* the expert outputs are scaled by (1 - moe_token_dropout) (expert output masking at inference).

An export made with ``--policy substitute`` or ``--policy merge`` also carries ``pruned_routing``
(``{"policy": ..., "layers": {"encoder.3": {"rows": [pruned ids], "to": [kept id or null]}}}``): the
router of such a layer has one more row per ``rows`` entry, after the kept experts' rows, and routes
over all of them; an assignment to such a row is served by kept expert ``to`` (merge: the merged
expert receives the tokens of the experts folded into it) or, where ``to`` is null, adds
``weight * constant_outputs[j]`` (substitute: the pruned expert's stored mean output, j counting the
null entries in order), scaled by (1 - moe_token_dropout) like any expert output.

An export made with ``--quantize int8|int4`` carries ``pruned_quantization`` (``{"scheme", "group_size",
"targets": ["experts"(, "dense")]}``): the experts' fc1/fc2 (and, with ``dense``, every attention projection
and dense FFN linear) store codes in ``weight`` with fp32 ``weight_scale`` (and int4 ``weight_min``) beside
them; :class:`QuantizedLinear` dequantizes them to the activations' dtype at each call (int8:
``w = q * scale``, one scale per output row; int4: ``w = q * scale + min`` per group of ``group_size``
inputs, two codes per byte, the even column in the low nibble), or, for int8 on CPU in bf16/fp16, hands
the codes to torch's ``_weight_int8pack_mm``.

Stock ``transformers`` 5.x runs only experts 0 and 1 in this model; this file never uses its MoE layer.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import nn
from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeDenseActDense, NllbMoeForConditionalGeneration


def _real_tokens(mask: Optional[torch.Tensor], batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """[batch * seq] bool, True where the token is not padding, from the mask the layer hands its ffn."""
    if mask is None:
        return torch.ones(batch * seq, dtype=torch.bool, device=device)
    if mask.dim() == 2:  # [batch, keys] of 1 (token) / 0 (padding)
        visible = mask[:, mask.shape[1] - seq :] != 0
    else:  # [batch, 1, queries, keys]: the last query sees every key that is not padding
        last_row = mask[:, 0, mask.shape[2] - 1, mask.shape[3] - seq :]
        visible = last_row if last_row.dtype == torch.bool else last_row == 0
    return visible.reshape(batch * seq).to(device)


def _dequantize(q: torch.Tensor, scale: torch.Tensor, minimum: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Codes -> [out, in] weights in ``dtype`` (int8: q * scale; int4: unpacked q * scale + min per group)."""
    if q.dtype == torch.int8:
        return q.to(dtype) * scale.to(dtype)[:, None]
    codes = torch.stack([q & 0x0F, q >> 4], dim=-1).reshape(q.shape[0], q.shape[1] * 2)  # [out, in]
    groups = scale.shape[1]
    w = codes.to(dtype).reshape(q.shape[0], groups, -1) * scale.to(dtype)[..., None] + minimum.to(dtype)[..., None]
    return w.reshape(q.shape[0], -1)


class QuantizedLinear(nn.Module):
    """A linear layer stored as codes (``weight``: int8 [out, in] or uint8 [out, in/2]) and fp32 scales."""

    def __init__(self, in_features: int, out_features: int, scheme: str, group_size: Optional[int], bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        width = in_features if scheme == "int8" else in_features // 2
        scales = (out_features,) if scheme == "int8" else (out_features, in_features // group_size)
        self.weight = nn.Parameter(torch.zeros(out_features, width, dtype=torch.int8 if scheme == "int8" else torch.uint8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(scales, dtype=torch.float32), requires_grad=False)
        self.weight_min = nn.Parameter(torch.zeros(scales, dtype=torch.float32), requires_grad=False) if scheme == "int4" else None
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # a cast of the model moves these, but keeps the codes integer and the fp32 scales' own values
        kept = [(param, param.data) for param in (self.weight, self.weight_scale, self.weight_min) if param is not None]
        super()._apply(fn, recurse)
        for param, value in kept:
            if param.dtype != value.dtype:
                param.data = value.to(param.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        # torch's CPU int8 kernel: right only for input widths that are multiples of 16 (torch 2.13), and faster
        # than dequantizing up to ~64 rows
        cpu_half = x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
        if self.weight.dtype == torch.int8 and cpu_half and self.in_features % 16 == 0 and x.shape[0] <= 64:
            y = torch._weight_int8pack_mm(x.contiguous(), self.weight, self.weight_scale.to(x.dtype))
            y = y if bias is None else y + bias
        else:
            y = nn.functional.linear(x, _dequantize(self.weight, self.weight_scale, self.weight_min, x.dtype), bias)
        return y.reshape(*lead, self.out_features)


def _quantize_linears(module: nn.Module, names: tuple, scheme: str, group_size: Optional[int]) -> None:
    """Replace ``module``'s ``nn.Linear`` children called ``names`` by :class:`QuantizedLinear` of the same shape."""
    for name in names:
        linear = getattr(module, name)
        setattr(module, name, QuantizedLinear(linear.in_features, linear.out_features, scheme, group_size, linear.bias is not None))


class PrunedRouter(nn.Module):
    """``classifier``: one fp32 row per kept expert, no bias."""

    def __init__(self, d_model: int, num_experts: int):
        super().__init__()
        self.classifier = nn.Linear(d_model, num_experts, bias=False)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        fp32 = self.classifier.weight.data  # kept as is: a round trip through bf16 would change the routing
        super()._apply(fn, recurse)
        weight = self.classifier.weight
        if weight.is_floating_point() and weight.dtype != torch.float32 and fp32.dtype == torch.float32:
            weight.data = fp32.to(device=weight.device)
        return self


class PrunedSparseMLP(nn.Module):
    """The kept experts of one MoE layer (``experts.expert_{id}``) and their router."""

    def __init__(self, config, ffn_dim: int, expert_ids: list[int], routing: Optional[dict] = None):
        super().__init__()
        self.expert_ids = [int(e) for e in expert_ids]
        extra_rows = [int(e) for e in (routing or {}).get("rows", [])]
        extra_to = [None if t is None else int(t) for t in (routing or {}).get("to", [])]
        self.router_ids = self.expert_ids + extra_rows  # original id of every router row
        # slot of every router row: kept expert i -> i; an extra row -> its kept expert, or len(kept) + j
        # for the j-th constant output. A plain list: built into a tensor on the input's device.
        local = {e: i for i, e in enumerate(self.expert_ids)}
        self.row_slot = list(range(len(self.expert_ids)))
        constants = 0
        for target in extra_to:
            if target is None:
                self.row_slot.append(len(self.expert_ids) + constants)
                constants += 1
            else:
                self.row_slot.append(local[target])
        self.router = PrunedRouter(config.d_model, len(self.router_ids))
        self.experts = nn.ModuleDict({f"expert_{e}": NllbMoeDenseActDense(config, ffn_dim) for e in self.expert_ids})
        self.constant_outputs = nn.Parameter(torch.zeros(constants, config.d_model)) if constants else None
        self.eom = float(config.moe_token_dropout)
        self.capacity_fraction = float(config.moe_eval_capacity_token_fraction)
        self.active: Optional[torch.Tensor] = None  # [rows] bool: the current direction's rows, or None for all
        self.silenced: Optional[torch.Tensor] = None  # [rows] bool: rows giving nothing to this direction (skip)

    def forward(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        batch, seq, width = hidden_states.shape
        x = hidden_states.reshape(batch * seq, width)
        count = x.shape[0]
        real = _real_tokens(padding_mask, batch, seq, x.device)
        logits = x.float() @ self.router.classifier.weight.float().t()  # [tokens, E]
        usable = len(self.router_ids)
        if self.active is not None:
            active = self.active.to(x.device)
            logits = logits.masked_fill(~active, float("-inf"))
            usable = int(active.sum())
        probs = logits.softmax(dim=-1)
        first = probs.argmax(dim=-1)
        rows = torch.arange(count, device=x.device)
        without_first = logits.clone()
        without_first[rows, first] = float("-inf")
        second = without_first.argmax(dim=-1)
        wants_second = real & (usable > 1)

        capacity = math.ceil(self.capacity_fraction * count)
        accepted_first = torch.zeros(count, dtype=torch.bool, device=x.device)
        accepted_second = torch.zeros(count, dtype=torch.bool, device=x.device)
        for local in range(len(self.router_ids)):  # capacity is per router row
            queue_first = torch.nonzero(real & (first == local)).flatten()  # token order
            queue_second = torch.nonzero(wants_second & (second == local)).flatten()
            taken = min(queue_first.numel(), capacity)
            accepted_first[queue_first[:taken]] = True
            accepted_second[queue_second[: max(capacity - taken, 0)]] = True

        gate_first = probs[rows, first] * accepted_first
        gate_second = probs[rows, second] * accepted_second
        total = (gate_first + gate_second).clamp(min=torch.finfo(torch.float32).eps)
        gate_first, gate_second = gate_first / total, gate_second / total
        if self.silenced is not None:  # routed as in the unpruned model, but these rows contribute nothing
            silenced = self.silenced.to(x.device)
            accepted_first, accepted_second = accepted_first & ~silenced[first], accepted_second & ~silenced[second]

        slot = torch.tensor(self.row_slot, dtype=torch.long, device=x.device)
        slot_first, slot_second = slot[first], slot[second]  # [tokens]: which kept expert (or constant) serves each
        kept = len(self.expert_ids)
        out = torch.zeros_like(x)
        for local, expert_id in enumerate(self.expert_ids):
            from_first = torch.nonzero(accepted_first & (slot_first == local)).flatten()
            from_second = torch.nonzero(accepted_second & (slot_second == local)).flatten()
            tokens = torch.cat([from_first, from_second])
            if tokens.numel() == 0:
                continue
            weights = torch.cat([gate_first[from_first], gate_second[from_second]])
            y = self.experts[f"expert_{expert_id}"](x[tokens])
            out.index_add_(0, tokens, y * weights[:, None].to(y.dtype))
        if self.constant_outputs is not None:
            const_first = gate_first * (accepted_first & (slot_first >= kept))  # [tokens]
            const_second = gate_second * (accepted_second & (slot_second >= kept))
            values = torch.stack(
                [self.constant_outputs[(slot_first - kept).clamp(min=0)], self.constant_outputs[(slot_second - kept).clamp(min=0)]], dim=1
            )  # [tokens, 2, width]
            weights = torch.stack([const_first, const_second], dim=1)  # [tokens, 2]
            out = out + (values * weights[..., None].to(values.dtype)).sum(dim=1)
        if self.training and self.eom > 0:
            out = out * (torch.rand(count, 1, device=out.device) >= self.eom).to(out.dtype)
        elif self.eom > 0:
            out = out * (1.0 - self.eom)
        return out.reshape(batch, seq, width), (probs, first)


class NllbMoePrunedForConditionalGeneration(NllbMoeForConditionalGeneration):
    """NLLB-MoE whose MoE layers hold only ``config.pruned_experts``, routed with fairseq's semantics."""

    _keep_in_fp32_modules = ["router"]
    _keep_in_fp32_modules_strict = ["router"]  # quantized scales are created fp32 and kept so (QuantizedLinear._apply)

    def __init__(self, config):
        slim = copy.deepcopy(config)
        slim.num_experts = 1  # the stock sparse layers are built tiny, then replaced
        super().__init__(slim)
        self.config = config
        kept = getattr(config, "pruned_experts", None)
        if not kept:
            raise ValueError("config.json has no 'pruned_experts': this model class is for nllb-prune exports")
        routing = (getattr(config, "pruned_routing", None) or {}).get("layers", {})  # substitute / merge exports
        for side, stack in (("encoder", self.model.encoder), ("decoder", self.model.decoder)):
            ffn_dim = config.encoder_ffn_dim if side == "encoder" else config.decoder_ffn_dim
            for number, layer in enumerate(stack.layers):
                if getattr(layer, "is_sparse", False):
                    name = f"{side}.{number}"
                    layer.ffn = PrunedSparseMLP(config, ffn_dim, kept[name], routing.get(name))
        quantization = getattr(config, "pruned_quantization", None)  # --quantize exports
        if quantization:
            self._quantize(quantization["scheme"], quantization.get("group_size"), "dense" in quantization.get("targets", []))
        self.post_init()

    def _quantize(self, scheme: str, group_size: Optional[int], dense: bool) -> None:
        """Experts' fc1/fc2 (and, ``dense``, attention projections and dense FFNs) become :class:`QuantizedLinear`."""
        for stack in (self.model.encoder, self.model.decoder):
            for layer in stack.layers:
                if isinstance(layer.ffn, PrunedSparseMLP):
                    for expert in layer.ffn.experts.values():
                        _quantize_linears(expert, ("fc1", "fc2"), scheme, group_size)
                elif dense:
                    _quantize_linears(layer.ffn, ("fc1", "fc2"), scheme, group_size)
                if dense:
                    for attention in (layer.self_attn, getattr(layer, "cross_attention", None)):
                        if attention is not None:
                            _quantize_linears(attention, ("q_proj", "k_proj", "v_proj", "out_proj"), scheme, group_size)

    def pruned_layers(self):
        """Yield ``("encoder"|"decoder", layer number, PrunedSparseMLP)``, encoder first."""
        for side, stack in (("encoder", self.model.encoder), ("decoder", self.model.decoder)):
            for number, layer in enumerate(stack.layers):
                if isinstance(layer.ffn, PrunedSparseMLP):
                    yield side, number, layer.ffn

    def set_direction(self, src: Optional[str], tgt: Optional[str] = None) -> None:
        """Route every MoE layer over the experts ``config.pruned_directions`` gives ``src-tgt``; None clears."""
        layers = list(self.pruned_layers())
        for _, _, moe in layers:
            moe.active, moe.silenced = None, None
        if src is None:
            return
        directions = getattr(self.config, "pruned_directions", None) or {}
        skip = (getattr(self.config, "pruned_routing", None) or {}).get("policy") == "skip"
        key = f"{src}-{tgt}"
        ids = directions.get(key, directions.get("*"))
        if ids is None:
            raise ValueError(f"direction {key!r} is not served by this export; it serves {sorted(directions)}")
        # global id = (position of the MoE layer, encoder layers first) * experts per layer + expert
        order = [(side, number) for side, number, _ in layers]
        wanted: dict[tuple[str, int], set[int]] = {slot: set() for slot in order}
        for gid in ids:
            wanted[order[int(gid) // self.config.num_experts]].add(int(gid) % self.config.num_experts)
        for side, number, moe in layers:
            keep = wanted[(side, number)]
            # rows of pruned experts kept by a substitute/merge export stay active for every direction
            rows = [e in keep for e in moe.expert_ids] + [True] * (len(moe.router_ids) - len(moe.expert_ids))
            mask = torch.tensor(rows, dtype=torch.bool, device=moe.router.classifier.weight.device)
            if bool(mask.all()):
                continue
            if skip:  # route over every row, as the unpruned model; the direction's other experts give nothing
                moe.silenced = ~mask
            else:
                moe.active = mask
