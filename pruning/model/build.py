"""Put our MoE layer into ``transformers``' NLLB-MoE encoder-decoder, built on the meta device.

``transformers`` supplies attention, embeddings, masks, caching and generation; every sparse layer's
``ffn`` is replaced by :class:`pruning.model.moe.MoeLayer` holding only the experts a selection keeps.
Parameters are allocated once, at their final dtype and device, then filled tensor by tensor.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import nn
from transformers import NllbMoeConfig, NllbMoeForConditionalGeneration

from pruning.model.moe import DISPATCHES, ExtraRows, MoeLayer, choose_dispatch
from pruning.quant import QuantSpec
from pruning.topology import Side, Topology

ExpertSelection = dict[tuple[str, int], list[int]]
"""(side, layer) -> sorted original indices of the experts a MoE layer keeps."""
LayerExtraRows = dict[tuple[str, int], ExtraRows]
"""(side, layer) -> router rows of pruned experts kept for routing (``substitute`` / ``merge`` policies)."""


class NllbMoeForPruning(NllbMoeForConditionalGeneration):
    """``NllbMoeForConditionalGeneration`` whose MoE layers are ours (see :mod:`pruning.model.moe`)."""

    tokenizer = None  # set by load_model when tokenizer files are found
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
        """Route over direction ``src-tgt``'s experts of an export's manifest; None clears (see pruning.manifest)."""
        from pruning.manifest import set_direction

        set_direction(self, src, tgt)

    def set_dispatch(self, name: str = "auto") -> str:
        """Choose the expert dispatch of every MoE layer (``auto`` | ``grouped`` | ``loop``); returns the choice.

        Quantized experts (:mod:`pruning.model.quantized`): ``auto`` is the loop (one expert dequantized at
        a time, or torch's int8 kernel); ``grouped`` dequantizes a whole layer's experts per call.
        """
        from pruning.model.quantized import QUANTIZED_AUTO_REASON, QuantizedStackedExperts, dequantized_grouped_dispatch

        weight = self.model.shared.weight
        chosen, reason = choose_dispatch(
            name, device=weight.device, dtype=weight.dtype, d_model=self.config.d_model,
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


def hf_config(topology: Topology, **overrides: object) -> NllbMoeConfig:
    """The ``transformers`` config of a model of ``topology``, with NLLB-200's settings unless overridden.

    Inference settings: no dropout, eval capacity fraction 1.0, expert output masking 0.2, max 1,024
    positions, scaled embeddings, NLLB's special token ids.
    """
    settings: dict[str, object] = dict(
        vocab_size=topology.vocab_size,
        d_model=topology.d_model,
        encoder_layers=topology.encoder_layers,
        decoder_layers=topology.decoder_layers,
        encoder_ffn_dim=topology.ffn_dim,
        decoder_ffn_dim=topology.ffn_dim,
        encoder_attention_heads=topology.encoder_attention_heads,
        decoder_attention_heads=topology.decoder_attention_heads,
        num_experts=topology.num_experts,
        encoder_sparse_step=topology.encoder_sparse_step,
        decoder_sparse_step=topology.decoder_sparse_step,
        max_position_embeddings=1024,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        encoder_layerdrop=0.0, decoder_layerdrop=0.0,
        moe_token_dropout=0.2,
        moe_eval_capacity_token_fraction=1.0,
        scale_embedding=True,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
    )
    settings.update(overrides)
    return NllbMoeConfig(**settings)


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


def init_random_weights(model: NllbMoeForPruning, *, seed: int = 0, std: float = 0.02, router_std: float = 1.0) -> None:
    """Fill a freshly built model with seeded random weights (tests, benchmarks).

    Router rows get a large ``router_std`` so that routing spreads over many experts.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters(remove_duplicate=True):
            if name.endswith("layer_norm.weight"):
                value = 1.0 + 0.1 * torch.randn(param.shape, generator=generator)
            elif name.endswith("router.weight"):
                value = router_std * torch.randn(param.shape, generator=generator)
            else:
                value = std * torch.randn(param.shape, generator=generator)
            param.copy_(value.to(param.dtype))
