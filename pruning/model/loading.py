"""``load_model``: build on the meta device, then fill from a checkpoint reader, one tensor at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from pruning.checkpoint import keymap
from pruning.checkpoint.reader import CheckpointReader, open_checkpoint
from pruning.checkpoint.tokenizer import load_tokenizer
from pruning.checkpoint.torch_zip import CheckpointError
from pruning.model.build import ExpertSelection, LayerExtraRows, NllbMoeForPruning, build_empty_model, full_selection
from pruning.model.moe import ExtraRows
from pruning.quant import spec_of

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_dtype(dtype: Any) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise CheckpointError(f"--dtype must be one of {sorted(set(DTYPES))}, got {dtype!r}") from None


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(str(device))
    return torch.device(device)


def check_device(device: str, *, flag: str = "--device") -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, and a CUDA device only where this torch sees one."""
    from pruning.config import ConfigError

    index = device.partition(":")[2] if device.startswith("cuda:") else None
    if device not in ("auto", "cpu", "cuda") and not (index is not None and index.isdigit()):
        raise ConfigError(f"{flag} must be auto, cpu, cuda or cuda:N, got {device!r}")
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, but no GPU is visible"
        raise ConfigError(f"{flag} {device}: this torch {torch.__version__} is {build}; use {flag} cpu (or auto)")
    if index is not None and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"{flag} {device}: only {torch.cuda.device_count()} CUDA device(s) are visible (cuda:0..cuda:{torch.cuda.device_count() - 1})")


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: Any = None,
    *,
    experts: Optional[ExpertSelection] = None,
    dispatch: str = "auto",
    progress: bool = False,
) -> NllbMoeForPruning:
    """Load an NLLB-MoE model from an HF-layout directory, a fairseq checkpoint or an export.

    ``experts`` keeps a subset per MoE layer ((side, layer) -> expert indices); the router keeps only
    their rows. ``dtype`` None keeps the checkpoint's. ``dispatch`` picks the expert dispatch
    (``auto``: grouped GEMM where supported, else the sorted per-expert loop). The tokenizer, if
    found, is ``model.tokenizer``. An export made with ``--policy substitute|merge`` is loaded with
    its pruned experts' router rows and their treatment (its manifest's ``policy``); it loads whole
    (``experts`` must be None or everything it holds). A quantized export (``export --quantize``) keeps
    its codes and fp32 scales in memory (:mod:`pruning.model.quantized`); ``dtype`` is the compute dtype.
    """
    reader = open_checkpoint(path)
    tokenizer = load_tokenizer(reader.tokenizer_dir) if reader.tokenizer_dir else None  # a bad tokenizer fails before the weights load
    available = reader.present_experts()
    selection = experts if experts is not None else (available or full_selection(reader.topology))
    _check_selection(selection, available, reader)
    extra = policy_extra_rows(reader)
    if extra and selection != available:
        raise CheckpointError(
            f"{reader.path} is a --policy {reader.manifest['policy']['name']} export: it loads with all the experts it holds "  # type: ignore[index]
            "(an expert subset or --expert-parallel > 1 is only possible for --policy drop exports)"
        )
    target_dtype = parse_dtype(dtype) or reader.dtype
    model = build_empty_model(
        reader.config, experts=selection, extra_rows=extra, dtype=target_dtype, device=resolve_device(device), quantization=spec_of(reader.manifest)
    )
    fill_weights(model, reader, progress=progress)
    try:
        model.set_dispatch(dispatch)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    model.tokenizer = tokenizer
    model.source_path = str(path)
    model.source_layout = reader.layout
    model.manifest = reader.manifest
    return model


def policy_extra_rows(reader: CheckpointReader) -> LayerExtraRows:
    """Router rows of pruned experts that an export's ``policy`` keeps, per layer ({} for drop / full models)."""
    from pruning.manifest import policy_layers

    return {slot: ExtraRows(tuple(rows), tuple(to)) for slot, (rows, to) in policy_layers(reader.manifest).items() if rows}


