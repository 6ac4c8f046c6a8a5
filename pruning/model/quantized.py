"""Quantized weights in the model: stacked experts and dense linear layers that store codes + fp32 scales.

Formats: :mod:`pruning.quant`. Dimension legend as in :mod:`pruning.model.moe` (E experts, D d_model,
F ffn, N tokens of one expert).

How a quantized matmul runs (:func:`quantized_linear`):

* int8 on CPU with bf16/fp16 activations and at most :data:`KERNEL_MAX_ROWS` tokens: torch's own
  weight-only kernel ``torch._weight_int8pack_mm`` on the stored codes (its layout is ours: int8 [out, in]
  + one scale per output channel); nothing is dequantized (decoding steps: a few tokens per expert);
* otherwise (fp32 activations, int4, CUDA): the matrix is dequantized to the activations' dtype,
  then ``F.linear``. The loop dispatch does this one expert at a time (a transient of one [F, D]
  matrix); the grouped dispatch (:func:`dequantized_grouped_dispatch`) dequantizes the layer's whole
  [E, F, D] stack per call, so ``auto`` picks the loop for quantized experts (``set_dispatch``).

torch's CPU int4 kernel (``torch._weight_int4pack_mm_for_cpu``) needs the weights repacked into a
platform-specific layout, which cannot be dequantized again for the grouped dispatch; it is not
wired in (``experiments/results/quant/README.md`` has its measured speed).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pruning.quant import MINIMUM, SCALE, SCALE_DTYPE, STORAGE, QuantSpec, dequantize

KERNEL_DTYPES = (torch.bfloat16, torch.float16)
"""Activation dtypes for which ``torch._weight_int8pack_mm`` is fast on CPU (fp32 falls back to a slow path)."""


KERNEL_K_MULTIPLE = 16
"""torch 2.13's CPU ``_weight_int8pack_mm`` returns wrong sums (and can crash) when the input width is not a
multiple of 16 (measured: K = 8, 24 wrong; 16, 48, 80, 144 right); such matrices are dequantized instead."""


KERNEL_MAX_ROWS = 64
"""Rows (tokens of one expert) up to which the int8 kernel beats dequantize-then-matmul on CPU. Measured per
[8192, 2048] matrix, bf16, 2 threads, 12 distinct experts (ms): 1 row 1.1 vs 15.5; 16 rows 5.2 vs 20.7;
64 rows 19.1 vs 21.6; 128 rows 37.2 vs 24.1 (the kernel's time grows with the rows, dequantization's barely)."""


def int8_kernel_applies(x: torch.Tensor, q: torch.Tensor) -> bool:
    """Whether :func:`quantized_linear` hands int8 codes straight to ``torch._weight_int8pack_mm``."""
    return (
        q.dtype == torch.int8
        and x.device.type == "cpu"
        and x.dtype in KERNEL_DTYPES
        and x.shape[0] <= KERNEL_MAX_ROWS
        and q.shape[-1] % KERNEL_K_MULTIPLE == 0
        and hasattr(torch, "_weight_int8pack_mm")
    )


def quantized_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, minimum: Optional[torch.Tensor], bias: Optional[torch.Tensor], *, kernel: bool = True
) -> torch.Tensor:
    """``x [N, in] @ dequantize(q, scale, minimum).T + bias`` -> [N, out], in ``x``'s dtype."""
    if kernel and int8_kernel_applies(x, q):
        y = torch._weight_int8pack_mm(x.contiguous(), q, scale.to(x.dtype))  # [N, out]
        return y if bias is None else y + bias.to(y.dtype)
    return F.linear(x, dequantize(q, scale, minimum, dtype=x.dtype), None if bias is None else bias.to(x.dtype))


def _code_param(spec: QuantSpec, rows: int, cols: int, *lead: int) -> nn.Parameter:
    width = cols if spec.scheme == "int8" else cols // 2
    return nn.Parameter(torch.empty(*lead, rows, width, dtype=STORAGE[spec.scheme]), requires_grad=False)


