"""A rehearsal checkpoint at NLLB-200's real width, written in a real layout, never held in memory.

    python -m experiments.fullwidth.generate --out /tmp/rehearsal/hf-bin --layout hf-bin --dtype fp16
    python -m experiments.fullwidth.generate --out /tmp/rehearsal/fairseq --layout fairseq --dtype fp16

NLLB-200 MoE's per-layer shapes (d_model 2048, FFN 8192, 16 heads, 128 experts per MoE layer, the
256,206-row tied embedding) with only the depth reduced (default 4 + 4 layers, MoE every 4th: one MoE
layer per side, 8.6B parameters, 17.2 GB of experts in 16 bits). Layouts:

- ``hf-bin``: ``pytorch_model-000NN-of-000MM.bin`` torch-zip shards of up to ``--shard-gb`` + index json,
  names with ``model.`` (``--no-model-prefix`` for without), as ``facebook/nllb-moe-54b``;
- ``fairseq``: ``checkpoint_2_300000-shared.pt`` with a pickled omegaconf ``cfg`` and a ``last_optimizer_state``
  (``--optimizer-gb``) that a reader must never touch, and one rank file per expert;
- ``hf``: safetensors shards (what ``convert`` and ``export`` write).

Weights are random (seeded per tensor name), generated one tensor at a time straight into the file.
Routing is made to look like a trained model's: each language of the tokenizer has a random unit
direction ``u_L`` in d_model space; a token's embedding row gets ``sum_L p(L | token) u_L`` (p from how
often each language's FLORES dev text uses the token), and each language prefers ``--preferred``
experts per MoE layer, whose router rows get ``strength / sqrt(d) * u_L`` (about ``strength / 2`` more
logit for that language's tokens). Dense weights are small (std ``0.1 / sqrt(d)``) so that a MoE
layer's input is mostly the token's embedding and position, and random router rows are orthogonal to
the part of it every token shares (:func:`shared_input_direction`). Measured with 4 languages x 60 dev
sentences (the same at d_model 64 and 2048): a language's own top-16 of 128 experts take ~0.6 of its
encoder and ~0.75 of its decoder top-1 routing, against ~0.46 / ~0.55 for the 16 experts all languages
use most. Routing is more concentrated than the trained testbed's (own top-2 of 16: 0.24 / 0.54),
because random layers barely mix context: a token's expert follows from the token and its position,
and language codes, ``</s>`` and ``.`` are a quarter of these short sentences' tokens.

The tokenizer is the testbed's (4,012 tokens); the embedding keeps the real 256,206 rows (rows past the
tokenizer are never input, and translation never emits them).
"""

from __future__ import annotations

import argparse
import json
import shutil
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from pruning.checkpoint import keymap
from pruning.checkpoint.convert import stream_entries, write_config
from pruning.checkpoint.layouts import fairseq_cfg, write_fairseq, write_hf_bin
from pruning.checkpoint.reader import CheckpointReader, Entry, expected_names, expected_shape
from pruning.checkpoint.tokenizer import load_tokenizer
from pruning.checkpoint.writer import atomic_directory
from pruning.model.loading import parse_dtype
from pruning.topology import NLLB_MOE_54B, Topology

LAYOUTS = ("hf-bin", "fairseq", "hf")
TESTBED = Path("experiments/testbed/data")
EMBEDDING_NOISE = 1.0
"""Std of token embeddings x sqrt(d) (fairseq initialisation: 1)."""


@dataclass
class RehearsalConfig:
    out: str = field(metadata={"help": "output directory (must not exist)"})
    layout: str = field(default="hf-bin", metadata={"help": "hf-bin | fairseq | hf", "choices": list(LAYOUTS)})
    dtype: str = field(default="fp16", metadata={"help": "fp32 | fp16 | bf16 (the release: fp32 for HF, fp16 for fairseq)"})
    encoder_layers: int = 4
    decoder_layers: int = 4
    sparse_step: int = 4
    d_model: int = NLLB_MOE_54B.d_model
    ffn_dim: int = NLLB_MOE_54B.ffn_dim
    heads: int = NLLB_MOE_54B.encoder_attention_heads
    experts: int = NLLB_MOE_54B.num_experts
    vocab_size: int = NLLB_MOE_54B.vocab_size
    shard_gb: float = field(default=10.0, metadata={"help": "largest torch-zip / safetensors shard, GiB"})
    model_prefix: bool = field(default=True, metadata={"help": "hf-bin: names start with 'model.'"})
    optimizer_gb: float = field(default=1.0, metadata={"help": "fairseq: size of the optimizer state nobody may read"})
    tokenizer: str = str(TESTBED / "tokenizer")
    flores: str = str(TESTBED / "flores")
    preferred: int = field(default=16, metadata={"help": "experts each language prefers in every MoE layer"})
    encoder_strength: float = field(default=0.7, metadata={"help": "extra router logit x 2 of a language's preferred encoder experts"})
    decoder_strength: float = field(default=1.5, metadata={"help": "the same in the decoder (more language-specific, as in NLLB)"})
    seed: int = 0

    def topology(self) -> Topology:
        return Topology(
            encoder_layers=self.encoder_layers,
            decoder_layers=self.decoder_layers,
            encoder_sparse_step=self.sparse_step,
            decoder_sparse_step=self.sparse_step,
            num_experts=self.experts,
            d_model=self.d_model,
            ffn_dim=self.ffn_dim,
            vocab_size=self.vocab_size,
            encoder_attention_heads=self.heads,
            decoder_attention_heads=self.heads,
        )


