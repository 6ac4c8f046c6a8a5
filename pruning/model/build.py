"""Put our MoE layer into ``transformers``' NLLB-MoE encoder-decoder, built on the meta device.

``transformers`` supplies attention, embeddings, masks, caching and generation; every sparse layer's
``ffn`` is replaced by :class:`pruning.model.moe.MoeLayer` holding only the experts a selection keeps.
Parameters are allocated once, at their final dtype and device, then filled tensor by tensor.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import torch
from torch import nn
from transformers import NllbMoeConfig, NllbMoeForConditionalGeneration

from pruning.data.directions import Side
from pruning.manifest import ManifestError, direction_experts, policy_name
from pruning.model.moe import DISPATCHES, ExtraRows, MoeLayer, Router, choose_dispatch
from pruning.quant import QuantSpec
from pruning.topology import Topology

ExpertSelection = dict[tuple[Side, int], list[int]]
"""(side, layer) -> sorted original indices of the experts a MoE layer keeps."""
LayerExtraRows = dict[tuple[Side, int], ExtraRows]
"""(side, layer) -> router rows of pruned experts kept for routing (``substitute`` / ``merge`` policies)."""


class NllbMoeForPruning(NllbMoeForConditionalGeneration):
    """``NllbMoeForConditionalGeneration`` whose MoE layers are ours (see :mod:`pruning.model.moe`)."""

    tokenizer: Any = None  # set by load_model when tokenizer files are found
    source_path: str = ""  # set by load_model: where the weights were read from
    source_layout: Optional[str] = None
    manifest: Optional[dict[str, Any]] = None  # an export's pruning manifest
    quantization = None  # the QuantSpec of a quantized export (pruning.quant), set by build_empty_model

    def moe_layers(self) -> Iterator[tuple[Side, int, MoeLayer]]:
        """Yield ``(side, layer, MoeLayer)`` in global order (encoder first)."""
        for side, stack in (("encoder", self.model.encoder), ("decoder", self.model.decoder)):
            for index, layer in enumerate(stack.layers):
                if isinstance(layer.ffn, MoeLayer):
                    yield side, index, layer.ffn  # type: ignore[misc]

    def moe_layer(self, side: str, layer: int) -> MoeLayer:
        stack = self.model.encoder if side == "encoder" else self.model.decoder
        ffn = stack.layers[layer].ffn
        if not isinstance(ffn, MoeLayer):
            raise KeyError(f"{side} layer {layer} is not a MoE layer")
        return ffn

    @property
    def topology(self) -> Topology:
        return Topology.from_config(self.config)

    def expert_selection(self) -> ExpertSelection:
        return {(side, layer): moe.expert_ids for side, layer, moe in self.moe_layers()}

    def extra_rows(self) -> LayerExtraRows:
        """The layers with router rows of pruned experts (a ``substitute`` / ``merge`` export); {} otherwise."""
        return {(side, layer): moe.extra_rows for side, layer, moe in self.moe_layers() if moe.extra_rows.ids}

    def set_direction(self, src: Optional[str], tgt: Optional[str] = None) -> None:
        """Route every MoE layer of ``model`` over direction ``src-tgt``'s own experts only.

        Uses ``model.manifest`` (an export's manifest, set by :func:`pruning.load_model`): each layer's
        ``router.active`` becomes a [R] bool mask over the router's rows, or None when the direction uses
        all of them. ``set_direction(None)`` clears every mask. A model without a manifest (a full
        checkpoint) is left routing over everything it holds.

        Rows of pruned experts kept by a ``skip`` / ``substitute`` / ``merge`` export (experts outside the
        union of the export's directions) stay active for every direction. An expert of the union that a
        direction does not use is masked out of its routing, as with ``drop``; under ``skip`` it is instead
        silenced (``moe.silenced``): routed to as in the unpruned model, contributing nothing, like the
        pruned experts.
        """
        layers = list(self.moe_layers())
        for _, _, moe in layers:
            moe.router.active = None
            moe.silenced = None
        if src is None:
            return
        if tgt is None:
            raise ManifestError("set_direction needs both the source and the target language (or None to clear)")
        manifest = self.manifest
        if not manifest:
            return
        skip = policy_name(manifest) == "skip"
        wanted = direction_experts(manifest, src, tgt)
        for side, layer, moe in layers:
            held = moe.expert_ids
            keep = set(wanted.get((side, layer), []))
            lacking = sorted(keep - set(held))
            if lacking:
                raise ManifestError(
                    f"the manifest gives direction {src}-{tgt} expert(s) {lacking[:10]} in {side} layer {layer}, "
                    f"which the loaded model does not hold (it holds {held[:10]}...)"
                )
            if not keep:
                raise ManifestError(f"the manifest gives direction {src}-{tgt} no expert in {side} layer {layer}")
            if keep != set(held):
                extra = len(moe.router.expert_ids) - len(held)  # rows of pruned experts (policy exports)
                mask = torch.tensor([e in keep for e in held] + [True] * extra, dtype=torch.bool, device=moe.router.weight.device)
                if skip:  # route over every row, as the unpruned model; the direction's other experts give nothing
                    moe.silenced = ~mask
                else:
                    moe.router.active = mask

    def set_no_experts(self, on: bool = True) -> None:
        """The no-expert floor: every MoE layer adds nothing to the residual stream (all expert outputs zeroed).

        Routing still runs. Pruning results stand beside this floor: on a model whose score barely drops
        here, its experts carry little and pruning comparisons prove little.
        """
        for _, _, moe in self.moe_layers():
            moe.no_experts = on

    @property
    def no_experts(self) -> bool:
        return any(moe.no_experts for _, _, moe in self.moe_layers())

    def set_dispatch(self, name: str = "auto") -> str:
        """Choose the expert dispatch of every MoE layer (``auto`` | ``grouped`` | ``loop``); returns the choice.

        Quantized experts (:mod:`pruning.model.quantized`): ``auto`` is the loop (one expert dequantized at
        a time, or torch's int8 kernel); ``grouped`` dequantizes a whole layer's experts per call.
        """
        from pruning.model.quantized import QUANTIZED_AUTO_REASON, QuantizedStackedExperts, dequantized_grouped_dispatch

        weight = self.model.shared.weight
        chosen, reason = choose_dispatch(
            name,
            device=weight.device,
            dtype=weight.dtype,
            d_model=self.config.d_model,
            ffn_dim=max(self.config.encoder_ffn_dim, self.config.decoder_ffn_dim),
        )
        quantized = any(isinstance(moe.experts, QuantizedStackedExperts) for _, _, moe in self.moe_layers())
        if quantized and name == "auto":
            chosen, reason = "loop", QUANTIZED_AUTO_REASON
        for _, _, moe in self.moe_layers():
            grouped_quantized = chosen == "grouped" and isinstance(moe.experts, QuantizedStackedExperts)
            moe.dispatch = dequantized_grouped_dispatch if grouped_quantized else DISPATCHES[chosen]
        self.dispatch_name, self.dispatch_reason = chosen, reason
        return chosen


def full_selection(topology: Topology) -> ExpertSelection:
    return {(side, layer): list(range(topology.num_experts)) for _, side, layer in topology.iter_moe_layers()}


def build_empty_model(
    config: NllbMoeConfig,
    *,
    experts: Optional[ExpertSelection] = None,
    extra_rows: Optional[LayerExtraRows] = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    quantization: Optional[QuantSpec] = None,
) -> NllbMoeForPruning:
    """An uninitialised model (parameters allocated, not filled) keeping ``experts`` (default all).

    ``extra_rows`` gives layers router rows of pruned experts (see :class:`pruning.model.moe.ExtraRows`).
    ``quantization`` (a quantized export's) stores the weights it targets as codes + fp32 scales
    (:mod:`pruning.model.quantized`); ``dtype`` is then the dtype of everything else and of the compute.
    """
    from accelerate import init_empty_weights
    from transformers.modeling_utils import no_init_weights

    topology = Topology.from_config(config)
    experts = experts or full_selection(topology)
    config = _inference_config(config)
    with init_empty_weights(include_buffers=False), no_init_weights():
        model = NllbMoeForPruning(config)
        for _, side, layer in topology.iter_moe_layers():
            stack = model.model.encoder if side == "encoder" else model.model.decoder
            stack.layers[layer].ffn = MoeLayer(
                d_model=config.d_model,
                ffn_dim=config.encoder_ffn_dim if side == "encoder" else config.decoder_ffn_dim,
                expert_ids=experts[(side, layer)],
                eom=config.moe_token_dropout,
                capacity_fraction=config.moe_eval_capacity_token_fraction,
                extra_rows=(extra_rows or {}).get((side, layer)),
            )
        if quantization is not None:
            from pruning.model.quantized import quantize_modules

            quantize_modules(model, quantization)
            model.quantization = quantization
    model.tie_weights()  # accelerate's meta init registers fresh parameters: re-tie embeddings and lm_head
    _materialise(model, dtype=dtype, device=torch.device(device))
    model.set_dispatch("auto")
    model.eval()
    return model


def _inference_config(config: NllbMoeConfig) -> NllbMoeConfig:
    config = NllbMoeConfig.from_dict(config.to_dict())
    config.output_router_logits = False  # routing is observed through hooks, not HF's aux-loss path
    config._attn_implementation = "eager"
    return config


def _materialise(model: nn.Module, *, dtype: torch.dtype, device: torch.device) -> None:
    """Allocate every meta parameter on ``device`` (ties kept; routers in fp32, a module's ``fixed_dtypes`` kept); move buffers."""
    allocated: dict[int, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        fixed = getattr(module, "fixed_dtypes", {})  # quantized codes and their fp32 scales
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in allocated:
                is_router = module_name.endswith("ffn.router")
                target = fixed.get(name) or (torch.float32 if is_router else dtype)
                allocated[id(param)] = nn.Parameter(torch.empty(param.shape, dtype=target, device=device), requires_grad=False)
            module._parameters[name] = allocated[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is None:
                continue
            buffer = buffer.to(device)
            if buffer.is_floating_point():
                buffer = buffer.to(dtype)
            module._buffers[name] = buffer


INIT_SCHEMES = ("normal", "fairseq")


def init_random_weights(model: NllbMoeForPruning, *, seed: int = 0, scheme: str = "normal", std: float = 0.02, router_std: float = 1.0) -> None:
    """Fill a freshly built model with seeded random weights (tests, benchmarks, training), in place.

    Parameters are classified by the module that owns them (a :class:`Router`, a layer norm, the
    embedding), never by name. ``normal``: N(0, ``std``) everywhere, layer-norm weights 1 + N(0, 0.1),
    router rows N(0, ``router_std``) (large, so routing spreads over many experts). ``fairseq`` (what
    NLLB was trained from): embeddings N(0, d^-1/2) with a zero padding row, Xavier-uniform matrices
    (stacked experts: per expert), zero biases, unit layer norms, router rows N(0, d^-1/2). Draws come
    from a generator on the parameters' device, so a model built on a GPU is filled there.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"scheme must be one of {INIT_SCHEMES}, got {scheme!r}")
    device = model.model.shared.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    d_model = model.config.d_model
    with torch.no_grad():
        for name, param in model.named_parameters(remove_duplicate=True):
            owner_name, _, local = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            value = _initial_value(owner, local, param, generator=generator, scheme=scheme, std=std, router_std=router_std, d_model=d_model)
            if isinstance(owner, nn.Embedding) and scheme == "fairseq" and owner.padding_idx is not None:
                value[owner.padding_idx] = 0
            param.copy_(value.to(param.dtype))


def _initial_value(
    owner: nn.Module, local: str, param: torch.Tensor, *, generator: torch.Generator, scheme: str, std: float, router_std: float, d_model: int
) -> torch.Tensor:
    """One parameter's initial value (float32, on the parameter's device)."""
    shape, device = param.shape, param.device

    def normal(scale: float) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device) * scale

    if isinstance(owner, Router):
        return normal(router_std if scheme == "normal" else d_model**-0.5)
    if isinstance(owner, nn.LayerNorm):
        if local == "bias":
            return normal(std) if scheme == "normal" else torch.zeros(shape, device=device)
        return 1.0 + normal(0.1) if scheme == "normal" else torch.ones(shape, device=device)
    if scheme == "normal":
        return normal(std)
    if isinstance(owner, nn.Embedding):
        return normal(d_model**-0.5)
    if local.endswith("bias") or param.dim() < 2:
        return torch.zeros(shape, device=device)
    fan_out, fan_in = shape[-2], shape[-1]  # [.., out, in]: stacked experts are [E, out, in]
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return (torch.rand(shape, generator=generator, device=device) * 2 - 1) * bound
