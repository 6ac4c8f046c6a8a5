"""Open an NLLB-MoE checkpoint in either layout and read it tensor by tensor.

Layouts:
- ``hf``: a directory with ``config.json`` and ``model.safetensors`` / ``pytorch_model.bin`` (single,
  or sharded with ``*.index.json``), names with or without the ``model.`` prefix; also our exports.
- ``fairseq``: ``<prefix>-shared.pt`` (dense part and routers) + ``<prefix>-rank-<r>.pt`` (experts),
  given as the shared file or its directory. Rank files beyond the experts' count are replicas and
  are not read. Only the ``model`` entry of each file is used; nothing is unpickled for real.

:func:`open_checkpoint` returns a :class:`CheckpointReader` whose :meth:`~CheckpointReader.entries`
yields :class:`Entry` objects (canonical name + lazy tensor), grouped by file, so a consumer that
loads and drops each tensor in turn never holds more than one tensor of the checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

from pruning.atomic import read_json
from pruning.checkpoint import keymap
from pruning.checkpoint.consistency import check_config_data, check_experts
from pruning.checkpoint.torch_zip import CheckpointError, LazyTensor, find_in_opaque, map_bytes, read_pickle
from pruning.data.directions import SHORT_SIDE, SIDES
from pruning.topology import NLLB_MOE_54B, Topology

HF_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
TOKENIZER_FILES = ("sentencepiece.bpe.model", "tokenizer.json", "tokenizer_config.json")
MANIFEST = "pruning_manifest.json"
_RANK_RE = re.compile(r"(?P<prefix>.+)-rank-(?P<rank>\d+)\.pt")

_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class SafetensorsTensor:
    path: Path
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def load(self) -> torch.Tensor:
        """The tensor, mapped from the file (no copy, no anonymous memory until written to)."""
        stamp = _file_stamp(self.path)
        span = _safetensors_offsets(str(self.path), stamp).get(self.key)
        nbytes = _numel(self.shape) * self.dtype.itemsize
        if span is None or span[1] - span[0] != nbytes:
            raise CheckpointError(f"{self.path}: tensor {self.key!r} is not in the file's header as {self.dtype} {list(self.shape)}")
        start, stop = span
        if stop > stamp[1]:
            raise CheckpointError(f"{self.path}: tensor {self.key!r} ends past the end of the file (truncated?)")
        if nbytes == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        return map_bytes(self.path, start, nbytes).view(self.dtype).reshape(self.shape)


@functools.lru_cache(maxsize=64)
def _safetensors_offsets(path: str, stamp: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """name -> absolute [start, stop) byte range of each tensor, from the file's header (parsed once per file)."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", prefix)
        if length > stamp[1]:
            raise CheckpointError(f"{path}: safetensors header length {length} exceeds the file size {stamp[1]}")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: malformed safetensors header ({exc})") from exc
    base = 8 + length
    return {key: (base + int(value["data_offsets"][0]), base + int(value["data_offsets"][1])) for key, value in header.items() if key != "__metadata__"}


def _file_stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


@dataclass(frozen=True)
class Entry:
    name: str
    """Canonical (HF ``NllbMoeModel``) name."""
    tensor: Union[LazyTensor, SafetensorsTensor]
    file: Path
    source_key: str


