"""``nllb-prune info``: what a checkpoint holds, without loading its weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pruning.checkpoint import keymap
from pruning.checkpoint.reader import open_checkpoint
from pruning.topology import gib


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def describe_checkpoint(path: str | Path) -> dict[str, Any]:
    """Layout, topology, dtype, parameter and byte counts (dense, experts, per MoE layer)."""
    from pruning.quant import is_companion, spec_of

    reader = open_checkpoint(path)
    topology = reader.topology
    quantization = spec_of(reader.manifest)
    dense_params = expert_params = dense_bytes = expert_bytes = 0
    per_layer: dict[str, dict[str, int]] = {}
    for entry in reader.entries():
        stored = _numel(tuple(entry.tensor.shape))
        nbytes = stored * entry.tensor.dtype.itemsize
        n = stored  # parameters: a quantized weight's codes count as the weights they stand for, its scales as none
        if quantization is not None and is_companion(entry.name):
            n = 0
        elif quantization is not None and quantization.applies(entry.name):
            n = quantization.logical_numel(tuple(entry.tensor.shape))
        expert = keymap.parse_expert_key(entry.name)
        if expert is None:
            dense_params += n
            dense_bytes += nbytes
            continue
        expert_params += n
        expert_bytes += nbytes
        slot = per_layer.setdefault(f"{expert.side}.{expert.layer}", {"experts": 0, "params": 0, "bytes": 0})
        slot["params"] += n
        slot["bytes"] += nbytes
    for (side, layer), experts in reader.present_experts().items():
        per_layer[f"{side}.{layer}"]["experts"] = len(experts)
    return {
        "path": str(path),
        "layout": reader.layout,
        "files": len(reader.files),
        "dtype": str(reader.dtype).replace("torch.", ""),
        "topology": topology.to_dict(),
        "moe_layers": {side: list(topology.moe_layers(side)) for side in ("encoder", "decoder")},  # type: ignore[arg-type]
        "experts_kept": sum(v["experts"] for v in per_layer.values()),
        "experts_total": topology.num_total_experts,
        "params": {"dense": dense_params, "experts": expert_params, "total": dense_params + expert_params},
        "bytes": {"dense": dense_bytes, "experts": expert_bytes, "total": dense_bytes + expert_bytes},
        "per_moe_layer": per_layer,
        "tokenizer": str(reader.tokenizer_dir) if reader.tokenizer_dir else None,
        "manifest": reader.manifest,
        "quantization": quantization.record() if quantization else None,
    }


def format_description(info: dict[str, Any]) -> str:
    t = info["topology"]
    lines = [
        f"checkpoint   {info['path']}",
        f"layout       {info['layout']} ({info['files']} weight file(s)), dtype {info['dtype']}",
        f"topology     {t['encoder_layers']}+{t['decoder_layers']} layers, d_model {t['d_model']}, ffn {t['ffn_dim']}, "
        f"vocab {t['vocab_size']}, {t['num_experts']} experts per MoE layer",
        f"MoE layers   encoder {info['moe_layers']['encoder']}, decoder {info['moe_layers']['decoder']}",
        f"experts      {info['experts_kept']} of {info['experts_total']} held",
        f"params       dense {info['params']['dense'] / 1e6:,.2f}M + experts {info['params']['experts'] / 1e6:,.2f}M = {info['params']['total'] / 1e6:,.2f}M",
        f"bytes        dense {gib(info['bytes']['dense']):.3f} GiB + experts {gib(info['bytes']['experts']):.3f} GiB = {gib(info['bytes']['total']):.3f} GiB",
    ]
    if info.get("quantization"):
        from pruning.quant import QuantSpec

        lines.append(f"quantized    {QuantSpec.from_record(info['quantization']).describe()}; other tensors {info['dtype']}, routers fp32")
    lines.append("per MoE layer (experts, params):")

    def layer_order(name: str) -> tuple[int, int]:
        side, layer = name.split(".")
        return (0 if side == "encoder" else 1, int(layer))

    for name in sorted(info["per_moe_layer"], key=layer_order):
        slot = info["per_moe_layer"][name]
        lines.append(f"  {name:<12} {slot['experts']:>4}  {slot['params'] / 1e6:,.2f}M")
    lines.append(f"tokenizer    {info['tokenizer'] or 'not found'}")
    if info.get("manifest"):
        lines.extend(_manifest_lines(info["manifest"]))
    return "\n".join(lines)


def _manifest_lines(manifest: dict[str, Any]) -> list[str]:
    """An export's manifest: the directions it serves and the experts each one routes over."""
    directions = manifest.get("directions") or {}
    lines = [f"pruned       {manifest.get('num_experts_kept', '?')} experts kept ({manifest.get('created_by', 'unknown tool')})"]
    index = manifest.get("index") or {}
    if index:
        lines.append(f"index        {index.get('file')} ({index.get('kind')}, sha256 {str(index.get('sha256'))[:16]})")
    selection = manifest.get("selection") or {}
    if isinstance(selection.get("options"), dict):
        options = " ".join(
            f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in sorted(selection["options"].items()) if v not in (None, [], "")
        )
        lines.append(f"selection    {selection.get('command', '?')}: {options}")
    elif selection:
        lines.append(f"selection    {', '.join(f'{k}={v}' for k, v in sorted(selection.items()))}")
    stats = selection.get("statistics") if isinstance(selection.get("statistics"), dict) else None
    if stats:
        lines.append(f"statistics   {stats.get('file')} (sha256 {str(stats.get('sha256'))[:16]})")
    from pruning.export import policy_summary

    lines.append(f"pruned as    {policy_summary(manifest)}")
    lines.append(f"directions   {len(directions)} (experts each routes over):")
    for key in sorted(directions)[:40]:
        lines.append(f"  {'any direction' if key == '*' else key:<24} {len(directions[key])}")
    if len(directions) > 40:
        lines.append(f"  ... and {len(directions) - 40} more")
    return lines
