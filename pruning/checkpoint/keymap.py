"""Checkpoint key names: the fairseq -> canonical mapping table, and the canonical names we accept.

Canonical names are those of ``transformers``' ``NllbMoeModel`` (no ``model.`` prefix), e.g.
``encoder.layers.3.ffn.experts.expert_17.fc1.weight``. Each table row is an anchored regular
expression and its replacement; ``None`` drops the key. Anything that matches no row is an error
that lists the leftover keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

SHARED = "shared.weight"
_SIDE = r"(encoder|decoder)"
_N = r"(\d+)"
_WB = r"(weight|bias)"

# fairseq (NLLB branch) -> canonical. ``{expert}`` in a replacement is filled by the reader with the
# global expert index (rank file number * experts per file + local index).
FAIRSEQ_TABLE: list[tuple[str, Optional[str]]] = [
    (rf"{_SIDE}\.version", None),
    (rf"{_SIDE}\.embed_positions\._float_tensor", None),  # sinusoidal positions are computed, not stored
    (r"decoder\.output_projection\.weight", None),  # tied to the token embedding
    (r"encoder\.embed_tokens\.weight", SHARED),  # share_all_embeddings: one matrix, stored twice
    (r"decoder\.embed_tokens\.weight", SHARED),
    (rf"{_SIDE}\.layer_norm\.{_WB}", r"\1.layer_norm.\2"),
    (rf"{_SIDE}\.layers\.{_N}\.self_attn\.(k|v|q|out)_proj\.{_WB}", r"\1.layers.\2.self_attn.\3_proj.\4"),
    (rf"{_SIDE}\.layers\.{_N}\.self_attn_layer_norm\.{_WB}", r"\1.layers.\2.self_attn_layer_norm.\3"),
    (rf"decoder\.layers\.{_N}\.encoder_attn\.(k|v|q|out)_proj\.{_WB}", r"decoder.layers.\1.cross_attention.\2_proj.\3"),
    (rf"decoder\.layers\.{_N}\.encoder_attn_layer_norm\.{_WB}", r"decoder.layers.\1.cross_attention_layer_norm.\2"),
    (rf"{_SIDE}\.layers\.{_N}\.fc(1|2)\.{_WB}", r"\1.layers.\2.ffn.fc\3.\4"),
    (rf"{_SIDE}\.layers\.{_N}\.final_layer_norm\.{_WB}", r"\1.layers.\2.ff_layer_norm.\3"),
    (rf"{_SIDE}\.layers\.{_N}\.moe_layer\.gate\.wg\.weight", r"\1.layers.\2.ffn.router.classifier.weight"),
    (rf"{_SIDE}\.layers\.{_N}\.moe_layer\.experts\.(\d+)\.fc(1|2)\.{_WB}", r"\1.layers.\2.ffn.experts.expert_{expert}.fc\4.\5"),
]

# canonical -> fairseq, for writing the fairseq layout (``nllb-prune convert --layout fairseq``). The token
# embedding is written under the three fairseq names that share it (FAIRSEQ_SHARED_NAMES); an expert goes
# to rank file ``expert`` as local expert 0 (one expert of every MoE layer per rank file, as released).
FAIRSEQ_SHARED_NAMES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "decoder.output_projection.weight")
CANONICAL_TO_FAIRSEQ: list[tuple[str, Optional[str]]] = [
    (rf"{_SIDE}\.layer_norm\.{_WB}", r"\1.layer_norm.\2"),
    (rf"{_SIDE}\.layers\.{_N}\.self_attn\.(k|v|q|out)_proj\.{_WB}", r"\1.layers.\2.self_attn.\3_proj.\4"),
    (rf"{_SIDE}\.layers\.{_N}\.self_attn_layer_norm\.{_WB}", r"\1.layers.\2.self_attn_layer_norm.\3"),
    (rf"decoder\.layers\.{_N}\.cross_attention\.(k|v|q|out)_proj\.{_WB}", r"decoder.layers.\1.encoder_attn.\2_proj.\3"),
    (rf"decoder\.layers\.{_N}\.cross_attention_layer_norm\.{_WB}", r"decoder.layers.\1.encoder_attn_layer_norm.\2"),
    (rf"{_SIDE}\.layers\.{_N}\.ffn\.fc(1|2)\.{_WB}", r"\1.layers.\2.fc\3.\4"),
    (rf"{_SIDE}\.layers\.{_N}\.ff_layer_norm\.{_WB}", r"\1.layers.\2.final_layer_norm.\3"),
    (rf"{_SIDE}\.layers\.{_N}\.ffn\.router\.classifier\.weight", r"\1.layers.\2.moe_layer.gate.wg.weight"),
    (rf"{_SIDE}\.layers\.{_N}\.ffn\.experts\.expert_\d+\.fc(1|2)\.{_WB}", r"\1.layers.\2.moe_layer.experts.0.fc\3.\4"),
]

# HF (transformers NllbMoe*) -> canonical: strip an optional ``model.`` prefix; tied copies of the
# embedding are dropped in favour of ``shared.weight`` (or stand in for it when it is absent).
HF_TABLE: list[tuple[str, Optional[str]]] = [
    (r"lm_head\.weight", SHARED),
    (r"(?:model\.)?(encoder|decoder)\.embed_tokens\.weight", SHARED),
    (r"(?:model\.)?shared\.weight", SHARED),
    (rf"(?:model\.)?{_SIDE}\.embed_positions\.weights", None),  # computed buffer, sometimes saved
    (r"(?:model\.)?(.+)", r"\1"),
]

# Every canonical name a model has, with its shape in symbols (V vocabulary, D d_model, F the side's ffn,
# R router rows of the layer, P constant outputs of a substitute layer): unknown tensors are rejected in
# either layout, and every tensor's shape is checked against the config before any is loaded.
CANONICAL_SHAPES: list[tuple[str, tuple[str, ...]]] = [
    (re.escape(SHARED), ("V", "D")),
    (rf"{_SIDE}\.layer_norm\.{_WB}", ("D",)),
    (rf"{_SIDE}\.layers\.{_N}\.self_attn\.(k|v|q|out)_proj\.weight", ("D", "D")),
    (rf"{_SIDE}\.layers\.{_N}\.self_attn\.(k|v|q|out)_proj\.bias", ("D",)),
    (rf"{_SIDE}\.layers\.{_N}\.self_attn_layer_norm\.{_WB}", ("D",)),
    (rf"decoder\.layers\.{_N}\.cross_attention\.(k|v|q|out)_proj\.weight", ("D", "D")),
    (rf"decoder\.layers\.{_N}\.cross_attention\.(k|v|q|out)_proj\.bias", ("D",)),
    (rf"decoder\.layers\.{_N}\.cross_attention_layer_norm\.{_WB}", ("D",)),
    (rf"{_SIDE}\.layers\.{_N}\.ffn\.fc1\.weight", ("F", "D")),
    (rf"{_SIDE}\.layers\.{_N}\.ffn\.fc1\.bias", ("F",)),
    (rf"{_SIDE}\.layers\.{_N}\.ffn\.fc2\.weight", ("D", "F")),
    (rf"{_SIDE}\.layers\.{_N}\.ffn\.fc2\.bias", ("D",)),
    (rf"{_SIDE}\.layers\.{_N}\.ff_layer_norm\.{_WB}", ("D",)),
    (rf"{_SIDE}\.layers\.{_N}\.ffn\.router\.classifier\.weight", ("R", "D")),
    (rf"{_SIDE}\.layers\.{_N}\.ffn\.experts\.expert_(\d+)\.fc1\.weight", ("F", "D")),
    (rf"{_SIDE}\.layers\.{_N}\.ffn\.experts\.expert_(\d+)\.fc1\.bias", ("F",)),
    (rf"{_SIDE}\.layers\.{_N}\.ffn\.experts\.expert_(\d+)\.fc2\.weight", ("D", "F")),
    (rf"{_SIDE}\.layers\.{_N}\.ffn\.experts\.expert_(\d+)\.fc2\.bias", ("D",)),
    (rf"{_SIDE}\.layers\.{_N}\.ffn\.constant_outputs", ("P", "D")),  # substitute-policy exports (pruning.manifest)
]
QUANT_COMPANION = r"\.weight_(scale|min)"
"""A quantized export's ``X.weight_scale`` / ``X.weight_min`` beside each quantized ``X.weight`` (pruning.quant)."""

