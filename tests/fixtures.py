"""Tiny NLLB-MoE artefacts with the REAL topology, built in seconds, written in both layouts.

- 24+24 layers, MoE at layers 3, 7, ..., 23 of each side, 128 experts per MoE layer, top-2 routing;
- tiny widths (d_model 16, FFN 32, 2 heads) and random seeded weights; routers scaled up so that
  tokens spread over many experts (not just experts 0 and 1);
- a tiny sentencepiece model wrapped in the real ``NllbTokenizer`` (the 202 NLLB language codes);
- writers for the HF layout (safetensors or .bin, single or sharded, with or without ``model.``) and
  the fairseq layout (``-shared.pt`` + ``-rank-<r>.pt``, with a cfg object and optimizer state that
  a loader must neither execute nor read). The fairseq names are written here by hand, independently
  of the library's key table, so the reader is tested against a second source of truth.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Optional

import torch

from pruning.model.build import NllbMoeForPruning, build_empty_model, init_random_weights
from pruning.model.saving import canonical_tensors
from pruning.topology import Topology

TINY_WIDTHS = dict(d_model=16, ffn_dim=32, heads=2, max_positions=64)
WORDS = (
    "the a small large red blue house river mountain city people child dog cat tree water fire stone "
    "walks runs sees gives takes makes sings writes reads eats drinks sleeps near under over with from to "
    "quickly slowly today tomorrow yesterday because although every some many few one two three"
).split()


def sentences(n: int, *, seed: int = 0) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 10, (1,), generator=generator))
        idx = torch.randint(0, len(WORDS), (length,), generator=generator).tolist()
        out.append(" ".join(WORDS[i] for i in idx).capitalize() + ".")
    return out


def make_spm(directory: Path, *, vocab_size: int = 120) -> Path:
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences(400)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    path = directory / "sentencepiece.bpe.model"
    path.write_bytes(model.getvalue())
    return path


def make_tokenizer(directory: Path):  # noqa: ANN201
    from transformers import NllbTokenizer

    spm_path = make_spm(directory)
    tokenizer = NllbTokenizer(vocab_file=str(spm_path))
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def tiny_config(vocab_size: int, *, num_experts: int = 128, encoder_layers: int = 24, decoder_layers: int = 24, sparse_step: int = 4):
    topology = Topology(
        encoder_layers=encoder_layers,
        decoder_layers=decoder_layers,
        encoder_sparse_step=sparse_step,
        decoder_sparse_step=sparse_step,
        num_experts=num_experts,
        d_model=TINY_WIDTHS["d_model"],
        ffn_dim=TINY_WIDTHS["ffn_dim"],
        vocab_size=vocab_size,
        encoder_attention_heads=TINY_WIDTHS["heads"],
        decoder_attention_heads=TINY_WIDTHS["heads"],
    )
    return topology.to_hf_config(max_position_embeddings=TINY_WIDTHS["max_positions"])


def make_model(vocab_size: int, *, seed: int = 0, **config_kwargs) -> NllbMoeForPruning:
    model = build_empty_model(tiny_config(vocab_size, **config_kwargs))
    init_random_weights(model, seed=seed, std=0.3, router_std=3.0)
    return model


# ---- HF layout -------------------------------------------------------------------------------------
def write_hf(
    model: NllbMoeForPruning,
    directory: Path,
    *,
    fmt: str = "safetensors",
    shards: int = 1,
    model_prefix: bool = False,
    tokenizer_dir: Optional[Path] = None,
) -> Path:
    """Write ``model`` as an HF checkpoint the way ``transformers`` would (tied copies included)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {("model." if model_prefix else "") + n: t.clone().contiguous() for n, t in canonical_tensors(model)}
    if model_prefix:
        tensors["lm_head.weight"] = tensors["model.shared.weight"].clone()
    names = list(tensors)
    chunks = [names[i::shards] for i in range(shards)]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    base = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, chunk in enumerate(chunks, start=1):
        filename = f"{base}.{ext}" if shards == 1 else f"{base}-{i:05d}-of-{shards:05d}.{ext}"
        part = {n: tensors[n] for n in chunk}
        if fmt == "safetensors":
            save_file(part, str(directory / filename), metadata={"format": "pt"})
        else:
            torch.save(part, directory / filename)
        weight_map.update({n: filename for n in chunk})
    if shards > 1:
        (directory / f"{base}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = model.config.to_dict()
    (directory / "config.json").write_text(json.dumps(config))
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            (directory / f.name).write_bytes(f.read_bytes())
    return directory


# ---- fairseq layout --------------------------------------------------------------------------------
class FairseqCfg:
    """Stands for fairseq's omegaconf ``cfg``: pickled by reference, so loaders must not import it."""

    def __init__(self, heads: int):
        self.model = {"encoder_attention_heads": heads, "decoder_attention_heads": heads, "moe_expert_count": 128}
        self.checkpoint = {"save_dir": "/nonexistent"}


def _to_fairseq_name(name: str) -> Optional[str]:
    replacements = [
        (".ffn.fc1.", ".fc1."),
        (".ffn.fc2.", ".fc2."),
        (".ff_layer_norm.", ".final_layer_norm."),
        (".cross_attention_layer_norm.", ".encoder_attn_layer_norm."),
        (".cross_attention.", ".encoder_attn."),
        (".ffn.router.classifier.weight", ".moe_layer.gate.wg.weight"),
    ]
    for old, new in replacements:
        name = name.replace(old, new)
    return name


def write_fairseq(
    model: NllbMoeForPruning,
    directory: Path,
    *,
    prefix: str = "checkpoint_2_300000",
    replicas: bool = False,
    spm_path: Optional[Path] = None,
    optimizer_numel: int = 1000,
) -> Path:
    """Write ``{prefix}-shared.pt`` and ``{prefix}-rank-{r}.pt`` (and replicas r+E if asked)."""
    directory.mkdir(parents=True, exist_ok=True)
    heads = model.config.encoder_attention_heads
    shared: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in canonical_tensors(model):
        tensor = tensor.clone()
        if name == "shared.weight":
            shared["encoder.embed_tokens.weight"] = tensor
            shared["decoder.embed_tokens.weight"] = tensor
            shared["decoder.output_projection.weight"] = tensor
            continue
        if ".ffn.experts.expert_" in name:
            head, tail = name.split(".ffn.experts.expert_")
            expert, rest = tail.split(".", 1)
            experts.setdefault(int(expert), {})[f"{head}.moe_layer.experts.0.{rest}"] = tensor
            continue
        shared[_to_fairseq_name(name)] = tensor
    for side in ("encoder", "decoder"):
        shared[f"{side}.version"] = torch.tensor([3.0])
        shared[f"{side}.embed_positions._float_tensor"] = torch.tensor([])
    optimizer = {"state": {0: {"exp_avg": torch.randn(optimizer_numel), "exp_avg_sq": torch.rand(optimizer_numel)}}}
    torch.save(
        {"model": shared, "cfg": FairseqCfg(heads), "args": None, "last_optimizer_state": optimizer, "extra_state": {"epoch": 2}},
        directory / f"{prefix}-shared.pt",
    )
    n = len(experts)
    for rank in range(2 * n if replicas else n):
        state = experts[rank % n]
        torch.save(
            {"model": state, "cfg": FairseqCfg(heads), "optimizer_history": [{"num_updates": 300000}]},
            directory / f"{prefix}-rank-{rank}.pt",
        )
    if spm_path is not None:
        (directory / "sentencepiece.bpe.model").write_bytes(spm_path.read_bytes())
    return directory


def truncate(path: Path, keep_fraction: float = 0.5) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(int(size * keep_fraction))
    os.sync() if hasattr(os, "sync") else None


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m tests.fixtures --out DIR``: write the tiny model in both layouts (for `make demo`)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tokenizer = make_tokenizer(args.out / "tokenizer")
    model = make_model(len(tokenizer), seed=args.seed)
    write_hf(model, args.out / "hf", shards=2, tokenizer_dir=args.out / "tokenizer")
    write_fairseq(model, args.out / "fairseq", spm_path=args.out / "tokenizer" / "sentencepiece.bpe.model")
    print(f"tiny real-topology model written to {args.out}/hf (HF layout) and {args.out}/fairseq (fairseq layout)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
