"""``pruning_manifest.json``: what a pruned export holds and which experts each direction may use.

Written by :mod:`pruning.export` into every export; read back by :func:`pruning.load_model` (as
``model.manifest``) and by :meth:`pruning.model.build.NllbMoeForPruning.set_direction`. Fields (format version 1):

* ``format``, ``format_version``, ``created_by`` (``nllb-prune <version>``);
* ``topology``: the *unpruned* model's shape (:meth:`Topology.to_dict`): global expert ids stay those
  of the full model (the paper's convention), so an export's ids can be compared with any index;
* ``dtype``: storage dtype of the weights (routers are always fp32);
* ``experts``: ``{"encoder.3": [expert indices], ...}`` the experts held per MoE layer, sorted; the
  router of each layer stores exactly these rows, in this order;
* ``num_experts_kept``: their total;
* ``directions``: ``{"src-tgt": [global ids]}`` the experts each exported direction routes over
  (a subset of ``experts``); ``{"*": [...]}`` when one list serves every direction;
* ``languages``: the languages of the directions, sorted;
* ``index``: ``{"file": name, "sha256": digest of the file's bytes, "kind": "all"|"pair"|"lang"}``
  of the expert index the export was cut from (``file`` is a base name: no source paths);
* ``selection``: what the caller recorded about how the index was chosen (``nllb-prune prune``: the
  selection flags and the statistics file's name and sha256); ``{}`` when unknown;
* ``weights``: ``{shard file name: sha256}``, so the manifest's own digest identifies the weights;
* ``policy`` (format version 2; absent in version 1 = ``{"name": "drop"}``): the treatment of pruned
  experts chosen at export (:mod:`pruning.policy`). ``{"name": "drop"}`` (the paper's: router rows
  removed; written with format version 1, as before) or, for ``skip`` / ``substitute`` / ``merge`` (format
  version 2), ``name``, ``statistics`` (substitute, merge: file name, sha256, the directions summed per side),
  ``frequency`` (merge: ``"routed"`` or ``"top1+top2"``) and ``layers``:
  ``{"encoder.3": {"rows": [pruned ids], "to": [kept id | null], ...}}``: the router of that layer
  stores the kept experts' rows (``experts``), then one row per ``rows`` entry; ``to`` is the kept
  expert serving that row (merge) or null: the row's assignments add the next row of the layer's
  ``constant_outputs`` tensor [P, D] (substitute). Merge layers also record ``by`` per row (``"coact"``
  or ``"router"``: how the kept expert was chosen); substitute layers ``never_routed``.
* ``quantization`` (format version 3; absent or null: float weights): ``{"scheme": "int8"|"int4",
  "group_size": null|int, "targets": ["experts"(, "dense")], "scale_dtype": "float32", "format": the
  dequantization formula}`` (:mod:`pruning.quant`): which weights are stored as codes with fp32
  ``X.weight_scale`` (and int4 ``X.weight_min``) beside them. ``dtype`` is then the dtype of the rest.

Nothing in it depends on the source checkpoint's layout or path: exports of one index from the
fairseq and the HF layout of the same model are byte-identical, manifest included.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch

from pruning.atomic import write_text
from pruning.data.directions import ANY_DIRECTION, Side, direction_key, split_direction
from pruning.errors import UserError
from pruning.topology import Topology

MANIFEST_NAME = "pruning_manifest.json"
FORMAT = "nllb-prune/export"
FORMAT_VERSION = 3
"""Highest version read; an export without a pruned-expert policy (``drop``) is still written as 1, one with
a policy as 2, a quantized one as 3 (so that a toolkit that cannot dequantize refuses it by its version)."""
DROP = "drop"

LayerExperts = dict[tuple[Side, int], list[int]]


class ManifestError(UserError):
    """An export's manifest is malformed, or does not serve the requested direction."""


# ---- names ---------------------------------------------------------------------------------------
def layer_name(side: str, layer: int) -> str:
    return f"{side}.{layer}"


