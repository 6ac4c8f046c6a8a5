"""Export a pruned, single-GPU checkpoint: the dense part plus only the experts an index keeps.

Export is :mod:`pruning.checkpoint.convert` with a filter. It reads either checkpoint layout (or an
earlier export) and writes, in the HF layout our readers and ``load_model`` take:

* ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``;
* ``config.json`` (the unpruned model's config: global expert ids keep their meaning, plus the kept
  experts per layer and per direction and an ``auto_map`` for ``trust_remote_code``), tokenizer files;
* ``modeling_nllb_moe_pruned.py``: a self-contained model class, so plain ``transformers`` loads the
  export (``AutoModelForSeq2SeqLM.from_pretrained(dir, trust_remote_code=True)``);
* ``pruning_manifest.json`` (:mod:`pruning.manifest`): the experts held per layer, the experts of each
  exported direction, the index's sha256, the caller's selection record, the shards' sha256.

Routers keep only the kept experts' rows, in increasing expert order (the order of
``manifest["experts"]``), which is how :func:`pruning.model.loading.fill_weights` maps rows to the
experts a checkpoint holds.

``--policy substitute|merge`` (:mod:`pruning.policy`, with ``--stats``) also keeps the pruned experts'
router rows, after the kept ones, and stores their treatment: ``constant_outputs`` tensors
(substitute) or merged kept-expert weights (merge, streamed: a kept expert's tensor is averaged with
the same tensor of the experts folded into it, read one at a time). The manifest's ``policy`` and
config.json's ``pruned_routing`` say which row is served by what.

``--quantize int8|int4`` (:mod:`pruning.quant`; ``--quantize-dense`` adds the dense linear layers)
stores each targeted weight as codes plus fp32 scales, computed from the float weight after any
policy transform (a merged expert is quantized once merged). An export that is already quantized
is carried through as it is (re-exporting a subset with ``--policy drop``) and cannot be quantized again.

Several directions (``--langs`` / ``--pairs``) keep the union of their experts; at translation time
``model.set_direction`` (:mod:`pruning.model.build`) routes each direction over its own experts only, so one GPU
serves them all without reloading.

Determinism: tensors are written in a fixed order of their canonical names (natural sort: layer 3
before layer 11), the config carries no source path and the manifest nothing layout-specific, so
the same index exported from the fairseq and the HF layout of one model gives byte-identical files.

Memory: pruned experts are never read (skipped before loading). Every output tensor's name, shape and
dtype is known before the first is loaded, so each shard's header is written first and each tensor
goes to disk as soon as it is produced (:class:`~pruning.checkpoint.writer.ShardWriter`); source
tensors are mapped from their files, not copied. Peak anonymous memory is the tensor being cast (and
a merge's running sum, and a quantized tensor's fp32 copy and codes), whatever the shard size (``max_shard_bytes``, default 4 GiB). The output is
written to a temporary sibling directory and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from pruning.checkpoint import keymap
from pruning.checkpoint.convert import copy_tokenizer, stream_entries, write_config
from pruning.checkpoint.reader import CheckpointReader, Entry, open_checkpoint
from pruning.checkpoint.writer import DEFAULT_SHARD_BYTES, atomic_directory
from pruning.data.directions import ANY_DIRECTION, Direction, direction_key
from pruning.data.languages import check_code_form
from pruning.errors import UserError
from pruning.index import ExpertIndex, LayerExperts, experts_for_direction, read_index, validate_index, write_index
from pruning.manifest import (
    DROP,
    build_manifest,
    layer_name,
    natural_key,
    policy_name,
    sha256_file,
    write_manifest,
)
from pruning.quant import QuantSpec, check_can_quantize, quantize, spec_of
from pruning.topology import Topology

Pair = tuple[str, str]
"""A direction as (src, tgt), as callers pass it; :class:`pruning.data.directions.Direction` parses and formats it."""
CONFIG_DROP_KEYS = ("_name_or_path", "_commit_hash")
"""Config keys that would tie an export to where its source was read from."""
REMOTE_CODE = Path(__file__).parent / "model" / "remote" / "modeling_nllb_moe_pruned.py"
"""Shipped in every export: lets plain ``transformers`` load it with ``trust_remote_code=True``."""
AUTO_MAP = {"AutoModelForSeq2SeqLM": f"{REMOTE_CODE.stem}.NllbMoePrunedForConditionalGeneration"}


class ExportError(UserError):
    """An export request cannot be met: unknown directions, experts the model lacks, bad flags."""


# ---- which directions ------------------------------------------------------------------------------
def parse_directions(
    *,
    src: Optional[str] = None,
    tgt: Optional[str] = None,
    langs: Sequence[str] = (),
    pairs: Sequence[str] = (),
) -> list[Pair]:
    """``--src/--tgt`` (one direction), ``--langs`` (every ordered pair of distinct languages) or ``--pairs``.

    At most one of the three forms; none gives ``[]`` (valid only for an index with one list for all).
    """
    forms = [flag for flag, given in (("--src/--tgt", src or tgt), ("--langs", langs), ("--pairs", pairs)) if given]
    if len(forms) > 1:
        raise ExportError(f"give one of --src/--tgt, --langs or --pairs, not {' and '.join(forms)}")
    if src or tgt:
        if not (src and tgt):
            raise ExportError(f"--src and --tgt go together (got --src {src!r}, --tgt {tgt!r})")
        out = [(src, tgt)]
    elif langs:
        unique = list(dict.fromkeys(langs))
        if len(unique) < 2:
            raise ExportError(f"--langs needs at least two languages to make directions, got {list(langs)}")
        out = [(a, b) for a in unique for b in unique if a != b]
    else:
        out = list(dict.fromkeys((d.src, d.tgt) for d in (Direction.parse(pair, what="--pairs") for pair in pairs)))
    for s, t in out:
        check_code_form(s, what="source language")
        check_code_form(t, what="target language")
        if s == t:
            raise ExportError(f"direction {s}-{t} translates a language into itself")
    return out


# ---- which experts ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """The experts an export holds (``union``) and the experts each direction routes over."""

    directions: dict[str, LayerExperts]
    """``"src-tgt"`` (or ``"*"`` for an index of one list) -> ``{(side, layer): expert indices}``."""
    union: LayerExperts
    topology: Topology

    def global_ids(self, key: str) -> list[int]:
        return sorted(self.topology.global_id(side, layer, e) for (side, layer), ids in self.directions[key].items() for e in ids)


def plan_export(index: ExpertIndex, topology: Topology, directions: Sequence[Pair], *, what: str = "expert index") -> ExportPlan:
    """Resolve ``directions`` against ``index`` (every MoE layer must keep at least one expert)."""
    validate_index(index, topology, min_per_layer=1, what=what)
    per_direction: dict[str, LayerExperts] = {}
    if not directions:
        if index.kind != "all":
            raise ExportError(
                f"{what} has one entry per {'language' if index.kind == 'lang' else 'direction'}: say which directions "
                f"to export with --src/--tgt, --langs or --pairs (it has {len(index.keys)} entries: "
                f"{', '.join(index.keys[:10])}{' ...' if len(index.keys) > 10 else ''})"
            )
        per_direction[ANY_DIRECTION] = experts_for_direction(index, "*", "*", topology)
    for src, tgt in directions:
        per_direction[direction_key(src, tgt)] = experts_for_direction(index, src, tgt, topology)
    union: LayerExperts = {(side, layer): [] for _, side, layer in topology.iter_moe_layers()}
    for experts in per_direction.values():
        for slot, ids in experts.items():
            if not ids:
                raise ExportError(f"{what}: a direction keeps no expert in {slot[0]} layer {slot[1]}")
            union[slot] = sorted(set(union[slot]) | set(ids))
    return ExportPlan(per_direction, union, topology)


def check_available(plan: ExportPlan, reader: CheckpointReader) -> None:
    """Every kept expert must be held by the source checkpoint (an export holds only its own)."""
    present = reader.present_experts()
    problems = []
    for (side, layer), ids in plan.union.items():
        held = present.get((side, layer), [])
        lacking = sorted(set(ids) - set(held))
        if lacking:
            problems.append(f"{side} layer {layer}: expert(s) {lacking[:8]}{' ...' if len(lacking) > 8 else ''} (it holds {len(held)})")
    if problems:
        pruned = " (it is itself a pruned export)" if reader.manifest is not None else ""
        raise ExportError(
            f"the expert index keeps experts that the model at {reader.path}{pruned} does not hold: "
            + "; ".join(problems[:6])
            + (f"; and {len(problems) - 6} more layer(s)" if len(problems) > 6 else "")
        )


# ---- writing ---------------------------------------------------------------------------------------
def _ordered(reader: CheckpointReader) -> CheckpointReader:
    """The same reader, its entries in canonical-name order (independent of the source layout)."""
    return dataclasses.replace(reader, _entries=sorted(reader.entries(), key=lambda e: natural_key(e.name)))


def _router_rows(reader: CheckpointReader, union: LayerExperts, extra: Optional[Mapping[tuple[str, int], Any]] = None) -> dict[tuple[str, int], torch.Tensor]:
    """Rows of each source router to keep: the source holds ``present`` experts, row i = present[i].

    ``extra`` (policy exports): per layer, an :class:`~pruning.model.moe.ExtraRows` whose rows follow the kept ones.
    """
    present = reader.present_experts()
    rows = {}
    for slot, ids in union.items():
        row_of = {e: i for i, e in enumerate(present[slot])}
        more = list(extra[slot].ids) if extra and slot in extra else []
        rows[slot] = torch.tensor([row_of[e] for e in [*ids, *more]], dtype=torch.long)
    return rows


@dataclasses.dataclass(frozen=True)
class _Computed:
    """A tensor computed by the export (a substitute layer's constant outputs) standing in an entry's place."""

    value: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.value.dtype

    def load(self) -> torch.Tensor:
        return self.value


@dataclasses.dataclass(frozen=True)
class _QuantPart:
    """One stored part (codes ``""``, ``"_scale"``, ``"_min"``) of a float weight quantized at export."""

    source: Entry
    suffix: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    parts: Any  # _QuantCache

    def load(self) -> torch.Tensor:
        return self.parts(self.source)[self.suffix]


class _QuantCache:
    """Quantizes one source weight (after the export's transform) and keeps its parts until the next one."""

    def __init__(self, spec: QuantSpec, transform: Any):
        self.spec, self.transform = spec, transform
        self.name: Optional[str] = None
        self.parts: dict[str, torch.Tensor] = {}

    def __call__(self, entry: Entry) -> dict[str, torch.Tensor]:
        if self.name != entry.name:
            self.parts, self.name = {}, None  # free the previous weight's parts first
            self.parts = quantize(self.transform(entry, entry.tensor.load()), self.spec)
            self.name = entry.name
        return self.parts


def _with_quantized(reader: CheckpointReader, spec: Optional[QuantSpec], transform: Any) -> CheckpointReader:
    """``reader`` whose weights ``spec`` targets each become their stored parts (codes, scale[, min]), in place."""
    if spec is None:
        return reader
    cache = _QuantCache(spec, transform)
    entries: list[Entry] = []
    for entry in reader.entries():
        if not spec.applies(entry.name):
            entries.append(entry)
            continue
        for name, (shape, dtype) in spec.stored(entry.name, tuple(entry.tensor.shape)).items():
            part = _QuantPart(entry, name[len(entry.name) :], shape, dtype, cache)
            entries.append(Entry(name, part, entry.file, entry.source_key))  # type: ignore[arg-type]
    return dataclasses.replace(reader, _entries=entries)


def _plan_policy(policy: str, stats: Optional[str | Path], *, reader: CheckpointReader, plan: ExportPlan) -> Any:
    """The :class:`pruning.policy.PolicyPlan` of a substitute/merge export (None for drop)."""
    from pruning.policy import check_policy, plan_policy, policy_spec
    from pruning.stats.counters import RoutingStats

    check_policy(policy, stats)
    if policy == DROP:
        return None
    if reader.manifest is not None:
        raise ExportError(
            f"--policy {policy} needs the unpruned model's routers"
            + (" and the pruned experts' weights" if policy_spec(policy).needs_pruned_weights else "")
            + f", but {reader.path} is itself a pruned export (policy {policy_name(reader.manifest)}): export from the full model"
        )
    everything = list(range(reader.topology.num_experts))
    partial = [f"{side} layer {layer}" for (side, layer), ids in reader.present_experts().items() if ids != everything]
    if partial:
        raise ExportError(f"--policy {policy} needs every expert of the source model, but {reader.path} lacks some in {', '.join(partial[:6])}")
    stats_path = Path(str(stats)) if stats else None
    routers: dict[tuple[str, int], torch.Tensor] = {}
    by_name = {e.name: e for e in reader.entries()}

    def router(side: str, layer: int) -> torch.Tensor:  # [E, D], row e = expert e (a full source)
        if (side, layer) not in routers:
            routers[(side, layer)] = by_name[keymap.router_key(side, layer)].tensor.load().float()
        return routers[(side, layer)]

    return plan_policy(
        policy,
        union=plan.union,
        stats=RoutingStats.load(stats_path) if stats_path else None,
        directions=list(plan.directions),
        topology=reader.topology,
        router=router,
        stats_info={"file": stats_path.name, "sha256": sha256_file(stats_path)} if stats_path else None,
    )


def _with_constants(reader: CheckpointReader, policy_plan: Any) -> CheckpointReader:
    """``reader`` plus a substitute plan's constant outputs as entries (streamed with the rest, in name order)."""
    if policy_plan is None:
        return reader
    from pruning.policy import constant_tensors

    computed = [Entry(name, _Computed(value), reader.path, name) for name, value in constant_tensors(policy_plan).items()]  # type: ignore[arg-type]
    return dataclasses.replace(reader, _entries=[*reader.entries(), *computed])


def export_checkpoint(
    model: str | Path,
    *,
    experts: str | Path | ExpertIndex,
    out: str | Path,
    directions: Sequence[Pair] = (),
    dtype: Optional[torch.dtype] = torch.bfloat16,
    overwrite: bool = False,
    max_shard_bytes: Optional[int] = None,
    selection: Optional[Mapping[str, Any]] = None,
    index_file: Optional[str | Path] = None,
    progress: bool = True,
    policy: str = DROP,
    stats: Optional[str | Path] = None,
    quantize: Optional[QuantSpec] = None,
) -> Path:
    """Write a pruned export of ``model`` keeping the experts ``experts`` gives ``directions``.

    ``experts`` is an index file (``experts.json``) or an :class:`ExpertIndex`; in the latter case the
    index is also written into the export as ``experts.json`` (and ``index_file`` is ignored).
    ``dtype`` None keeps the source's. ``selection`` is recorded as is in the manifest. ``policy``
    (``drop`` | ``substitute`` | ``merge``, :mod:`pruning.policy`) is the pruned experts' treatment;
    ``substitute`` and ``merge`` need ``stats``, a statistics file of the unpruned model. ``quantize``
    (:class:`pruning.quant.QuantSpec`) stores the weights it targets as codes and fp32 scales; a
    quantized source keeps its quantization (and refuses another).
    """
    from pruning import __version__

    reader = open_checkpoint(model)
    out = Path(out)
    if Path(model).resolve() == out.resolve():
        raise ExportError(f"--out {out} is the source checkpoint itself")
    check_can_quantize(quantize, source_manifest=reader.manifest, source=str(model))
    quantization = quantize or spec_of(reader.manifest)
    index, index_info = _index_and_info(experts)
    plan = plan_export(index, reader.topology, directions, what=index_info["file"] or "expert index")
    check_available(plan, reader)
    policy_plan = _plan_policy(policy, stats, reader=reader, plan=plan)
    keep = {slot: set(ids) for slot, ids in plan.union.items()}
    rows = _router_rows(reader, plan.union, policy_plan.extra_rows() if policy_plan else None)
    target_dtype = dtype or reader.dtype
    source_entries = {e.name: e for e in reader.entries()}

    def skip(entry: Entry) -> bool:
        key = keymap.parse_expert_key(entry.name)
        return key is not None and key.expert not in keep[(key.side, key.layer)]

    def transform(entry: Entry, tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(entry.tensor, _QuantPart):
            return tensor  # quantized from the transformed weight already
        router = keymap.parse_router_key(entry.name)
        if router is not None:
            return tensor[rows[router]]  # [kept (+ pruned rows of a policy), D]
        key = keymap.parse_expert_key(entry.name)
        if key is None or policy_plan is None or policy_plan.name != "merge":
            return tensor
        coefficients = policy_plan.layers[(key.side, key.layer)].fold_coefficients(key.expert)
        if len(coefficients) == 1:
            return tensor
        from pruning.policy import merge_tensor

        def parts():  # the kept expert's tensor, then each folded expert's, loaded one at a time
            for expert, coefficient in coefficients:
                name = keymap.expert_key(key.side, key.layer, expert, key.linear, key.kind)
                yield coefficient, tensor if expert == key.expert else source_entries[name].tensor.load()

        return merge_tensor(parts())

    with atomic_directory(out, overwrite=overwrite) as tmp:

        def output_shape(entry: Entry) -> tuple[int, ...]:
            router = keymap.parse_router_key(entry.name)
            return (len(rows[router]), *entry.tensor.shape[1:]) if router is not None else tuple(entry.tensor.shape)  # quantized parts: theirs

        source = _with_quantized(_ordered(_with_constants(reader, policy_plan)), quantize, transform)
        shards = stream_entries(
            source,
            tmp,
            dtype=target_dtype,
            max_shard_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES,
            transform=transform,
            output_shape=output_shape,
            skip=skip,
            progress=progress,
            desc="exporting",
        )
        directions_ids = {key: plan.global_ids(key) for key in plan.directions}
        remote = {
            "auto_map": AUTO_MAP,
            "pruned_experts": {layer_name(side, layer): ids for (side, layer), ids in plan.union.items()},
            "pruned_directions": directions_ids,
        }
        if policy_plan is not None:
            remote["pruned_routing"] = policy_plan.config_entry()
        if quantization is not None:
            remote["pruned_quantization"] = quantization.record()
        write_config(_clean_config(reader.config), tmp, dtype=target_dtype, extra=remote)
        shutil.copyfile(REMOTE_CODE, tmp / REMOTE_CODE.name)
        copy_tokenizer(reader, tmp)
        if isinstance(experts, ExpertIndex):
            write_index(index, tmp / "experts.json")
            index_info = {**index_info, "file": "experts.json", "sha256": sha256_file(tmp / "experts.json")}
        manifest = build_manifest(
            topology=reader.topology,
            dtype=target_dtype,
            union=plan.union,
            directions=directions_ids,
            index_info=index_info,
            selection=selection,
            weights={shard.name: sha256_file(shard) for shard in shards},
            version=__version__,
            policy=policy_plan.record if policy_plan else None,
            quantization=quantization.record() if quantization else None,
        )
        write_manifest(tmp, manifest)
    return out


def _index_and_info(experts: str | Path | ExpertIndex) -> tuple[ExpertIndex, dict[str, Any]]:
    if isinstance(experts, ExpertIndex):
        return experts, {"file": None, "sha256": None, "kind": experts.kind}
    path = Path(experts)
    index = read_index(path)
    return index, {"file": path.name, "sha256": sha256_file(path), "kind": index.kind}


def _clean_config(config: Any) -> Any:
    """A copy of ``config`` without the keys that name where it was read from."""
    clean = type(config).from_dict({k: v for k, v in config.to_dict().items() if k not in CONFIG_DROP_KEYS})
    clean._name_or_path = ""
    return clean


def directions_of(manifest: Mapping[str, Any]) -> list[str]:
    """Direction keys an export serves (``"*"``: any direction)."""
    return sorted(manifest.get("directions", {}))


def summarize(out: Path, manifest: Mapping[str, Any]) -> list[str]:
    """A few lines for the terminal after an export."""
    dirs = directions_of(manifest)
    shown = ", ".join(dirs[:6]) + (f" ... ({len(dirs)} in all)" if len(dirs) > 6 else "")
    slots = sorted(manifest["experts"], key=lambda k: (not k.startswith("encoder"), int(k.split(".")[1])))
    per_layer = " ".join(f"{k.replace('encoder.', 'enc').replace('decoder.', 'dec')}:{len(manifest['experts'][k])}" for k in slots)
    return [
        f"wrote {out}",
        f"experts kept: {manifest['num_experts_kept']} of {Topology.from_dict(manifest['topology']).num_total_experts} ({per_layer})",
        f"directions: {shown}",
        f"dtype: {manifest['dtype']}, weights: {len(manifest['weights'])} shard(s)",
        f"pruned experts: {policy_summary(manifest)}",
        f"quantized: {quant_summary(manifest)}",
    ]


def quant_summary(manifest: Mapping[str, Any]) -> str:
    spec = spec_of(manifest)
    return "no (float weights)" if spec is None else spec.describe()


def policy_summary(manifest: Mapping[str, Any]) -> str:
    name = policy_name(manifest)
    if name == DROP:
        return "drop (router rows removed, as in the paper)"
    layers = manifest["policy"]["layers"].values()
    rows = sum(len(entry["rows"]) for entry in layers)
    if name == "skip":
        return f"skip ({rows} router rows kept; a token routed to a pruned expert gets nothing from it)"
    if name == "substitute":
        never = sum(len(entry.get("never_routed", [])) for entry in layers)
        return f"substitute ({rows} router rows kept, each answered by its expert's mean output; {never} never routed in the statistics: zero)"
    by = [rule for entry in layers for rule in entry.get("by", [])]
    counts = ", ".join(f"{rule} {by.count(rule)}" for rule in sorted(set(by)))
    return f"merge ({rows} experts folded into kept ones, weights by {manifest['policy'].get('frequency')}; chosen by {counts})"
