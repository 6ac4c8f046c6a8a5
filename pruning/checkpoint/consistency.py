"""``config.json`` against the tensors: every field the weights can contradict, checked when a checkpoint opens.

The reader already checks each tensor's shape against the config (``d_model``, the FFN widths,
``vocab_size``, the router rows) and the tensor names against the layers the config implies
(``encoder_layers``, ``decoder_layers``, the sparse steps). This module adds what those checks miss:

* the config's values have the types and ranges a model needs (``num_experts: "sixteen"``, a width of 0,
  a special token id beyond the vocabulary, attention heads that do not divide ``d_model``), read from
  the raw JSON, every problem in one message;
* ``num_experts`` against the experts the checkpoint holds: no checkpoint may hold an expert index at or
  beyond ``num_experts``, and a checkpoint without a pruning manifest must hold experts
  ``0 .. num_experts-1`` in every MoE layer (else a 16-expert model with ``num_experts: 32`` would pass
  for a pruned one, and its "50% pruned" export would keep everything);
* an export's manifest against the config (the same unpruned topology) and against the experts its
  shards hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pruning.checkpoint.torch_zip import CheckpointError

INTEGER_FIELDS: dict[str, int] = {
    "vocab_size": 1,
    "d_model": 1,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_ffn_dim": 1,
    "decoder_ffn_dim": 1,
    "encoder_attention_heads": 1,
    "decoder_attention_heads": 1,
    "num_experts": 1,
    "encoder_sparse_step": 0,
    "decoder_sparse_step": 0,
    "max_position_embeddings": 1,
}
"""Integer fields of an NLLB-MoE config and their smallest valid value (a sparse step of 0: no MoE layer)."""
TOKEN_ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")
"""Ids of rows of the token embedding: integers below ``vocab_size``."""
NUMBER_FIELDS = ("moe_token_dropout", "moe_eval_capacity_token_fraction")


def check_config_data(data: Any, *, path: Path) -> None:
    """Raise :class:`CheckpointError` listing every field of ``data`` (a parsed config.json) of the wrong type or range."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object of config keys, found a JSON {type(data).__name__}")
    problems = []
    for name, smallest in INTEGER_FIELDS.items():
        if name in data and not (_is_int(data[name]) and data[name] >= smallest):
            problems.append(f"{name} must be an integer >= {smallest}, got {data[name]!r}")
    vocab = data.get("vocab_size")
    for name in TOKEN_ID_FIELDS:
        value = data.get(name)
        if value is None:
            continue
        if not _is_int(value) or value < 0 or (_is_int(vocab) and value >= vocab):
            problems.append(f"{name} must be a token id in 0..vocab_size-1 ({vocab!r}), got {value!r}")
    for name in NUMBER_FIELDS:
        if name in data and not (isinstance(data[name], (int, float)) and not isinstance(data[name], bool)):
            problems.append(f"{name} must be a number, got {data[name]!r}")
    for side in ("encoder", "decoder"):
        heads, width = data.get(f"{side}_attention_heads"), data.get("d_model")
        if isinstance(heads, int) and isinstance(width, int) and _is_int(heads) and _is_int(width) and heads >= 1 and width % heads:
            problems.append(f"{side}_attention_heads ({heads}) must divide d_model ({width})")
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_experts(reader: Any) -> None:
    """``num_experts`` (and an export's manifest) against the experts ``reader``'s checkpoint holds."""
    topology = reader.topology
    num_experts = topology.num_experts
    present = reader.present_experts()
    where = _config_file(reader)
    beyond = [(side, layer, ids[-1]) for (side, layer), ids in present.items() if ids and ids[-1] >= num_experts]
    if beyond:
        largest = max(top for _, _, top in beyond)
        layers = ", ".join(f"{side} layer {layer}" for side, layer, _ in beyond[:4]) + (" ..." if len(beyond) > 4 else "")
        wanted = f"{largest + 1}" if reader.manifest is None else f"at least {largest + 1}"
        raise CheckpointError(
            f"{where}: num_experts is {num_experts}, but the weights hold experts up to index {largest} in {layers}; "
            f"set num_experts to {wanted} (the experts per MoE layer of the unpruned model)"
        )
    if reader.manifest is None:
        _check_full(present, topology, where=where)
    else:
        _check_manifest(reader.manifest, present, topology, where=Path(reader.path) / "pruning_manifest.json")


def _check_full(present: dict[tuple[str, int], list[int]], topology: Any, *, where: str) -> None:
    everything = list(range(topology.num_experts))
    short = {
        (side, layer): len(present.get((side, layer), [])) for _, side, layer in topology.iter_moe_layers() if present.get((side, layer), []) != everything
    }
    if not short:
        return
    held = sorted(set(short.values()))
    layers = ", ".join(f"{side} layer {layer}" for side, layer in list(short)[:4]) + (" ..." if len(short) > 4 else "")
    hint = f"; set num_experts to {held[0]}" if len(held) == 1 and held[0] and len(short) == topology.num_moe_layers else ""
    raise CheckpointError(
        f"{where}: num_experts is {topology.num_experts}, but the weights hold {' or '.join(map(str, held))} expert(s) in {layers}; "
        f"a checkpoint without a pruning manifest must hold experts 0..{topology.num_experts - 1} in every MoE layer{hint}"
    )


def _check_manifest(manifest: dict[str, Any], present: dict[tuple[str, int], list[int]], topology: Any, *, where: Path) -> None:
    from pruning.manifest import layer_name, manifest_topology

    exported = manifest_topology(manifest)
    mine, theirs = topology.routing_shape(), exported.routing_shape()
    diffs = [f"{key} {theirs[key]} in the manifest, {mine[key]} in config.json" for key in mine if mine[key] != theirs[key]]
    if diffs:
        raise CheckpointError(f"{where}: the manifest and config.json describe different models ({'; '.join(diffs)})")
    wrong = []
    for _, side, layer in topology.iter_moe_layers():
        listed = sorted(int(e) for e in manifest["experts"].get(layer_name(side, layer), []))
        held = present.get((side, layer), [])
        if listed != held:
            wrong.append(f"{side} layer {layer}: manifest {listed[:8]}, weights {held[:8]}")
    if wrong:
        raise CheckpointError(f"{where}: 'experts' does not list the experts the weights hold ({'; '.join(wrong[:4])})")


def _config_file(reader: Any) -> str:
    path = Path(reader.path)
    return str(path / "config.json") if path.is_dir() else str(path)