@dataclass(frozen=True)
class RandomTensor:
    """A tensor made when loaded: the same bytes for the same (seed, name), whatever the order."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Any  # (generator, shape, dtype) -> tensor

    def load(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(zlib.crc32(self.name.encode()))
        return self.make(generator, self.shape, self.dtype)


# ---- the routing-shaped part --------------------------------------------------------------------------
@dataclass
class LanguageSignal:
    """Per language: a unit direction [D], the embedding rows' language mixture [V_tok, L], preferred experts."""

    codes: list[str]
    directions: torch.Tensor  # [L, D]
    token_mix: torch.Tensor  # [V_tok, L]
    preferred: dict[str, torch.Tensor]  # side -> [L, P] expert indices
    sentences: list[list[int]]  # token ids of a sample of each language's dev sentences


def language_signal(cfg: RehearsalConfig, tokenizer: Any) -> LanguageSignal:
    from pruning.data.flores import FloresDir

    flores = FloresDir(cfg.flores)
    codes = sorted(code for code in flores.languages("dev") if code in tokenizer.get_vocab())
    generator = torch.Generator().manual_seed(cfg.seed)
    directions = torch.nn.functional.normalize(torch.randn(len(codes), cfg.d_model, generator=generator), dim=1)
    counts = torch.zeros(len(tokenizer), len(codes))
    sentences = []
    for j, code in enumerate(codes):
        tokenizer.src_lang = code
        encoded = [tokenizer(line)["input_ids"] for line in flores.read(code, "dev")]
        sentences += encoded[:50]
        for token, n in Counter(i for ids in encoded for i in ids).items():
            counts[token, j] += n
    token_mix = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    preferred = {side: torch.stack([torch.randperm(cfg.experts, generator=generator)[: cfg.preferred] for _ in codes]) for side in ("encoder", "decoder")}
    return LanguageSignal(codes, directions, token_mix, preferred, sentences)


def _normal(std: float):  # noqa: ANN202
    return lambda g, shape, dtype: (torch.randn(shape, generator=g) * std).to(dtype)


def _constant(value: float):  # noqa: ANN202
    return lambda g, shape, dtype: torch.full(shape, value, dtype=dtype)