_CANONICAL = [(re.compile(pattern), shape) for pattern, shape in CANONICAL_SHAPES]


def symbolic_shape(name: str) -> Optional[tuple[str, ...]]:
    """The shape of canonical tensor ``name`` in symbols (see :data:`CANONICAL_SHAPES`); None for a name no model has."""
    return next((shape for pattern, shape in _CANONICAL if pattern.fullmatch(name)), None)


_LAYER_RE = re.compile(rf"{_SIDE}\.layers\.{_N}\.")
_DENSE_FFN_RE = re.compile(rf"{_SIDE}\.layers\.{_N}\.ffn\.(fc1|fc2)\.{_WB}")
_EXPERT_RE = re.compile(rf"{_SIDE}\.layers\.{_N}\.ffn\.experts\.expert_(\d+)\.(fc1|fc2)\.(weight|bias|weight_scale|weight_min)")
_ROUTER_RE = re.compile(rf"{_SIDE}\.layers\.{_N}\.ffn\.router\.classifier\.weight")


@dataclass(frozen=True)
class ExpertKey:
    side: str
    layer: int
    expert: int
    linear: str  # "fc1" | "fc2"
    kind: str  # "weight" | "bias" (| "weight_scale" | "weight_min" in a quantized export)


def map_key(key: str, table: list[tuple[str, Optional[str]]], *, expert: Optional[int] = None) -> Optional[str] | bool:
    """Canonical name for ``key``; None = dropped; False = no row matched."""
    for pattern, replacement in table:
        match = re.fullmatch(pattern, key)
        if match is None:
            continue
        if replacement is None:
            return None
        name = match.expand(replacement)
        if "{expert}" in name:
            if expert is None:
                raise ValueError(f"key {key!r} is an expert tensor but no expert index was given")
            name = name.replace("{expert}", str(expert))
        return name
    return False