def parse_layer_name(name: str) -> tuple[Side, int]:
    match = re.fullmatch(r"(encoder|decoder)\.(\d+)", name)
    if match is None:
        raise ManifestError(f"manifest layer key {name!r} is not of the form 'encoder.N' or 'decoder.N'")
    return match.group(1), int(match.group(2))  # type: ignore[return-value]


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key that orders numbers by value: ``layers.3`` before ``layers.11``, ``expert_2`` before ``expert_10``."""
    return tuple((1, int(part)) if part.isdigit() else (0, part) for part in re.split(r"(\d+)", name))


# ---- digests -------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike[str], *, chunk: int = 2**24) -> str:
    """Hex sha256 of a file, read in chunks (never the whole file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---- writing -------------------------------------------------------------------------------------
def dumps(manifest: Mapping[str, Any]) -> str:
    """Deterministic JSON: keys in natural order (``encoder.3`` before ``encoder.11``), 2-space indent,
    lists of scalars on one line."""
    return _dump(manifest, 0) + "\n"


def _dump(value: Any, depth: int) -> str:
    pad, inner = "  " * depth, "  " * (depth + 1)
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        items = [f"{inner}{json.dumps(str(k), ensure_ascii=False)}: {_dump(value[k], depth + 1)}" for k in sorted(value, key=lambda k: natural_key(str(k)))]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, (list, tuple)):
        if all(not isinstance(v, (Mapping, list, tuple)) for v in value):
            return json.dumps(list(value), ensure_ascii=False)
        return "[\n" + ",\n".join(inner + _dump(v, depth + 1) for v in value) + "\n" + pad + "]"
    return json.dumps(value, ensure_ascii=False, default=str)


def write_manifest(directory: str | os.PathLike[str], manifest: Mapping[str, Any]) -> Path:
    """Write ``directory/pruning_manifest.json`` through a temporary name and a rename."""
    return write_text(Path(directory) / MANIFEST_NAME, dumps(manifest))