def _check_selection(selection: ExpertSelection, available: dict[tuple[str, int], list[int]], reader: CheckpointReader) -> None:
    topology = reader.topology
    for _, side, layer in topology.iter_moe_layers():
        wanted = selection.get((side, layer))
        if wanted is None:
            raise CheckpointError(f"expert selection has no entry for {side} layer {layer}")
        if not wanted:
            raise CheckpointError(f"expert selection keeps no expert in {side} layer {layer}")
        lacking = sorted(set(wanted) - set(available.get((side, layer), [])))
        if lacking:
            raise CheckpointError(
                f"{reader.path}: the selection asks for expert(s) {lacking[:10]} of {side} layer {layer}, "
                f"which the checkpoint does not hold (it has {len(available.get((side, layer), []))} experts there)"
            )


def fill_weights(model: NllbMoeForPruning, reader: CheckpointReader, *, progress: bool = False) -> None:
    """Copy every needed checkpoint tensor into ``model``; check shapes; require every parameter filled."""
    params = dict(model.model.named_parameters(remove_duplicate=False))
    local_index = {(side, layer): {e: i for i, e in enumerate(moe.expert_ids)} for side, layer, moe in model.moe_layers()}
    present = reader.present_experts()
    filled: set[str] = set()
    entries = list(reader.entries())
    with torch.no_grad():
        for entry in tqdm(entries, desc="loading", unit="tensor", disable=not progress):
            expert = keymap.parse_expert_key(entry.name)
            router = keymap.parse_router_key(entry.name)
            if expert is not None:
                local = local_index[(expert.side, expert.layer)].get(expert.expert)
                if local is None:
                    continue  # pruned away: never read
                moe = model.moe_layer(expert.side, expert.layer)
                dest_name = f"{expert.linear}_{expert.kind}"
                dest = getattr(moe.experts, dest_name)[local]
                _copy(dest, entry, reader)
                filled.add(f"{expert.side}.{expert.layer}.{dest_name}.{local}")
            elif router is not None:
                moe = model.moe_layer(*router)
                source = entry.tensor.load()
                # Router rows follow the experts the checkpoint holds (all of them, or an export's kept ones),
                # then a policy export's rows of pruned experts (the model's extra rows, in the same order).
                held = [*present[router], *moe.extra_rows.ids]
                if source.shape[0] != len(held):
                    raise CheckpointError(
                        f"{entry.file}: router {entry.source_key} has {source.shape[0]} rows but the checkpoint "
                        f"holds {len(held)} experts (and policy rows) for that layer"
                    )
                row_of = {e: i for i, e in enumerate(held)}
                rows = torch.tensor([row_of[e] for e in moe.router_ids], dtype=torch.long)
                _copy(moe.router.weight, entry, reader, tensor=source[rows])
                filled.add(entry.name)
            else:
                if entry.name not in params:
                    raise CheckpointError(f"{entry.file}: tensor {entry.source_key!r} ({entry.name}) has no place in the model")
                _copy(params[entry.name], entry, reader)
                filled.add(entry.name)
    _check_filled(model, filled, reader)
    model.tie_weights()


def _copy(dest: torch.Tensor, entry: Any, reader: CheckpointReader, *, tensor: Optional[torch.Tensor] = None) -> None:
    source = entry.tensor.load() if tensor is None else tensor
    if tuple(source.shape) != tuple(dest.shape):
        raise CheckpointError(
            f"{entry.file}: tensor {entry.source_key!r} has shape {tuple(source.shape)}, the model built from "
            f"{reader.path}'s config expects {tuple(dest.shape)}"
        )
    dest.copy_(source)


def _check_filled(model: NllbMoeForPruning, filled: set[str], reader: CheckpointReader) -> None:
    expected: set[str] = set()
    for name, _ in model.model.named_parameters(remove_duplicate=True):
        if ".ffn.experts." in name or name.endswith("ffn.router.weight"):
            continue
        expected.add(name)
    for side, layer, moe in model.moe_layers():
        expected.add(keymap.router_key(side, layer))
        for dest, _ in moe.experts.named_parameters():  # fc1/fc2 weight and bias (and a quantized export's scales)
            expected.update(f"{side}.{layer}.{dest}.{i}" for i in range(len(moe.expert_ids)))
    missing = sorted(expected - filled)
    if missing:
        raise CheckpointError(f"{reader.path}: {len(missing)} model parameter(s) were not in the checkpoint: {missing[:10]}")