def is_canonical(name: str) -> bool:
    """A canonical tensor name, or a quantized export's scale / minimum of a canonical ``X.weight``."""
    companion = re.fullmatch(rf"(.+){QUANT_COMPANION}", name)
    if companion is not None:
        name = companion.group(1) + ".weight"
    return symbolic_shape(name) is not None


def parse_expert_key(name: str) -> Optional[ExpertKey]:
    match = _EXPERT_RE.fullmatch(name)
    if match is None:
        return None
    side, layer, expert, linear, kind = match.groups()
    return ExpertKey(side, int(layer), int(expert), linear, kind)


def parse_layer(name: str) -> Optional[tuple[str, int]]:
    """``(side, layer)`` of a canonical per-layer tensor name (``encoder.layers.3.self_attn...``); None otherwise."""
    match = _LAYER_RE.match(name)
    return None if match is None else (match.group(1), int(match.group(2)))


def parse_dense_ffn_key(name: str) -> Optional[tuple[str, int, str, str]]:
    """``(side, layer, fc1|fc2, weight|bias)`` of a dense FFN tensor; None otherwise."""
    match = _DENSE_FFN_RE.fullmatch(name)
    return None if match is None else (match.group(1), int(match.group(2)), match.group(3), match.group(4))


def parse_router_key(name: str) -> Optional[tuple[str, int]]:
    match = _ROUTER_RE.fullmatch(name)
    return None if match is None else (match.group(1), int(match.group(2)))


def expert_key(side: str, layer: int, expert: int, linear: str, kind: str) -> str:
    return f"{side}.layers.{layer}.ffn.experts.expert_{expert}.{linear}.{kind}"


def router_key(side: str, layer: int) -> str:
    return f"{side}.layers.{layer}.ffn.router.classifier.weight"


def fairseq_expert_local_index(key: str) -> Optional[int]:
    """Local expert index inside a fairseq rank file key (``...moe_layer.experts.{i}...``)."""
    match = re.fullmatch(rf"{_SIDE}\.layers\.{_N}\.moe_layer\.experts\.(\d+)\.fc(1|2)\.{_WB}", key)
    return None if match is None else int(match.group(3))


def to_fairseq(name: str) -> str:
    """The fairseq name of canonical tensor ``name`` (not the token embedding: see FAIRSEQ_SHARED_NAMES)."""
    mapped = map_key(name, CANONICAL_TO_FAIRSEQ)
    if not isinstance(mapped, str):
        raise ValueError(f"{name!r} has no fairseq name")
    return mapped
