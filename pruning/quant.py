"""Weight-only quantization of a pruned export: formats, packing, (de)quantization, which tensors.

Dimension legend: N output features (rows), K input features, G = K / group_size groups per row.

Schemes (``nllb-prune export --quantize int8|int4``):

* ``int8``: symmetric, one scale per output channel. ``scale[n] = max_k |w[n, k]| / 127``,
  ``q = clamp(round(w / scale), -127, 127)`` stored as int8 [N, K]; ``w' = q * scale``.
  This is the layout of torch's own CPU kernel ``torch._weight_int8pack_mm`` (int8 [N, K] + [N] scales),
  so the loop dispatch multiplies bf16/fp16 activations by the stored codes without dequantizing.
* ``int4``: asymmetric (min/max), one scale and one minimum per group of ``group_size`` consecutive
  input features of a row (default 128). ``scale = (max - min) / 15``, ``q = clamp(round((w - min) /
  scale), 0, 15)``; ``w' = q * scale + min``. Two codes per byte along K, the even column in the low
  nibble: uint8 [N, K / 2]; scales and minimums [N, G].
  Why 128: it divides NLLB-200's d_model (2048) and FFN width (8192) and the testbed's (128, 256);
  it is the group of GPTQ/AWQ/torchao int4 weight-only checkpoints and one that torch's int4 kernels
  take (32/64/128/256); and with fp32 scale + minimum it adds 8 bytes per 128 weights (0.0625 byte
  per weight: 0.5625 in all). Smaller groups lower the error (``experiments/quant/ranges.py`` measures
  it on the testbed: 9.4% -> 7.5% relative weight error for groups of 32) at 0.25 byte per weight of scales
  instead of 0.0625.

Scales (and int4 minimums) are stored in fp32 whatever ``--dtype`` says: they are 0.4% (int8 at
d_model 2048) and 11% (int4) of the quantized bytes, and an fp32 scale adds no error of its own.

What is quantized (``targets``): ``experts``: the fc1/fc2 weights of every kept expert; ``dense``:
also the weights of every attention projection (self and cross: q, k, v, out) and of the dense FFNs.
Never: biases, layer norms, routers (fp32), a ``substitute`` export's constant outputs, and the tied
token embedding / output projection (it would save 0.49 GiB of NLLB-200's 12 GiB at int8, but every
decoding step would have to dequantize all 525M output-projection weights, a 0.98 GiB bf16 transient
per step; see ``experiments/results/quant/README.md``).

Stored names: a quantized ``X.weight`` keeps its name for the codes (int8 or uint8) and gains
``X.weight_scale`` (and, int4, ``X.weight_min``) beside it; the manifest's ``quantization`` entry
(:meth:`QuantSpec.record`) and ``config.json``'s ``pruned_quantization`` say which scheme.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional

import torch

from pruning.errors import UserError

SCHEMES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 128
TARGETS = ("experts", "dense")
SCALE = "_scale"
MINIMUM = "_min"
COMPANIONS = (SCALE, MINIMUM)
"""Suffixes of the tensors stored beside a quantized ``X.weight``: ``X.weight_scale``, ``X.weight_min``."""
INT8_MAX = 127
INT4_LEVELS = 15
STORAGE = {"int8": torch.int8, "int4": torch.uint8}
"""dtype of the stored codes."""
SCALE_DTYPE = torch.float32

_DENSE_RE = re.compile(r"(encoder|decoder)\.layers\.\d+\.((self_attn|cross_attention)\.(q|k|v|out)_proj|ffn\.fc(1|2))\.weight")
_EXPERT_WEIGHT_RE = re.compile(r"(encoder|decoder)\.layers\.\d+\.ffn\.experts\.expert_\d+\.fc(1|2)\.weight")


class QuantError(UserError):
    """A ``--quantize`` request cannot be met: unknown scheme, bad group size, an already quantized source."""


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How an export's weights are quantized (the manifest's ``quantization`` entry)."""

    scheme: str
    """``int8`` (per output channel) or ``int4`` (group-wise)."""
    group_size: Optional[int] = None
    """Input features per int4 group; None for int8."""
    targets: tuple[str, ...] = ("experts",)
    """``("experts",)`` or ``("experts", "dense")``."""

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise QuantError(f"--quantize must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if self.scheme == "int4":
            if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 2 or self.group_size % 2:
                raise QuantError(f"--group-size must be an even integer >= 2 for int4, got {self.group_size!r}")
        elif self.group_size is not None:
            raise QuantError(f"--group-size applies to int4 only (int8 has one scale per output channel), got {self.group_size} with int8")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or "experts" not in self.targets:
            raise QuantError(f"quantization targets must be 'experts' and optionally 'dense', got {list(self.targets)}")

    @classmethod
    def make(cls, scheme: str, *, dense: bool = False, group_size: Optional[int] = None) -> "QuantSpec":
        """From the CLI flags: ``group_size`` None means 128 for int4."""
        if scheme == "int4" and group_size is None:
            group_size = DEFAULT_GROUP_SIZE
        return cls(scheme, group_size, ("experts", "dense") if dense else ("experts",))

    @property
    def dense(self) -> bool:
        return "dense" in self.targets

    def record(self) -> dict[str, Any]:
        """The manifest's ``quantization`` entry (and config.json's ``pruned_quantization``)."""
        return {
            "scheme": self.scheme,
            "group_size": self.group_size,
            "targets": list(self.targets),
            "scale_dtype": "float32",
            "format": FORMULAS[self.scheme],
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any], *, what: str = "quantization") -> "QuantSpec":
        if not isinstance(record, Mapping):
            raise QuantError(f"{what}: expected an object with 'scheme', 'group_size' and 'targets', got {str(record)[:60]}")
        try:
            return cls(str(record.get("scheme")), record.get("group_size"), tuple(record.get("targets") or ()))
        except QuantError as exc:
            raise QuantError(f"{what}: {exc}") from None

    def describe(self) -> str:
        what = "experts and dense linear layers" if self.dense else "experts"
        how = "per output channel" if self.scheme == "int8" else f"groups of {self.group_size}"
        return f"{self.scheme} ({how}, fp32 scales) on the {what}"

    # ---- which tensors --------------------------------------------------------------------------
    def applies(self, name: str) -> bool:
        """Whether canonical tensor ``name`` is stored quantized under this spec."""
        if _EXPERT_WEIGHT_RE.fullmatch(name):
            return True
        return self.dense and _DENSE_RE.fullmatch(name) is not None

    def stored(self, name: str, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """``{stored name: (shape, dtype)}`` of float weight ``name`` of ``shape`` [N, K] once quantized."""
        rows, cols = shape
        self.check_width(name, cols)
        if self.scheme == "int8":
            return {name: ((rows, cols), torch.int8), name + SCALE: ((rows,), SCALE_DTYPE)}
        groups = cols // self.group_size  # type: ignore[operator]
        return {name: ((rows, cols // 2), torch.uint8), name + SCALE: ((rows, groups), SCALE_DTYPE), name + MINIMUM: ((rows, groups), SCALE_DTYPE)}

    def check_width(self, name: str, cols: int) -> None:
        if self.scheme == "int4" and cols % self.group_size:  # type: ignore[operator]
            raise QuantError(
                f"--group-size {self.group_size} must divide the input width of every quantized matrix, "
                f"but {name} has {cols} input features (choose a divisor of {cols})"
            )

    def logical_numel(self, shape: tuple[int, ...]) -> int:
        """Weights a stored code tensor of ``shape`` stands for (int4: two per byte)."""
        n = 1
        for s in shape:
            n *= s
        return 2 * n if self.scheme == "int4" else n


FORMULAS = {
    "int8": "w = q * scale; q int8 [N, K] in -127..127, scale fp32 [N]",
    "int4": "w = q * scale + min; q in 0..15, two per uint8 along K (even column in the low nibble) [N, K/2], scale and min fp32 [N, K/group_size]",
}


def is_companion(name: str) -> bool:
    """``X.weight_scale`` / ``X.weight_min``: a quantized weight's scales, stored in fp32."""
    return name.endswith(".weight" + SCALE) or name.endswith(".weight" + MINIMUM)


def base_name(name: str) -> str:
    """``X.weight`` of a companion name (``name`` itself otherwise)."""
    for suffix in COMPANIONS:
        if name.endswith(".weight" + suffix):
            return name[: -len(suffix)]
    return name


def spec_of(manifest: Optional[Mapping[str, Any]]) -> Optional[QuantSpec]:
    """The quantization of an export (None for an unquantized export or a full model)."""
    if not manifest or manifest.get("quantization") is None:
        return None
    return QuantSpec.from_record(manifest["quantization"], what="manifest 'quantization'")


# ---- quantize / dequantize ------------------------------------------------------------------------
def quantize(w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """``{"": codes, "_scale": scale[, "_min": minimum]}`` of float weight ``w`` [..., N, K] (computed in fp32)."""
    if spec.scheme == "int8":
        q, scale = quantize_int8(w)
        return {"": q, SCALE: scale}
    q, scale, minimum = quantize_int4(w, spec.group_size)  # type: ignore[arg-type]
    return {"": q, SCALE: scale, MINIMUM: minimum}


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (int8 codes [..., N, K], fp32 scale [..., N]); an all-zero row gets scale 1."""
    w = w.float()
    amax = w.abs().amax(dim=-1)  # [..., N]
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(w / scale[..., None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (packed uint8 [..., N, K/2], fp32 scale [..., N, G], fp32 min [..., N, G]).

    A constant group gets scale 1 and codes 0, so that it dequantizes to its value exactly.
    """
    *lead, rows, cols = w.shape
    if cols % group_size or group_size % 2:
        raise QuantError(f"int4 group size {group_size} must be even and divide the input width {cols}")
    groups = w.float().reshape(*lead, rows, cols // group_size, group_size)  # [..., N, G, group]
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # [..., N, G]
    scale = torch.where(high > low, (high - low) / INT4_LEVELS, torch.ones_like(low))
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp_(0, INT4_LEVELS).to(torch.uint8)
    return pack_int4(q.reshape(*lead, rows, cols)), scale, low


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [..., K] (K even) -> uint8 [..., K/2]: column 2j in the low nibble, 2j+1 in the high one."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> codes uint8 [..., K] (inverse of :func:`pack_int4`)."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def dequantize(q: torch.Tensor, scale: torch.Tensor, minimum: Optional[torch.Tensor] = None, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stored codes (+ scale, + int4 minimum) -> float weights [..., N, K] in ``dtype``.

    int8: ``q`` int8 [..., N, K], ``scale`` [..., N]. int4: ``q`` uint8 [..., N, K/2], ``scale`` and
    ``minimum`` [..., N, G]. Computed in ``dtype`` (codes are exact in bf16: |q| <= 127).
    """
    if q.dtype == torch.int8:
        return q.to(dtype).mul_(scale.to(dtype)[..., None])
    if minimum is None:
        raise ValueError("int4 codes need their group minimums to dequantize")
    codes = unpack_int4(q)  # [..., N, K]
    *lead, rows, cols = codes.shape
    groups = scale.shape[-1]
    w = codes.to(dtype).reshape(*lead, rows, groups, cols // groups)
    w = w.mul_(scale.to(dtype)[..., None]).add_(minimum.to(dtype)[..., None])
    return w.reshape(*lead, rows, cols)


def stored_bytes_per_weight(spec: QuantSpec, cols: int) -> float:
    """Bytes a quantized [N, K=cols] matrix stores per weight, scales included."""
    if spec.scheme == "int8":
        return 1 + SCALE_DTYPE.itemsize / cols
    return 0.5 + 2 * SCALE_DTYPE.itemsize / spec.group_size  # type: ignore[operator]


def check_can_quantize(spec: Optional[QuantSpec], *, source_manifest: Optional[Mapping[str, Any]], source: str) -> None:
    """``--quantize`` needs float weights: an export that is already quantized is refused."""
    if spec is None:
        return
    already = spec_of(source_manifest)
    if already is not None:
        raise QuantError(
            f"--quantize {spec.scheme}: {source} is already quantized ({already.describe()}); quantize once, "
            "from the unquantized model (export again from it), or export from this one without --quantize"
        )


# ---- bytes (nllb-prune plan) -------------------------------------------------------------------------
def matrix_bytes(spec: QuantSpec, *, rows: int, cols: int) -> int:
    """Stored bytes of one quantized [rows, cols] weight: codes + fp32 scales (+ int4 minimums)."""
    spec.check_width(f"a [{rows}, {cols}] weight", cols)
    if spec.scheme == "int8":
        return rows * cols + rows * SCALE_DTYPE.itemsize
    return rows * cols // 2 + 2 * rows * (cols // spec.group_size) * SCALE_DTYPE.itemsize  # type: ignore[operator]


def expert_bytes(topology: Any, spec: QuantSpec, itemsize: int) -> int:
    """One expert: fc1 [F, D] and fc2 [D, F] quantized, biases at ``itemsize``."""
    d, f = topology.d_model, topology.ffn_dim
    return matrix_bytes(spec, rows=f, cols=d) + matrix_bytes(spec, rows=d, cols=f) + (f + d) * itemsize


def dense_linears(topology: Any) -> list[tuple[int, int, int]]:
    """``(rows, cols, count)`` of the dense weights ``--quantize-dense`` quantizes: attention projections, dense FFNs."""
    d, f = topology.d_model, topology.ffn_dim
    attentions = topology.encoder_layers + 2 * topology.decoder_layers  # self attention everywhere, cross in the decoder
    dense_ffns = topology.encoder_layers + topology.decoder_layers - topology.num_moe_layers
    return [(d, d, 4 * attentions), (f, d, dense_ffns), (d, f, dense_ffns)]


def dense_saving(topology: Any, spec: QuantSpec, itemsize: int) -> int:
    """Bytes ``spec`` removes from the dense part at ``itemsize`` (0 unless it targets the dense layers)."""
    if not spec.dense:
        return 0
    return sum(count * (rows * cols * itemsize - matrix_bytes(spec, rows=rows, cols=cols)) for rows, cols, count in dense_linears(topology))


def dequantization_bytes(topology: Any, itemsize: int) -> int:
    """The transient of the loop dispatch and of a quantized dense layer: a dequantized [F, D] matrix, two alive at most."""
    return 2 * topology.ffn_dim * topology.d_model * itemsize
