"""The one place that knows the shape of an NLLB-MoE model.

Everything else asks a :class:`Topology` which layers are MoE layers, how many experts they hold,
how the pruning paper's global expert ids map to (side, layer, expert), and how many parameters and
bytes each part has. No other module hard-codes 24, 128, 768 or 1535.

Global expert id (the paper's convention, section 5 of the reference page):
``gid = moe_index * num_experts + expert`` where ``moe_index`` counts the encoder's MoE layers first
(0 .. n_enc-1), then the decoder's (n_enc .. n_enc+n_dec-1). For NLLB-200 MoE, encoder ids are < 768.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator

from pruning.data.directions import SIDES, Side
from pruning.errors import UserError

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


class TopologyError(UserError):
    """A topology does not match what a file or a request expects."""


@dataclass(frozen=True)
class ExpertRef:
    """One expert, addressed by side, transformer layer index and expert index within that layer."""

    side: Side
    layer: int
    expert: int


@dataclass(frozen=True)
class Topology:
    """Shape of an NLLB-MoE model; the defaults are the 54.5B NLLB-200 MoE."""

    encoder_layers: int = 24
    """Number of encoder transformer layers."""
    decoder_layers: int = 24
    """Number of decoder transformer layers."""
    encoder_sparse_step: int = 4
    """Every ``step``-th encoder layer is MoE: layers ``step-1, 2*step-1, ...`` (0-based)."""
    decoder_sparse_step: int = 4
    """Every ``step``-th decoder layer is MoE."""
    num_experts: int = 128
    """Experts per MoE layer in the unpruned model."""
    d_model: int = 2048
    """Hidden width D."""
    ffn_dim: int = 8192
    """FFN width F of dense FFNs and of every expert."""
    vocab_size: int = 256206
    """Rows of the (tied) token embedding."""
    encoder_attention_heads: int = 16
    """Attention heads (for information; parameter counts do not depend on it)."""
    decoder_attention_heads: int = 16
    """Attention heads of the decoder."""

    # ---- which layers are MoE -------------------------------------------------------------
    def moe_layers(self, side: Side) -> tuple[int, ...]:
        """0-based indices of the MoE layers of ``side`` (HF and fairseq both count from 0)."""
        layers, step = self._side_shape(side)
        if step <= 0:
            return ()
        return tuple(i for i in range(layers) if (i + 1) % step == 0)

    def is_moe_layer(self, side: Side, layer: int) -> bool:
        return layer in self.moe_layers(side)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers("encoder")) + len(self.moe_layers("decoder"))

    @property
    def num_total_experts(self) -> int:
        return self.num_moe_layers * self.num_experts

    def iter_moe_layers(self) -> Iterator[tuple[int, Side, int]]:
        """Yield ``(moe_index, side, layer)`` in global order: encoder MoE layers, then decoder."""
        index = 0
        for side in SIDES:
            for layer in self.moe_layers(side):
                yield index, side, layer
                index += 1

    def moe_index(self, side: Side, layer: int) -> int:
        """Position of a MoE layer in the global order (0 .. num_moe_layers-1)."""
        for index, s, l in self.iter_moe_layers():
            if s == side and l == layer:
                return index
        raise TopologyError(f"{side} layer {layer} is not a MoE layer; MoE layers of the {side} are {list(self.moe_layers(side))}")

    def moe_slot(self, moe_index: int) -> tuple[Side, int]:
        """Inverse of :meth:`moe_index`: ``(side, layer)`` of the ``moe_index``-th MoE layer."""
        for index, side, layer in self.iter_moe_layers():
            if index == moe_index:
                return side, layer
        raise TopologyError(f"MoE layer index must be in 0..{self.num_moe_layers - 1}, got {moe_index}")

    def side_moe_indices(self, side: Side) -> range:
        """Global MoE indices belonging to ``side`` (a contiguous range)."""
        n_enc = len(self.moe_layers("encoder"))
        return range(0, n_enc) if side == "encoder" else range(n_enc, self.num_moe_layers)

    # ---- the paper's global expert ids -----------------------------------------------------
    def global_id(self, side: Side, layer: int, expert: int) -> int:
        self._check_expert(expert)
        return self.moe_index(side, layer) * self.num_experts + expert

    def expert_ref(self, gid: int) -> ExpertRef:
        if not 0 <= gid < self.num_total_experts:
            raise TopologyError(f"expert id must be in 0..{self.num_total_experts - 1}, got {gid}")
        side, layer = self.moe_slot(gid // self.num_experts)
        return ExpertRef(side, layer, gid % self.num_experts)

    def side_of_id(self, gid: int) -> Side:
        return self.expert_ref(gid).side

    # ---- sizes ----------------------------------------------------------------------------
    @property
    def expert_params(self) -> int:
        """fc1 [F, D] + bias [F] + fc2 [D, F] + bias [D]."""
        return 2 * self.ffn_dim * self.d_model + self.ffn_dim + self.d_model

    @property
    def router_params_per_expert(self) -> int:
        """One router row per expert (no bias)."""
        return self.d_model

    def dense_params(self) -> int:
        """Every parameter that is not an expert, routers included (tied embeddings counted once)."""
        d, f = self.d_model, self.ffn_dim
        attention = 4 * (d * d + d)
        norm = 2 * d
        dense_ffn = 2 * d * f + f + d
        total = self.vocab_size * d  # shared embedding, tied with the output projection
        for side in SIDES:
            layers, _ = self._side_shape(side)
            moe = self.moe_layers(side)
            per_layer = attention + 2 * norm  # self attention + its norm + ffn norm
            if side == "decoder":
                per_layer += attention + norm  # cross attention + its norm
            total += layers * per_layer
            total += (layers - len(moe)) * dense_ffn
            total += len(moe) * self.num_experts * self.router_params_per_expert
            total += norm  # final layer norm of the side
        return total

    def total_params(self) -> int:
        return self.dense_params() + self.num_total_experts * self.expert_params

    def pruned_params(self, kept_experts: int) -> int:
        """Parameters of a model keeping ``kept_experts`` experts in all (router rows of pruned experts dropped)."""
        dropped_rows = (self.num_total_experts - kept_experts) * self.router_params_per_expert
        return self.dense_params() - dropped_rows + kept_experts * self.expert_params

    # ---- conversions -----------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Any) -> "Topology":
        """From a ``transformers`` ``NllbMoeConfig`` (or any object/dict with the same fields)."""

        def get(key: str, default: Any = None) -> Any:
            return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)

        return cls(
            encoder_layers=int(get("encoder_layers")),
            decoder_layers=int(get("decoder_layers")),
            encoder_sparse_step=int(get("encoder_sparse_step")),
            decoder_sparse_step=int(get("decoder_sparse_step")),
            num_experts=int(get("num_experts")),
            d_model=int(get("d_model")),
            ffn_dim=int(get("encoder_ffn_dim")),
            vocab_size=int(get("vocab_size")),
            encoder_attention_heads=int(get("encoder_attention_heads", 16)),
            decoder_attention_heads=int(get("decoder_attention_heads", 16)),
        )

    def to_hf_config(self, **overrides: Any) -> Any:
        """The ``transformers`` ``NllbMoeConfig`` of this shape, with NLLB-200's inference settings unless overridden.

        No dropout, eval capacity fraction 1.0, expert output masking 0.2, 1,024 positions, scaled
        embeddings, NLLB's special token ids. The inverse of :meth:`from_config`.
        """
        from transformers import NllbMoeConfig

        settings: dict[str, Any] = dict(
            vocab_size=self.vocab_size,
            d_model=self.d_model,
            encoder_layers=self.encoder_layers,
            decoder_layers=self.decoder_layers,
            encoder_ffn_dim=self.ffn_dim,
            decoder_ffn_dim=self.ffn_dim,
            encoder_attention_heads=self.encoder_attention_heads,
            decoder_attention_heads=self.decoder_attention_heads,
            num_experts=self.num_experts,
            encoder_sparse_step=self.encoder_sparse_step,
            decoder_sparse_step=self.decoder_sparse_step,
            max_position_embeddings=1024,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            encoder_layerdrop=0.0,
            decoder_layerdrop=0.0,
            moe_token_dropout=0.2,
            moe_eval_capacity_token_fraction=1.0,
            scale_embedding=True,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
        )
        return NllbMoeConfig(**{**settings, **overrides})

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Topology":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise TopologyError(f"unknown topology fields {unknown}; expected a subset of {sorted(fields)}")
        return cls(**{k: int(v) for k, v in data.items()})

    def routing_shape(self) -> dict[str, int]:
        """The part of the topology that routing statistics and expert indices depend on."""
        return {
            "encoder_layers": self.encoder_layers,
            "decoder_layers": self.decoder_layers,
            "encoder_sparse_step": self.encoder_sparse_step,
            "decoder_sparse_step": self.decoder_sparse_step,
            "num_experts": self.num_experts,
        }

    def check_same_routing(self, other: "Topology", *, what: str) -> None:
        """Raise if ``other`` has different MoE layers or expert counts (``what`` names the file)."""
        mine, theirs = self.routing_shape(), other.routing_shape()
        diffs = [f"{k}: expected {mine[k]}, got {theirs[k]}" for k in mine if mine[k] != theirs[k]]
        if diffs:
            raise TopologyError(f"{what} was made for another model topology ({'; '.join(diffs)})")

    # ---- helpers ---------------------------------------------------------------------------
    def _side_shape(self, side: Side) -> tuple[int, int]:
        if side == "encoder":
            return self.encoder_layers, self.encoder_sparse_step
        if side == "decoder":
            return self.decoder_layers, self.decoder_sparse_step
        raise TopologyError(f"side must be 'encoder' or 'decoder', got {side!r}")

    def _check_expert(self, expert: int) -> None:
        if not 0 <= expert < self.num_experts:
            raise TopologyError(f"expert index must be in 0..{self.num_experts - 1}, got {expert}")


NLLB_MOE_54B = Topology()
"""The released NLLB-200 MoE: 24+24 layers, MoE every 4th, 128 experts, d_model 2048, FFN 8192."""


def bytes_for(params: int, dtype: str) -> int:
    try:
        return params * DTYPE_BYTES[dtype]
    except KeyError:
        raise TopologyError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}") from None


def gib(nbytes: int) -> float:
    return nbytes / 2**30