def _embedding(signal: LanguageSignal, d_model: int):  # noqa: ANN202
    def make(g: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        rows = torch.randn(shape, generator=g) * (EMBEDDING_NOISE * d_model**-0.5)
        known = signal.token_mix.shape[0]
        rows[:known] += signal.token_mix @ signal.directions
        rows[1] = 0  # padding row
        return rows.to(dtype)

    return make


def shared_input_direction(signal: LanguageSignal, embedding: torch.Tensor) -> torch.Tensor:
    """[D] unit vector: the mean MoE-layer input over a sample of sentences of every language.

    With small dense weights a MoE layer's input is about ``layer_norm(sqrt(d) * embedding + position)``.
    Much of its energy is common to every token (low-frequency sinusoids are nearly constant over a
    sentence, and every token carries some of it); random router rows aligned with that mean would send
    every language's tokens to the same few experts, which a trained router (balance loss) never does.
    """
    from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeSinusoidalPositionalEmbedding

    d_model = embedding.shape[1]
    longest = max(len(ids) for ids in signal.sentences)
    positions = NllbMoeSinusoidalPositionalEmbedding.get_embedding(longest + 2, d_model, 1)  # rows 2.. are positions
    inputs = [torch.nn.functional.layer_norm(d_model**0.5 * embedding[ids].float() + positions[2 : 2 + len(ids)], (d_model,)) for ids in signal.sentences]
    return torch.nn.functional.normalize(torch.cat(inputs).mean(dim=0), dim=0)


def _router(signal: LanguageSignal, side: str, strength: float, common: torch.Tensor):  # noqa: ANN202
    d_model = common.shape[0]
    # random rows see neither the shared input direction nor the language directions: only the preferred
    # experts' rows below do, so the language preference is what the generator sets
    basis, _ = torch.linalg.qr(torch.cat([common[None], signal.directions]).T)  # [D, 1 + L]

    def make(g: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        rows = torch.randn(shape, generator=g) * d_model**-0.5
        rows -= (rows @ basis) @ basis.T
        for j, experts in enumerate(signal.preferred[side]):
            rows[experts] += strength * d_model**-0.5 * signal.directions[j]  # ~ strength / 2 more logit for L's tokens
        return rows.to(torch.float32)

    return make


def synthetic_reader(cfg: RehearsalConfig, tokenizer: Any) -> CheckpointReader:
    """Every tensor of the rehearsal model as a lazily generated entry, in model order."""
    topology = cfg.topology()
    config = topology.to_hf_config()
    dtype = parse_dtype(cfg.dtype)
    signal = language_signal(cfg, tokenizer)
    small = _normal(0.1 * cfg.d_model**-0.5)
    embedding = RandomTensor(keymap.SHARED, (topology.vocab_size, topology.d_model), dtype, _embedding(signal, cfg.d_model))
    common = shared_input_direction(signal, embedding.load()[: len(tokenizer)])
    entries = []
    for name in expected_names(topology):
        shape = expected_shape(name, config, router_rows=topology.num_experts)
        router = keymap.parse_router_key(name)
        if name == keymap.SHARED:
            make = embedding.make
        elif router is not None:
            side = router[0]
            make = _router(signal, side, cfg.encoder_strength if side == "encoder" else cfg.decoder_strength, common)
        elif "layer_norm" in name:
            make = _constant(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            make = _constant(0.0)
        else:
            make = small
        tensor_dtype = torch.float32 if router is not None else dtype
        entries.append(Entry(name, RandomTensor(name, shape, tensor_dtype, make), Path("<synthetic>"), name))  # type: ignore[arg-type]
    return CheckpointReader("synthetic", Path(cfg.out), config, [], entries, Path(cfg.tokenizer))


def generate(cfg: RehearsalConfig, *, progress: bool = True) -> Path:
    if cfg.layout not in LAYOUTS:
        raise SystemExit(f"--layout must be one of {', '.join(LAYOUTS)}, got {cfg.layout!r}")
    tokenizer = load_tokenizer(cfg.tokenizer)
    reader = synthetic_reader(cfg, tokenizer)
    dtype = parse_dtype(cfg.dtype)
    shard_bytes = int(cfg.shard_gb * 2**30)
    with atomic_directory(cfg.out) as tmp:
        if cfg.layout == "fairseq":
            from omegaconf import OmegaConf

            cfg_object = OmegaConf.create(fairseq_cfg(reader.config))  # pickled by reference, as the release's
            write_fairseq(
                reader, tmp, prefix="checkpoint_2_300000", dtype=dtype, cfg=cfg_object, optimizer_numel=int(cfg.optimizer_gb * 2**30) // 8, progress=progress
            )
        else:
            if cfg.layout == "hf-bin":
                write_hf_bin(reader, tmp, dtype=dtype, max_shard_bytes=shard_bytes, model_prefix=cfg.model_prefix, progress=progress)
            else:
                stream_entries(reader, tmp, dtype=dtype, max_shard_bytes=shard_bytes, progress=progress, desc="writing safetensors")
            write_config(reader.config, tmp, dtype=dtype)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "rehearsal.json").write_text(json.dumps({"generator": asdict(cfg), "topology": reader.topology.to_dict()}, indent=2))
    return Path(cfg.out)


def disk_bytes(cfg: RehearsalConfig) -> int:
    """Bytes the weights take in ``cfg.dtype`` (routers fp32), plus a fairseq optimizer state."""
    from pruning.plan import dense_bytes, expert_bytes, router_bytes

    topology = cfg.topology()
    itemsize = parse_dtype(cfg.dtype).itemsize  # type: ignore[union-attr]
    weights = dense_bytes(topology, itemsize) + router_bytes(topology, topology.num_experts) + expert_bytes(topology, topology.num_total_experts, itemsize)
    return weights + (int(cfg.optimizer_gb * 2**30) if cfg.layout == "fairseq" else 0)


def main(argv: Optional[list[str]] = None) -> int:
    from pruning.config import add_dataclass_flags, resolve

    parser = argparse.ArgumentParser(prog="python -m experiments.fullwidth.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(parser, RehearsalConfig)
    cfg = resolve(RehearsalConfig, parser.parse_args(argv))
    free = shutil.disk_usage(Path(cfg.out).resolve().parent if Path(cfg.out).parent.exists() else Path.cwd()).free
    need = disk_bytes(cfg)
    print(f"rehearsal model: {cfg.topology().total_params() / 1e9:.2f}B parameters, {need / 1e9:.1f} GB on disk in {cfg.layout} ({free / 1e9:.0f} GB free)")
    if need > free:
        raise SystemExit(f"not enough disk: {need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free at {Path(cfg.out).parent}")
    out = generate(cfg)
    print(f"wrote {out}; remove it with: rm -rf {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
