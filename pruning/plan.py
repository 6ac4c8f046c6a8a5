"""Memory plan: will statistics collection, the pruned export and translation fit, before anything runs.

Bytes come from the topology (:class:`pruning.topology.Topology`: a checkpoint's config, or the
``nllb-moe-54b`` preset), the dtype, the experts kept and the batch. No weight is read.

Per device (one GPU, or this machine's memory with ``--device cpu``):

* **weights** = dense part at ``dtype`` + router rows in fp32 + the experts held (all, the rank's
  share under expert parallelism, or a selection) at ``dtype``;
* **statistics activations** (teacher forcing, no output projection) at ``T`` = ``--batch-tokens``
  tokens routed per side: ``T x (ACT_D x d_model + ACT_F x ffn) x itemsize`` plus the fp32 router
  tensors ``T x experts x ROUTER_BYTES`` (:data:`ACT_D`, :data:`ACT_F`: hidden states, attention,
  the dense FFN and the grouped dispatch's ``[T x 2, ffn]`` buffers alive at once);
* **translation** = weights + the key/value cache (self-attention over ``src + max_length`` positions
  and cross-attention over ``src`` positions, per decoder layer and per hypothesis, ``batch x beam``)
  + the per-step fp32 scores over the vocabulary (:data:`SCORE_COPIES` of ``[batch x beam, vocab]``);
* **quantized weights** (``--quantize int8|int4 [--quantize-dense]``, an export's ``--quantize``): the
  experts (and the dense linear layers) at the bytes :mod:`pruning.quant` stores (int8: 1 byte per
  weight + an fp32 scale per row; int4: 0.5 byte + fp32 scale and minimum per group), plus the
  dequantization transient (two [F, D] matrices at ``dtype``); statistics always run on float weights;
* **runtime**: the process itself (:data:`RUNTIME`: python, torch, transformers; a GPU's CUDA context
  and allocator reserve).

The constants were fitted on the full-width rehearsal (``experiments/results/fullwidth_cpu.md``) and a
small-width copy that ``tests/test_plan.py`` measures in CI: the plan must stay within 10% of measured
peaks. GPU sizes are read as their makers label them: ``32GB`` is 32 GiB.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from pruning.errors import UserError
from pruning.topology import DTYPE_BYTES, NLLB_MOE_54B, Topology

GIB = 2**30
PRESETS = {"nllb-moe-54b": NLLB_MOE_54B}
"""Names that stand for a model where a path would go."""

ACT_D = 16
"""Activation elements per routed token per unit of d_model alive at the peak of a layer (fitted)."""
ACT_F = 4
"""... per unit of ffn: the dense FFN's [T, F] and the grouped dispatch's [2T, F] (and its ReLU)."""
ROUTER_BYTES = 40
"""fp32/int64 router tensors per token per expert: logits, probabilities, the one-hot positions [T, 2, E] int64."""
SCORE_COPIES = 4
"""fp32 ``[hypotheses, vocab]`` tensors alive in a generation step: logits, log-probs, beam scores, a processor's copy."""
RUNTIME = {"cpu": int(0.25 * GIB), "cuda": int(1.0 * GIB)}
"""The process without any model: python + torch + transformers (CPU); CUDA context and allocator reserve (GPU)."""


class PlanError(UserError):
    """A plan request cannot be read: unknown model name, bad memory size, negative batch, foreign selection."""