@dataclass
class CheckpointReader:
    layout: str
    path: Path
    config: Any
    """A ``transformers.NllbMoeConfig``."""
    files: list[Path]
    _entries: list[Entry] = field(repr=False)
    tokenizer_dir: Optional[Path] = None
    manifest: Optional[dict[str, Any]] = None

    @property
    def topology(self) -> Topology:
        return Topology.from_config(self.config)

    @property
    def dtype(self) -> torch.dtype:
        for entry in self._entries:
            if entry.name == keymap.SHARED:
                return entry.tensor.dtype
        return torch.float32

    def entries(self) -> Iterator[Entry]:
        """Every canonical tensor once, grouped by file in file order."""
        yield from self._entries

    def names(self) -> list[str]:
        return [e.name for e in self._entries]

    def present_experts(self) -> dict[tuple[str, int], list[int]]:
        """(side, layer) -> sorted expert indices that have weights in this checkpoint."""
        found: dict[tuple[str, int], set[int]] = defaultdict(set)
        for entry in self._entries:
            key = keymap.parse_expert_key(entry.name)
            if key is not None:
                found[(key.side, key.layer)].add(key.expert)
        return {k: sorted(v) for k, v in sorted(found.items())}

    def total_bytes(self) -> int:
        return sum(e.tensor.nbytes if isinstance(e.tensor, LazyTensor) else _numel(e.tensor.shape) * e.tensor.dtype.itemsize for e in self._entries)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def detect_layout(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if path.is_file():
        if path.name.endswith("-shared.pt"):
            return "fairseq"
        raise CheckpointError(
            f"{path}: unknown checkpoint layout; give an HF-layout directory (config.json + "
            f"{' | '.join(HF_WEIGHT_FILES)}) or a fairseq '<prefix>-shared.pt' file or its directory"
        )
    if (path / "config.json").is_file() and any((path / f).is_file() for f in HF_WEIGHT_FILES):
        return "hf"
    if list(path.glob("*-shared.pt")):
        return "fairseq"
    raise CheckpointError(
        f"{path}: unknown checkpoint layout: found neither config.json with one of {list(HF_WEIGHT_FILES)} "
        f"(HF layout) nor a '*-shared.pt' file (fairseq layout); directory holds {sorted(p.name for p in path.iterdir())[:20]}"
    )


def open_checkpoint(path: str | Path) -> CheckpointReader:
    """Open ``path`` (HF directory, fairseq shared file or its directory) without loading weights."""
    layout = detect_layout(path)
    return _open_hf(Path(path)) if layout == "hf" else _open_fairseq(Path(path))


# ---- HF layout ------------------------------------------------------------------------------------
def _open_hf(directory: Path) -> CheckpointReader:
    from transformers import NllbMoeConfig

    config_path = directory / "config.json"
    check_config_data(read_json(config_path, error=CheckpointError, what="model config"), path=config_path)
    try:
        config = NllbMoeConfig.from_json_file(str(config_path))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: not a readable NLLB-MoE config ({exc})") from exc
    files = _hf_weight_files(directory)
    entries: list[Entry] = []
    seen: set[str] = set()
    unknown: list[str] = []
    for file in files:
        for key, tensor in _hf_file_tensors(file):
            name = keymap.map_key(key, keymap.HF_TABLE)
            if name is None:
                continue
            if name is False or not keymap.is_canonical(str(name)):
                unknown.append(f"{file.name}:{key}")
                continue
            if name in seen:  # tied embedding copies
                continue
            seen.add(str(name))
            entries.append(Entry(str(name), tensor, file, key))
    if unknown:
        raise CheckpointError(f"{directory}: unknown tensor names (not NLLB-MoE): {sorted(unknown)[:20]}")
    from pruning.manifest import read_manifest

    manifest = read_manifest(directory)
    reader = CheckpointReader("hf", directory, config, files, entries, _tokenizer_dir(directory), manifest)
    _check_complete(reader)
    return reader


def _hf_weight_files(directory: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = directory / index_name
        if index_path.is_file():
            index = read_json(index_path, error=CheckpointError, what="shard index")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(
                    f"{index_path}: malformed shard index: expected an object with a 'weight_map' of tensor name -> file name, got {_shape_of(index)}"
                )
            files = [directory / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index_path} names shard file(s) that are missing: {missing}")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    raise CheckpointError(f"{directory}: no weight files ({list(HF_WEIGHT_FILES)})")


def _shape_of(data: Any) -> str:
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}"
    return f"'weight_map': {type(data.get('weight_map')).__name__}" if "weight_map" in data else f"keys {sorted(data)[:5]}"


def _hf_file_tensors(file: Path) -> Iterator[tuple[str, Union[LazyTensor, SafetensorsTensor]]]:
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as handle:
                items = []
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    dtype = _SAFETENSORS_DTYPES.get(piece.get_dtype())
                    if dtype is None:
                        raise CheckpointError(f"{file}: tensor {key!r} has unsupported dtype {piece.get_dtype()}")
                    items.append((key, SafetensorsTensor(file, key, tuple(piece.get_shape()), dtype)))
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file, truncated or corrupt? ({exc})") from exc
        yield from items
        return
    obj = read_pickle(file)
    state = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a state dict, found {type(state).__name__}")
    for key, value in state.items():
        if isinstance(value, LazyTensor):
            yield str(key), value


def _tokenizer_dir(directory: Path) -> Optional[Path]:
    return directory if any((directory / f).is_file() for f in TOKENIZER_FILES) else None


# ---- fairseq layout -------------------------------------------------------------------------------
def _open_fairseq(path: Path) -> CheckpointReader:
    shared_path = path if path.is_file() else _single_shared_file(path)
    prefix = shared_path.name[: -len("-shared.pt")]
    directory = shared_path.parent
    shared_obj = read_pickle(shared_path)
    shared_state = _model_state(shared_obj, shared_path)

    entries: list[Entry] = []
    seen: set[str] = set()
    unknown: list[str] = []
    for key, tensor in shared_state.items():
        if keymap.fairseq_expert_local_index(key) is not None:
            unknown.append(f"{shared_path.name}:{key} (expert tensor in the shared file)")
            continue
        name = keymap.map_key(key, keymap.FAIRSEQ_TABLE)
        if name is None:
            continue
        if name is False:
            unknown.append(f"{shared_path.name}:{key}")
            continue
        if name not in seen:
            seen.add(str(name))
            entries.append(Entry(str(name), tensor, shared_path, key))

    num_experts = _fairseq_num_experts(entries, shared_path)
    rank_files = _rank_files(directory, prefix)
    if not rank_files:
        raise CheckpointError(f"{directory}: no rank files '{prefix}-rank-<r>.pt' beside {shared_path.name}")
    first_state = _model_state(read_pickle(rank_files[0]), rank_files[0])
    per_file = len({keymap.fairseq_expert_local_index(k) for k in first_state} - {None})
    if per_file == 0 or num_experts % per_file:
        raise CheckpointError(f"{rank_files[0]}: holds {per_file} expert(s) per layer, which does not divide the router's {num_experts} experts")
    needed = num_experts // per_file
    have = {int(_RANK_RE.fullmatch(f.name).group("rank")): f for f in rank_files}  # type: ignore[union-attr]
    missing = [f"{prefix}-rank-{r}.pt" for r in range(needed) if r not in have]
    if missing:
        raise CheckpointError(
            f"{directory}: missing rank file(s) {missing[:10]}{' ...' if len(missing) > 10 else ''}: the routers have "
            f"{num_experts} experts, {per_file} per rank file, so ranks 0..{needed - 1} are needed"
        )
    used = [have[r] for r in range(needed)]
    for rank, file in enumerate(used):
        state = first_state if rank == 0 else _model_state(read_pickle(file), file)
        for key, tensor in state.items():
            local = keymap.fairseq_expert_local_index(key)
            if local is None:
                if keymap.map_key(key, keymap.FAIRSEQ_TABLE) is None:
                    continue
                unknown.append(f"{file.name}:{key} (non-expert tensor in a rank file)")
                continue
            name = keymap.map_key(key, keymap.FAIRSEQ_TABLE, expert=rank * per_file + local)
            entries.append(Entry(str(name), tensor, file, key))
    if unknown:
        raise CheckpointError(f"unknown or misplaced tensors in the fairseq checkpoint: {sorted(unknown)[:20]}")

    config = _fairseq_config(entries, shared_obj, shared_path, num_experts)
    tokenizer_dir = directory if (directory / "sentencepiece.bpe.model").is_file() else _tokenizer_dir(directory)
    reader = CheckpointReader("fairseq", shared_path, config, [shared_path, *used], entries, tokenizer_dir)
    _check_complete(reader)
    return reader


def _single_shared_file(directory: Path) -> Path:
    shared = sorted(directory.glob("*-shared.pt"))
    if len(shared) != 1:
        raise CheckpointError(f"{directory}: expected exactly one '*-shared.pt' file, found {[p.name for p in shared]}")
    return shared[0]


def _rank_files(directory: Path, prefix: str) -> list[Path]:
    found = []
    for file in directory.glob(f"{glob_escape(prefix)}-rank-*.pt"):
        match = _RANK_RE.fullmatch(file.name)
        if match and match.group("prefix") == prefix:
            found.append((int(match.group("rank")), file))
    return [f for _, f in sorted(found)]


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _model_state(obj: Any, file: Path) -> dict[str, Any]:
    if not isinstance(obj, dict) or "model" not in obj or not isinstance(obj["model"], dict):
        raise CheckpointError(f"{file}: not a fairseq checkpoint (expected a dict with a 'model' state dict)")
    strange = sorted(f"{k} ({getattr(v, 'qualname', type(v).__name__)})" for k, v in obj["model"].items() if not isinstance(v, (LazyTensor, int, float, str)))
    if strange:
        raise CheckpointError(f"{file}: the model state holds non-tensor entries {strange[:10]} (never executed)")
    return {str(k): v for k, v in obj["model"].items() if isinstance(v, LazyTensor)}


def _fairseq_num_experts(entries: list[Entry], shared_path: Path) -> int:
    rows = {e.tensor.shape[0] for e in entries if keymap.parse_router_key(e.name)}
    if len(rows) != 1:
        raise CheckpointError(f"{shared_path}: routers ('moe_layer.gate.wg.weight') must all have one expert count, found {sorted(rows)}")
    return rows.pop()


def _fairseq_config(entries: list[Entry], shared_obj: Any, shared_path: Path, num_experts: int) -> Any:
    """The HF config of a fairseq checkpoint: shapes from its tensors, settings from its pickled ``cfg``."""
    by_name = {e.name: e.tensor for e in entries}
    vocab, d_model = by_name[keymap.SHARED].shape
    layers = {side: 1 + max((l for s, l in filter(None, map(keymap.parse_layer, by_name)) if s == side), default=-1) for side in SIDES}
    moe = {side: sorted(l for s, l in filter(None, map(keymap.parse_router_key, by_name)) if s == side) for side in SIDES}
    steps = {side: _sparse_step(moe[side], layers[side], side, shared_path) for side in SIDES}
    fc1 = [t for n, t in by_name.items() if _is_fc1_weight(n)]  # dense FFNs and experts: [F, D]
    topology = Topology(
        encoder_layers=layers["encoder"],
        decoder_layers=layers["decoder"],
        encoder_sparse_step=steps["encoder"],
        decoder_sparse_step=steps["decoder"],
        num_experts=num_experts,
        d_model=d_model,
        ffn_dim=fc1[0].shape[0],
        vocab_size=vocab,
    )

    def setting(key: str, default: Any) -> Any:
        value = find_in_opaque(shared_obj, key)
        return default if value is None else value

    heads = setting("encoder_attention_heads", None) or _sidecar_heads(shared_path)
    if heads is None and topology == NLLB_MOE_54B:
        heads = NLLB_MOE_54B.encoder_attention_heads  # the released model's shape exactly: its cfg says 16
    if heads is None:
        raise CheckpointError(
            f"{shared_path}: cannot find the number of attention heads in the checkpoint's cfg/args; put a config.json with 'encoder_attention_heads' beside it"
        )
    topology = dataclasses.replace(topology, encoder_attention_heads=int(heads), decoder_attention_heads=int(setting("decoder_attention_heads", heads)))
    return topology.to_hf_config(
        max_position_embeddings=int(setting("max_source_positions", 1024)),
        moe_token_dropout=float(setting("moe_eom", 0.2)),
        moe_eval_capacity_token_fraction=float(setting("moe_eval_capacity_token_fraction", 1.0)),
        scale_embedding=not bool(setting("no_scale_embedding", False)),
    )


def _is_fc1_weight(name: str) -> bool:
    expert = keymap.parse_expert_key(name)
    dense = keymap.parse_dense_ffn_key(name)
    return (expert is not None and (expert.linear, expert.kind) == ("fc1", "weight")) or (dense is not None and dense[2:] == ("fc1", "weight"))


def _sidecar_heads(shared_path: Path) -> Optional[int]:
    sidecar = shared_path.parent / "config.json"
    if not sidecar.is_file():
        return None
    data = read_json(sidecar, error=CheckpointError, what="config")
    return data.get("encoder_attention_heads") if isinstance(data, dict) else None


def _sparse_step(moe_layers: list[int], n_layers: int, side: str, path: Path) -> int:
    if not moe_layers:
        return 0
    step = moe_layers[0] + 1
    expected = [i for i in range(n_layers) if (i + 1) % step == 0]
    if moe_layers != expected:
        raise CheckpointError(f"{path}: {side} MoE layers {moe_layers} are not every {step}-th layer ({expected})")
    return step


# ---- completeness ---------------------------------------------------------------------------------
def expected_names(topology: Topology, *, experts: Optional[dict[tuple[str, int], list[int]]] = None) -> list[str]:
    """Every canonical tensor name a model of ``topology`` has (optionally only the given experts)."""
    names = [keymap.SHARED]
    for side in ("encoder", "decoder"):
        n_layers = topology.encoder_layers if side == "encoder" else topology.decoder_layers
        for layer in range(n_layers):
            p = f"{side}.layers.{layer}"
            names += [f"{p}.self_attn.{x}_proj.{k}" for x in ("k", "v", "q", "out") for k in ("weight", "bias")]
            names += [f"{p}.self_attn_layer_norm.{k}" for k in ("weight", "bias")]
            if side == "decoder":
                names += [f"{p}.cross_attention.{x}_proj.{k}" for x in ("k", "v", "q", "out") for k in ("weight", "bias")]
                names += [f"{p}.cross_attention_layer_norm.{k}" for k in ("weight", "bias")]
            names += [f"{p}.ff_layer_norm.{k}" for k in ("weight", "bias")]
            if topology.is_moe_layer(side, layer):  # type: ignore[arg-type]
                names.append(keymap.router_key(side, layer))
                kept = range(topology.num_experts) if experts is None else experts[(side, layer)]
                names += [keymap.expert_key(side, layer, e, lin, k) for e in kept for lin in ("fc1", "fc2") for k in ("weight", "bias")]
            else:
                names += [f"{p}.ffn.fc{i}.{k}" for i in (1, 2) for k in ("weight", "bias")]
        names += [f"{side}.layer_norm.{k}" for k in ("weight", "bias")]
    return names


def _check_complete(reader: CheckpointReader) -> None:
    topology = reader.topology
    present = reader.present_experts()
    experts = None
    if reader.manifest is not None or any(len(v) != topology.num_experts for v in present.values()):
        experts = {(side, layer): present.get((side, layer), []) for _, side, layer in topology.iter_moe_layers()}
    from pruning.manifest import policy_tensor_shapes

    expected = set(expected_names(topology, experts=experts)) | set(policy_tensor_shapes(reader.manifest, reader.config))
    quantized = quantized_tensors(reader, expected)
    expected |= set(quantized)
    have = set(reader.names())
    missing = sorted(expected - have)
    extra = sorted(have - expected)
    if missing:
        raise CheckpointError(f"{reader.path}: {len(missing)} tensor(s) missing for the model in config: {missing[:10]}")
    if extra:
        raise CheckpointError(f"{reader.path}: {len(extra)} tensor(s) that the config's topology does not have: {extra[:10]}")
    _check_shapes(reader, present, quantized)
    check_experts(reader)  # num_experts (and an export's manifest) against the experts held


def expected_shape(name: str, config: Any, *, router_rows: int, constants: int = 0) -> tuple[int, ...]:
    """Shape of canonical tensor ``name`` in a model of ``config`` (:data:`keymap.CANONICAL_SHAPES`)."""
    symbols = keymap.symbolic_shape(name)
    if symbols is None:
        raise CheckpointError(f"{name!r} is not a tensor of an NLLB-MoE model")
    side = keymap.parse_layer(name)
    ffn = config.decoder_ffn_dim if side is not None and side[0] == "decoder" else config.encoder_ffn_dim
    sizes = {"V": config.vocab_size, "D": config.d_model, "F": ffn, "R": router_rows, "P": constants}
    return tuple(sizes[symbol] for symbol in symbols)


def quantized_tensors(reader: CheckpointReader, names: set[str]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{name: (shape, dtype)}`` of a quantized export's codes and scales (pruning.quant); {} otherwise."""
    from pruning.quant import spec_of

    spec = spec_of(reader.manifest)
    if spec is None:
        return {}
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name in sorted(names):
        if spec.applies(name):
            out.update(spec.stored(name, expected_shape(name, reader.config, router_rows=0)))
    return out


def _check_shapes(
    reader: CheckpointReader, present: dict[tuple[str, int], list[int]], quantized: Optional[dict[str, tuple[tuple[int, ...], torch.dtype]]] = None
) -> None:
    """Every tensor's shape (and a quantized tensor's dtype) against the config, before any weight is loaded; all mismatches at once."""
    from pruning.manifest import policy_tensor_shapes

    wrong = []
    policy_shapes = policy_tensor_shapes(reader.manifest, reader.config)  # substitute/merge exports
    for entry in reader.entries():
        router = keymap.parse_router_key(entry.name)
        rows = len(present.get(router, [])) if router else 0
        stored = (quantized or {}).get(entry.name)
        want = policy_shapes.get(entry.name) or (stored[0] if stored else None) or expected_shape(entry.name, reader.config, router_rows=rows)
        if tuple(entry.tensor.shape) != want:
            wrong.append(f"{entry.file.name}:{entry.source_key} has shape {tuple(entry.tensor.shape)}, config expects {want}")
        elif stored is not None and entry.tensor.dtype != stored[1]:
            wrong.append(f"{entry.file.name}:{entry.source_key} is {entry.tensor.dtype}, the manifest's quantization stores it as {stored[1]}")
    if wrong:
        raise CheckpointError(f"{reader.path}: {len(wrong)} tensor(s) do not match the config: " + "; ".join(wrong[:10]))


# ---- router rows (data-free metrics) --------------------------------------------------------------
@dataclass(frozen=True)
class RouterRows:
    """Router rows of every MoE layer of a checkpoint."""

    path: Path
    topology: object
    """The checkpoint's :class:`pruning.topology.Topology`."""
    rows: dict[str, torch.Tensor]
    """``{"enc": [L_enc, E, D], "dec": [L_dec, E, D]}`` (float64), layers in ``topology.moe_layers`` order."""


def read_router_rows(path: str | Path) -> RouterRows:
    """The router weights of checkpoint ``path`` (either layout), read tensor by tensor; experts are not loaded.

    For the data-free router metrics (:mod:`metrics.router`), which take these tensors.
    """
    reader = open_checkpoint(path)
    topology = reader.topology
    routers = {}
    for entry in reader.entries():
        key = keymap.parse_router_key(entry.name)
        if key is not None:
            routers[key] = entry.tensor
    rows: dict[str, torch.Tensor] = {}
    for side in SIDES:
        per_layer = []
        for layer in topology.moe_layers(side):
            tensor = routers.get((side, layer))
            if tensor is None:
                raise CheckpointError(f"{reader.path}: no router weight for {side} MoE layer {layer}")
            if tuple(tensor.shape)[0] != topology.num_experts:
                raise CheckpointError(
                    f"{reader.path}: the router of {side} layer {layer} has {tuple(tensor.shape)[0]} rows, but the model has "
                    f"{topology.num_experts} experts per layer (a pruned export keeps only its kept experts' rows); "
                    f"router metrics need the unpruned checkpoint"
                )
            per_layer.append(tensor.load().to(torch.float64))  # [E, D]
        rows[SHORT_SIDE[side]] = torch.stack(per_layer)  # [L, E, D]
    return RouterRows(reader.path, topology, rows)