def build_manifest(
    *,
    topology: Topology,
    dtype: torch.dtype,
    union: LayerExperts,
    directions: Mapping[str, Iterable[int]],
    index_info: Mapping[str, Any],
    selection: Optional[Mapping[str, Any]],
    weights: Mapping[str, str],
    version: str,
    policy: Optional[Mapping[str, Any]] = None,
    quantization: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    langs = sorted({lang for key in directions if key != ANY_DIRECTION for lang in split_direction(key)})
    policy = dict(policy or {"name": DROP})
    version = 3 if quantization else 1 if policy["name"] == DROP else 2
    return {
        "format": FORMAT,
        "format_version": version,
        "created_by": f"nllb-prune {version}",
        "topology": topology.to_dict(),
        "dtype": str(dtype).replace("torch.", ""),
        "experts": {layer_name(side, layer): sorted(ids) for (side, layer), ids in union.items()},
        "num_experts_kept": sum(len(ids) for ids in union.values()),
        "directions": {key: sorted(ids) for key, ids in sorted(directions.items())},
        "languages": langs,
        "index": dict(index_info),
        "selection": dict(selection or {}),
        "weights": dict(sorted(weights.items())),
        "policy": policy,
        **({"quantization": dict(quantization)} if quantization else {}),
    }


# ---- reading -------------------------------------------------------------------------------------
def read_manifest(directory: str | os.PathLike[str]) -> Optional[dict[str, Any]]:
    """The manifest of an export directory, or None when there is none (a full model)."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not a readable JSON manifest ({exc})") from exc
    check_manifest(data, what=str(path))
    return data


def check_manifest(data: Any, *, what: str = MANIFEST_NAME) -> None:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ManifestError(f"{what}: not an nllb-prune export manifest (format {found!r}, expected {FORMAT!r})")
    version = data.get("format_version", -1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ManifestError(f"{what}: 'format_version' must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ManifestError(f"{what}: format version {data['format_version']}, this toolkit reads <= {FORMAT_VERSION}")
    for key in ("topology", "experts", "directions"):
        if not isinstance(data.get(key), dict):
            raise ManifestError(f"{what}: missing or malformed {key!r}")
    try:
        manifest_topology(data)
    except (UserError, TypeError, ValueError) as exc:
        raise ManifestError(f"{what}: malformed 'topology' ({exc})") from None
    for key in ("experts", "directions"):
        for name, ids in data[key].items():
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ManifestError(f"{what}: {key}[{name!r}] must be a list of expert ids (integers >= 0), got {str(ids)[:60]}")
    layers = [*data["experts"], *_policy_layer_names(data.get("policy"))]
    bad = [name for name in layers if not re.fullmatch(r"(encoder|decoder)\.\d+", str(name))]
    if bad:
        raise ManifestError(f"{what}: layer key(s) {bad[:4]} are not of the form 'encoder.N' or 'decoder.N'")
    _check_policy(data.get("policy"), what=what)
    if data.get("quantization") is not None:
        from pruning.quant import QuantError, spec_of

        try:
            spec_of(data)
        except QuantError as exc:
            raise ManifestError(f"{what}: {exc}") from None


def _policy_layer_names(policy: Any) -> list[str]:
    layers = policy.get("layers") if isinstance(policy, dict) else None
    return list(layers) if isinstance(layers, dict) else []


def _check_policy(policy: Any, *, what: str) -> None:
    if policy is None:
        return
    if not isinstance(policy, dict) or not isinstance(policy.get("name", DROP), str):
        raise ManifestError(f"{what}: 'policy' must be an object with a 'name', got {str(policy)[:60]}")
    if policy.get("name", DROP) == DROP:
        return
    layers = policy.get("layers")
    if not isinstance(layers, dict):
        raise ManifestError(f"{what}: policy {policy['name']!r} has no 'layers' object")
    for name, entry in layers.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("rows", []), list) or not isinstance(entry.get("to", []), list):
            raise ManifestError(f"{what}: policy layer {name!r} must be an object with lists 'rows' and 'to', got {str(entry)[:60]}")


def policy_name(manifest: Optional[Mapping[str, Any]]) -> str:
    """``drop`` | ``substitute`` | ``merge`` (``drop`` for a full model and for version-1 manifests)."""
    if not manifest:
        return DROP
    return str(dict(manifest.get("policy") or {}).get("name", DROP))


def policy_layers(manifest: Optional[Mapping[str, Any]]) -> dict[tuple[Side, int], tuple[list[int], list[Optional[int]]]]:
    """``{(side, layer): (extra row ids, serving kept id or None)}`` of a substitute/merge export; {} otherwise."""
    if policy_name(manifest) == DROP:
        return {}
    layers = manifest["policy"].get("layers")  # type: ignore[index]
    if not isinstance(layers, Mapping):
        raise ManifestError(f"manifest policy {policy_name(manifest)!r} has no 'layers' mapping")
    out = {}
    for name, entry in layers.items():
        rows, to = list(entry.get("rows", [])), list(entry.get("to", []))
        if len(rows) != len(to):
            raise ManifestError(f"manifest policy layer {name!r}: {len(rows)} 'rows' but {len(to)} 'to' entries")
        out[parse_layer_name(name)] = ([int(r) for r in rows], [None if t is None else int(t) for t in to])
    return out


def constant_outputs_key(side: str, layer: int) -> str:
    """Canonical name of a substitute layer's [P, D] mean outputs (``...ffn.constant_outputs``)."""
    return f"{side}.layers.{layer}.ffn.constant_outputs"


def policy_tensor_shapes(manifest: Optional[Mapping[str, Any]], config: Any) -> dict[str, tuple[int, ...]]:
    """Shapes a substitute/merge export's routers ([kept + extra rows, D]) and constant outputs ([P, D]) have."""
    out: dict[str, tuple[int, ...]] = {}
    for (side, layer), (rows, to) in policy_layers(manifest).items():
        kept = len(manifest["experts"].get(layer_name(side, layer), []))  # type: ignore[index]
        out[f"{side}.layers.{layer}.ffn.router.classifier.weight"] = (kept + len(rows), config.d_model)
        constants = sum(t is None for t in to)
        if constants:
            out[constant_outputs_key(side, layer)] = (constants, config.d_model)
    return out


def manifest_topology(manifest: Mapping[str, Any]) -> Topology:
    return Topology.from_dict(dict(manifest["topology"]))


def direction_experts(manifest: Mapping[str, Any], src: str, tgt: str) -> LayerExperts:
    """``{(side, layer): sorted expert indices}`` that direction ``src-tgt`` routes over."""
    directions = manifest["directions"]
    key = direction_key(src, tgt)
    if key in directions:
        ids = directions[key]
    elif ANY_DIRECTION in directions:
        ids = directions[ANY_DIRECTION]
    else:
        known = sorted(directions)
        shown = ", ".join(known[:20]) + (f" ... ({len(known)} in all)" if len(known) > 20 else "")
        raise ManifestError(
            f"direction {key!r} is not served by this export; it serves: {shown} (export again with the directions you need, e.g. --langs {src},{tgt})"
        )
    topology = manifest_topology(manifest)
    out: LayerExperts = {(side, layer): [] for _, side, layer in topology.iter_moe_layers()}
    for gid in ids:
        ref = topology.expert_ref(int(gid))
        out[(ref.side, ref.layer)].append(ref.expert)
    return {key: sorted(value) for key, value in out.items()}
