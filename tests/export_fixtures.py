"""Helpers for the export / translate / evaluate tests: expert indices, FLORES-layout dirs, sacrebleu's SPM."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from pruning.index import ExpertIndex, write_index
from pruning.topology import Topology
from tests import fixtures

LANGS = ("fra_Latn", "deu_Latn", "eng_Latn")


def lang_index(topology: Topology, langs=LANGS, *, enc: int = 6, dec: int = 4, seed: int = 0) -> ExpertIndex:
    """A per-language index: ``enc`` random experts in every encoder MoE layer, ``dec`` in every decoder one."""
    generator = torch.Generator().manual_seed(seed)
    entries = {}
    for lang in langs:
        ids = []
        for _, side, layer in topology.iter_moe_layers():
            k = enc if side == "encoder" else dec
            chosen = torch.randperm(topology.num_experts, generator=generator)[:k].tolist()
            ids += [topology.global_id(side, layer, e) for e in chosen]
        entries[lang] = ids
    return ExpertIndex.from_entries("lang", entries)


def write_lang_index(path: Path, topology: Topology, langs=LANGS, **kwargs) -> Path:
    return write_index(lang_index(topology, langs, **kwargs), path)


def expected_direction_experts(index: ExpertIndex, topology: Topology, src: str, tgt: str) -> dict[tuple[str, int], list[int]]:
    """Straight from the paper's convention: the source's encoder ids and the target's decoder ids."""
    out: dict[tuple[str, int], list[int]] = {(side, layer): [] for _, side, layer in topology.iter_moe_layers()}
    n_enc_ids = len(topology.moe_layers("encoder")) * topology.num_experts
    for gid in index.entries[src]:
        if gid < n_enc_ids:
            out[topology.moe_slot(gid // topology.num_experts)].append(gid % topology.num_experts)
    for gid in index.entries[tgt]:
        if gid >= n_enc_ids:
            out[topology.moe_slot(gid // topology.num_experts)].append(gid % topology.num_experts)
    return {k: sorted(v) for k, v in out.items()}


def flores_dir(root: Path, langs=LANGS, *, lines: int = 6) -> Path:
    """A FLORES-200 layout dir (dev/, devtest/), line-aligned across languages (random words per language)."""
    for split_number, split in enumerate(("dev", "devtest")):
        (root / split).mkdir(parents=True, exist_ok=True)
        for lang_number, lang in enumerate(langs):
            text = fixtures.sentences(lines, seed=100 * split_number + lang_number)
            (root / split / f"{lang}.{split}").write_text("\n".join(text) + "\n", encoding="utf-8")
    return root


def install_fake_sacrebleu_spm(sacrebleu_dir: Path, *, name: str = "flores200sacrebleuspm") -> Path:
    """A small SentencePiece model where sacrebleu looks for FLORES-200's (the real one cannot be downloaded here)."""
    models = sacrebleu_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    spm = fixtures.make_spm(sacrebleu_dir / "train")
    target = models / name
    shutil.copyfile(spm, target)
    return target


def talkative_hf_dir(directory: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """The tiny real-topology model with its language-code embeddings shrunk, written in the HF layout.

    The random fixture model otherwise generates language codes, which decode to empty strings; with
    their (tied) output rows small, it generates ordinary pieces, so hypotheses are non-empty text.
    """
    from pruning.checkpoint.tokenizer import load_tokenizer
    from pruning.data.languages import nllb_codes

    tokenizer = load_tokenizer(tokenizer_dir)
    model = fixtures.make_model(len(tokenizer), seed=seed)
    codes = [tokenizer.convert_tokens_to_ids(code) for code in nllb_codes()]
    with torch.no_grad():
        model.model.shared.weight[codes] *= 0.05
    return fixtures.write_hf(model, directory, shards=2, tokenizer_dir=tokenizer_dir)


def many_file_fairseq(tmp_path: Path, monkeypatch) -> Path:  # noqa: ANN001 - pytest's monkeypatch
    """A fairseq checkpoint many times larger than its largest file (d_model 64, 32 experts, 8 layers)."""
    monkeypatch.setitem(fixtures.TINY_WIDTHS, "d_model", 64)
    monkeypatch.setitem(fixtures.TINY_WIDTHS, "ffn_dim", 256)
    model = fixtures.make_model(256, encoder_layers=4, decoder_layers=4, sparse_step=2, num_experts=32)
    return fixtures.write_fairseq(model, tmp_path / "fs", optimizer_numel=10)


class LoadTracker:
    """Bytes of loaded checkpoint tensors alive at once (weak references to their storages); ``peak`` the most."""

    def __init__(self, monkeypatch) -> None:  # noqa: ANN001 - pytest's monkeypatch
        from torch.multiprocessing.reductions import StorageWeakRef

        from pruning.checkpoint import torch_zip

        self.alive: list[tuple[StorageWeakRef, int]] = []
        self.peak = 0
        original = torch_zip.LazyTensor.load
        tracker = self

        def tracked_load(lazy):  # noqa: ANN001, ANN202
            tensor = original(lazy)
            tracker.alive[:] = [(ref, n) for ref, n in tracker.alive if not ref.expired()]
            tracker.alive.append((StorageWeakRef(tensor.untyped_storage()), tensor.untyped_storage().nbytes()))
            tracker.peak = max(tracker.peak, sum(n for _, n in tracker.alive))
            return tensor

        monkeypatch.setattr(torch_zip.LazyTensor, "load", tracked_load)

    def reset(self) -> None:
        self.alive.clear()
        self.peak = 0