def parse_memory(text: str, *, flag: str = "--gpu-mem") -> int:
    """``"32GB"``, ``"24 GiB"``, ``"80G"``, ``"512MB"`` or a bare number of GiB -> bytes (GB read as GiB, as GPUs are labelled)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(gib|gb|g|mib|mb|m|tib|tb|t)?\s*", str(text).lower())
    if not match:
        raise PlanError(f"{flag} must be a size like 32GB, 24GiB, 80G or 512MB, got {text!r}")
    value = float(match.group(1))
    unit = (match.group(2) or "g")[0]
    nbytes = int(value * {"m": 2**20, "g": GIB, "t": 2**40}[unit])
    if nbytes <= 0:
        raise PlanError(f"{flag} must be positive, got {text!r}")
    return nbytes


@dataclass(frozen=True)
class Hardware:
    devices: int
    """GPUs (or 1 for this machine's memory)."""
    memory: int
    """Bytes per device."""
    device: str = "cuda"
    """``cuda`` or ``cpu`` (the runtime overhead differs)."""


@dataclass(frozen=True)
class Workload:
    dtype: str = "bf16"
    batch_tokens: int = 4096
    """Tokens per side routed in one statistics step (``stats --batch-tokens``)."""
    batch: int = 16
    """Sentences translated at once."""
    beam: int = 4
    src_len: int = 64
    """Source tokens per sentence (FLORES-200 sentences: ~40 on average, ~150 at most)."""
    max_length: int = 200
    """Most target tokens generated (``translate --max-length``)."""
    quantize: str = ""
    """Translation models' experts stored as ``int8`` | ``int4`` (``export --quantize``); "" for float weights."""
    quantize_dense: bool = False
    """... and their dense linear layers (``export --quantize-dense``)."""
    group_size: Optional[int] = None
    """int4 group size (None: 128)."""

    def quant_spec(self) -> Any:
        """The :class:`pruning.quant.QuantSpec` of the translation models, or None."""
        from pruning.commands.export import quant_spec

        return quant_spec(self.quantize, dense=self.quantize_dense, group_size=self.group_size)

    def validate(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise PlanError(f"--dtype must be one of bf16, fp16, fp32, got {self.dtype!r}")
        for flag, value in (
            ("--batch-tokens", self.batch_tokens),
            ("--batch", self.batch),
            ("--beam", self.beam),
            ("--src-len", self.src_len),
            ("--max-length", self.max_length),
        ):
            if value < 1:
                raise PlanError(f"{flag} must be a positive integer, got {value}")
        self.quant_spec()

    @property
    def itemsize(self) -> int:
        return DTYPE_BYTES[self.dtype]


# ---- bytes ------------------------------------------------------------------------------------------
def dense_bytes(topology: Topology, itemsize: int) -> int:
    """Every non-expert parameter at ``itemsize``, router rows excluded (they are fp32, see :func:`router_bytes`)."""
    routers = topology.num_total_experts * topology.router_params_per_expert
    return (topology.dense_params() - routers) * itemsize


def router_bytes(topology: Topology, rows_per_layer: float) -> int:
    return int(topology.num_moe_layers * rows_per_layer * topology.d_model * 4)


def expert_bytes(topology: Topology, experts: float, itemsize: int) -> int:
    return int(experts * topology.expert_params * itemsize)


def stats_activation_bytes(topology: Topology, tokens: int, itemsize: int) -> int:
    d, f = topology.d_model, topology.ffn_dim
    return tokens * ((ACT_D * d + ACT_F * f) * itemsize + ROUTER_BYTES * topology.num_experts)


def kv_cache_bytes(topology: Topology, workload: Workload) -> int:
    """Keys and values of every decoder layer for every hypothesis: generated positions and the source's."""
    hypotheses = workload.batch * workload.beam
    positions = workload.max_length + 2 + workload.src_len  # self-attention (decoder start, language code, tokens) + cross-attention
    return 2 * topology.decoder_layers * hypotheses * positions * topology.d_model * workload.itemsize


def generation_bytes(topology: Topology, workload: Workload) -> int:
    """KV cache, per-step scores over the vocabulary, and the encoder output of every hypothesis."""
    hypotheses = workload.batch * workload.beam
    scores = SCORE_COPIES * hypotheses * topology.vocab_size * 4
    encoder = hypotheses * workload.src_len * topology.d_model * workload.itemsize * 2
    return kv_cache_bytes(topology, workload) + scores + encoder


# ---- the plan -------------------------------------------------------------------------------------------
@dataclass
class Part:
    """One job on one device: what it holds, whether it fits, and what would make it fit."""

    name: str
    bytes: dict[str, int]
    total: int
    fits: bool
    notes: list[str] = field(default_factory=list)


def _part(name: str, parts: dict[str, int], hardware: Hardware, notes: Optional[list[str]] = None) -> Part:
    parts = {**parts, "runtime": RUNTIME[hardware.device]}
    total = sum(parts.values())
    return Part(name, parts, total, total <= hardware.memory, list(notes or []))


def plan_statistics(topology: Topology, hardware: Hardware, workload: Workload) -> dict[str, Any]:
    """The smallest expert-parallel size whose rank fits, its bytes, and the largest ``--batch-tokens`` there.

    Sizes beyond ``hardware.devices`` are searched too, so that a plan that does not fit says how many
    devices of this size would.
    """
    item = workload.itemsize

    def rank(size: int) -> Part:
        held = math.ceil(topology.num_experts / size) * topology.num_moe_layers
        return _part(
            f"statistics, --expert-parallel {size}",
            {
                "dense": dense_bytes(topology, item),
                "routers (fp32, all rows)": router_bytes(topology, topology.num_experts),
                f"experts ({held} of {topology.num_total_experts})": expert_bytes(topology, held, item),
                f"activations ({workload.batch_tokens} tokens)": stats_activation_bytes(topology, workload.batch_tokens, item),
            },
            hardware,
        )

    needed = next((size for size in range(1, topology.num_experts + 1) if rank(size).fits), None)
    size = min(needed or hardware.devices, hardware.devices)
    part = rank(size)
    fixed = part.total - stats_activation_bytes(topology, workload.batch_tokens, item)
    largest = max(0, (hardware.memory - fixed) // stats_activation_bytes(topology, 1, item))
    if needed is None:
        part.notes.append(f"one expert per device does not fit in {hardware.memory / GIB:.0f} GiB: the dense part alone is too large at {workload.dtype}")
    elif needed > hardware.devices:
        part.notes.append(
            f"needs --expert-parallel {needed}: {needed} devices of {hardware.memory / GIB:.0f} GiB (torchrun over several nodes), or devices with more memory"
        )
    return {"expert_parallel": size, "devices_needed": needed, "largest_batch_tokens": int(largest), **_as_dict(part)}


def plan_model(name: str, topology: Topology, hardware: Hardware, workload: Workload, *, experts: float, router_rows: float) -> dict[str, Any]:
    """A model holding ``experts`` experts in all and ``router_rows`` router rows per MoE layer, translating."""
    item = workload.itemsize
    weights = {
        "dense": dense_bytes(topology, item),
        f"routers (fp32, {router_rows:g} rows per layer)": router_bytes(topology, router_rows),
        f"experts ({experts:g})": expert_bytes(topology, experts, item),
    }
    spec = workload.quant_spec()
    if spec is not None:
        from pruning import quant

        dense_what = f"dense ({spec.scheme} linear layers)" if spec.dense else "dense"
        weights = {
            dense_what: dense_bytes(topology, item) - quant.dense_saving(topology, spec, item),
            f"routers (fp32, {router_rows:g} rows per layer)": router_bytes(topology, router_rows),
            f"experts ({experts:g}, {spec.scheme})": int(experts * quant.expert_bytes(topology, spec, item)),
            "dequantization transient": quant.dequantization_bytes(topology, item),
        }
    generation = generation_bytes(topology, workload)
    part = _part(
        name, {**weights, f"generation (batch {workload.batch} x beam {workload.beam}, {workload.src_len}+{workload.max_length} tokens)": generation}, hardware
    )
    fixed = part.total - generation
    one = generation_bytes(topology, Workload(**{**asdict(workload), "batch": 1}))
    largest = max(0, (hardware.memory - fixed) // one) if one else 0
    if not part.fits:
        if fixed + one > hardware.memory:
            room = hardware.memory - part.bytes["runtime"] - one  # bytes the weights may take with one sentence
            fix = (
                "--dtype bf16 (or fp16)"
                if workload.dtype == "fp32"
                else (
                    f"prune more experts: `select --budget-gb {room / 1e9:.1f}` keeps the most that fit (weights {sum(weights.values()) / 1e9:.1f} GB, "
                    f"room {max(room, 0) / 1e9:.1f} GB; --budget-gb counts 10^9 bytes)"
                )
            )
            part.notes.append(f"the weights do not fit even for one sentence: {fix}")
        else:
            part.notes.append(f"fits with --batch {largest} (or a smaller --beam / --max-length)")
    stored = sum(v for k, v in weights.items() if k != "dequantization transient")
    return {"weights_bytes": stored, "largest_batch": int(largest), **_as_dict(part)}


def _as_dict(part: Part) -> dict[str, Any]:
    return {"name": part.name, "bytes": part.bytes, "total_bytes": part.total, "fits": part.fits, "notes": part.notes}


@dataclass(frozen=True)
class Kept:
    """Experts of one direction's model and of a multi-direction export, with their router rows per layer."""

    per_direction: float
    per_direction_rows: float
    union: Optional[float] = None
    union_rows: Optional[float] = None
    source: str = ""


def kept_from_ratio(topology: Topology, ratio: float, enc_dec: str) -> Kept:
    from pruning.select import SelectOptions, plan_keep

    options = SelectOptions(ratio=ratio, enc_dec=enc_dec)
    try:
        options.validate()
        keep = plan_keep(topology, options)
    except UserError as exc:
        raise PlanError(str(exc)) from None
    rows = keep.total / topology.num_moe_layers
    return Kept(keep.total, rows, source=f"--ratio {ratio:g} --enc-dec {enc_dec}: {keep.total} experts per direction")


def kept_from_index(topology: Topology, index_path: str | Path, directions: list[tuple[str, str]]) -> Kept:
    from pruning.export import plan_export
    from pruning.index import read_index

    index = read_index(index_path)
    try:
        export = plan_export(index, topology, directions, what=str(index_path))
    except UserError as exc:
        raise PlanError(f"{index_path} does not fit this model: {exc}") from None
    largest = max(sum(len(ids) for ids in layers.values()) for layers in export.directions.values())
    union = sum(len(ids) for ids in export.union.values())
    n = topology.num_moe_layers
    return Kept(largest, largest / n, union, union / n, source=f"{Path(index_path).name}: {len(export.directions)} direction(s)")


def build_plan(topology: Topology, hardware: Hardware, workload: Workload, kept: Kept) -> dict[str, Any]:
    workload.validate()
    item = workload.itemsize
    full = topology.num_total_experts
    out: dict[str, Any] = {
        "topology": topology.to_dict(),
        "hardware": {"devices": hardware.devices, "memory_bytes": hardware.memory, "device": hardware.device},
        "workload": asdict(workload),
        "full_model_bytes": dense_bytes(topology, item) + router_bytes(topology, topology.num_experts) + expert_bytes(topology, full, item),
        "statistics": plan_statistics(topology, hardware, workload),
        "selection": kept.source,
        "translation_one_direction": plan_model(
            "pruned export, one direction", topology, hardware, workload, experts=kept.per_direction, router_rows=kept.per_direction_rows
        ),
    }
    if kept.union is not None and kept.union != kept.per_direction:
        out["translation_multi_direction"] = plan_model(
            "pruned export, every direction of the index (union)", topology, hardware, workload, experts=kept.union, router_rows=kept.union_rows or 0
        )
    out["translation_full_model"] = plan_model("unpruned model", topology, hardware, workload, experts=full, router_rows=topology.num_experts)
    return out


def resolve_topology(model: str) -> Topology:
    """A preset name (``nllb-moe-54b``) or a checkpoint (its config only; no weight is read)."""
    if model in PRESETS:
        return PRESETS[model]
    from pruning.checkpoint.reader import open_checkpoint

    if not Path(model).exists():
        raise PlanError(f"--model {model!r} is neither a checkpoint path nor a preset ({', '.join(PRESETS)})")
    return open_checkpoint(model).topology


def format_plan(plan: Mapping[str, Any]) -> list[str]:
    hw = plan["hardware"]
    workload = plan["workload"]
    quantized = f", translation models {workload['quantize']}{' + dense' if workload.get('quantize_dense') else ''}" if workload.get("quantize") else ""
    lines = [
        f"hardware: {hw['devices']} x {hw['memory_bytes'] / GIB:.1f} GiB ({hw['device']}), dtype {workload['dtype']}{quantized}; "
        f"full model {plan['full_model_bytes'] / GIB:.1f} GiB"
    ]
    stats = plan["statistics"]
    sections = [
        ("statistics", stats),
        *[(k, plan[k]) for k in ("translation_one_direction", "translation_multi_direction", "translation_full_model") if k in plan],
    ]
    for key, part in sections:
        verdict = "fits" if part["fits"] else "DOES NOT FIT"
        lines.append(f"{part['name']}: {part['total_bytes'] / GIB:.2f} GiB per device, {verdict}")
        for what, nbytes in part["bytes"].items():
            lines.append(f"    {what:<58} {nbytes / GIB:8.2f} GiB")
        if key == "statistics":
            lines.append(f"    largest --batch-tokens that fits: {stats['largest_batch_tokens']}")
        else:
            lines.append(f"    largest --batch that fits: {part['largest_batch']}")
        lines += [f"    -> {note}" for note in part["notes"]]
    if plan.get("selection"):
        lines.append(f"selection: {plan['selection']}")
    return lines


__all__ = ["Hardware", "PlanError", "Workload", "build_plan", "format_plan", "parse_memory", "resolve_topology"]