def _scale_param(spec: QuantSpec, rows: int, cols: int, *lead: int) -> nn.Parameter:
    shape = (*lead, rows) if spec.scheme == "int8" else (*lead, rows, cols // spec.group_size)  # type: ignore[operator]
    return nn.Parameter(torch.empty(shape, dtype=SCALE_DTYPE), requires_grad=False)


class _KeepsDtypes(nn.Module):
    """Codes stay integer and scales fp32 when the model is cast (``model.to(torch.bfloat16)``)."""

    fixed_dtypes: dict[str, torch.dtype] = {}
    """Parameter name -> its dtype whatever the model's (read by ``build._materialise`` too)."""

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # The kept values themselves, moved to the new device (a round trip of fp32 scales through bf16 would round them).
        kept = {name: self._parameters[name].data for name in self.fixed_dtypes if self._parameters.get(name) is not None}
        super()._apply(fn, recurse)
        for name, dtype in self.fixed_dtypes.items():
            param = self._parameters.get(name)
            if param is not None and param.dtype != dtype:
                source = kept[name] if kept[name].dtype == dtype else param.data
                param.data = source.to(device=param.device, dtype=dtype)
        return self


class QuantizedStackedExperts(_KeepsDtypes):
    """:class:`~pruning.model.moe.StackedExperts` with quantized weights.

    int8: ``fc1_weight`` int8 [E, F, D], ``fc1_weight_scale`` [E, F]; ``fc2_weight`` int8 [E, D, F],
    ``fc2_weight_scale`` [E, D]. int4: ``fc1_weight`` uint8 [E, F, D/2], ``fc1_weight_scale`` and
    ``fc1_weight_min`` [E, F, D/g]; ``fc2_weight`` uint8 [E, D, F/2], scale and min [E, D, F/g].
    Biases [E, F] / [E, D] in the model dtype. ``kernel`` False forces dequantize-then-matmul.
    """

    def __init__(self, *, num_experts: int, d_model: int, ffn_dim: int, spec: QuantSpec):
        super().__init__()
        self.spec = spec
        self.kernel = True
        shapes = {"fc1": (ffn_dim, d_model), "fc2": (d_model, ffn_dim)}
        fixed: dict[str, torch.dtype] = {}
        for linear, (rows, cols) in shapes.items():
            spec.check_width(f"{linear} of the experts", cols)
            setattr(self, f"{linear}_weight", _code_param(spec, rows, cols, num_experts))
            setattr(self, f"{linear}_weight{SCALE}", _scale_param(spec, rows, cols, num_experts))
            fixed[f"{linear}_weight"], fixed[f"{linear}_weight{SCALE}"] = STORAGE[spec.scheme], SCALE_DTYPE
            if spec.scheme == "int4":
                setattr(self, f"{linear}_weight{MINIMUM}", _scale_param(spec, rows, cols, num_experts))
                fixed[f"{linear}_weight{MINIMUM}"] = SCALE_DTYPE
            setattr(self, f"{linear}_bias", nn.Parameter(torch.empty(num_experts, rows)))
        self.fixed_dtypes = fixed

    @property
    def num_experts(self) -> int:
        return self.fc1_weight.shape[0]

    def _parts(self, linear: str, e: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        q, scale = getattr(self, f"{linear}_weight"), getattr(self, f"{linear}_weight{SCALE}")
        minimum = getattr(self, f"{linear}_weight{MINIMUM}", None)
        if e is None:
            return q, scale, minimum
        return q[e], scale[e], None if minimum is None else minimum[e]

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """x: [N, D] -> [N, D] through expert ``e`` (local index)."""
        h = F.relu(quantized_linear(x, *self._parts("fc1", e), self.fc1_bias[e], kernel=self.kernel))  # [N, F]
        return quantized_linear(h, *self._parts("fc2", e), self.fc2_bias[e], kernel=self.kernel)  # [N, D]

    def dequantized(self, dtype: torch.dtype) -> "DequantizedExperts":
        """Every expert's weights in ``dtype`` at once ([E, F, D] and [E, D, F]: a whole layer's transient)."""
        return DequantizedExperts(
            fc1_weight=dequantize(*self._parts("fc1", None), dtype=dtype),
            fc1_bias=self.fc1_bias.to(dtype),
            fc2_weight=dequantize(*self._parts("fc2", None), dtype=dtype),
            fc2_bias=self.fc2_bias.to(dtype),
        )


@dataclasses.dataclass
class DequantizedExperts:
    """What the grouped dispatch reads of a :class:`~pruning.model.moe.StackedExperts`, as plain tensors."""

    fc1_weight: torch.Tensor
    fc1_bias: torch.Tensor
    fc2_weight: torch.Tensor
    fc2_bias: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.fc1_weight.shape[0]


def dequantized_grouped_dispatch(x: torch.Tensor, routing, experts, observe=None) -> torch.Tensor:  # noqa: ANN001
    """The grouped-GEMM dispatch over quantized experts: dequantize the layer's stack, then two grouped GEMMs."""
    from pruning.model.moe import grouped_mm_dispatch

    return grouped_mm_dispatch(x, routing, experts.dequantized(x.dtype), observe)  # type: ignore[arg-type]


class QuantLinear(_KeepsDtypes):
    """An ``nn.Linear`` whose ``weight`` holds codes, with ``weight_scale`` (and int4 ``weight_min``) beside it."""

    def __init__(self, in_features: int, out_features: int, *, spec: QuantSpec, bias: bool = True, name: str = "linear"):
        super().__init__()
        spec.check_width(name, in_features)
        self.in_features, self.out_features, self.spec, self.kernel = in_features, out_features, spec, True
        self.weight = _code_param(spec, out_features, in_features)
        self.weight_scale = _scale_param(spec, out_features, in_features)
        fixed = {"weight": STORAGE[spec.scheme], "weight_scale": SCALE_DTYPE}
        if spec.scheme == "int4":
            self.weight_min = _scale_param(spec, out_features, in_features)
            fixed["weight_min"] = SCALE_DTYPE
        else:
            self.register_parameter("weight_min", None)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.fixed_dtypes = fixed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = quantized_linear(x.reshape(-1, self.in_features), self.weight, self.weight_scale, self.weight_min, self.bias, kernel=self.kernel)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.describe()}"


def quantize_modules(model: nn.Module, spec: QuantSpec) -> None:
    """Replace (on the meta device, before materialising) the modules ``spec`` quantizes.

    Every MoE layer's experts become :class:`QuantizedStackedExperts`; with ``dense`` targets, every
    ``nn.Linear`` whose canonical weight name ``spec.applies`` to becomes a :class:`QuantLinear`.
    """
    from pruning.model.moe import MoeLayer

    base = getattr(model, "model", model)
    for name, module in list(base.named_modules()):
        if isinstance(module, MoeLayer):
            experts = module.experts
            module.experts = QuantizedStackedExperts(
                num_experts=experts.num_experts, d_model=experts.fc1_weight.shape[2], ffn_dim=experts.fc1_weight.shape[1], spec=spec
            )
        elif isinstance(module, nn.Linear) and spec.applies(f"{name}.weight"):
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name)
            setattr(parent, child, QuantLinear(module.in_features, module.out_features, spec=spec, bias=module.bias is not None, name=name))


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantizedStackedExperts, QuantLinear)) for m in model.modules())


def set_kernel(model: nn.Module, enabled: bool) -> None:
    """Use torch's int8 kernel where it applies (default), or dequantize-then-matmul everywhere (benchmarks, checks)."""
    for module in model.modules():
        if isinstance(module, (QuantizedStackedExperts, QuantLinear)):
            module.kernel = enabled


QUANTIZED_AUTO_REASON = "quantized experts: the loop dequantizes one expert at a time (or runs torch's int8 kernel); grouped would dequantize a whole layer"
