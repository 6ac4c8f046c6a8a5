"""Session fixtures: the tiny real-topology model, its tokenizer, and its checkpoints in both layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import fixtures

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):  # noqa: ANN001 - pytest hook
    """Tests marked ``gpu`` need CUDA: skipped where there is none (CPU CI), run on a lent GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    fixtures.make_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from pruning.checkpoint.tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    return fixtures.make_model(len(tiny_tokenizer), seed=0)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, tiny_model, tiny_tokenizer_dir) -> Path:
    return fixtures.write_hf(tiny_model, tmp_path_factory.mktemp("hf"), shards=3, tokenizer_dir=tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_fairseq_dir(tmp_path_factory, tiny_model, tiny_tokenizer_dir) -> Path:
    return fixtures.write_fairseq(tiny_model, tmp_path_factory.mktemp("fairseq"), spm_path=tiny_tokenizer_dir / "sentencepiece.bpe.model")


@pytest.fixture(scope="session")
def tiny_batch(tiny_tokenizer):
    """A padded batch routed by every MoE layer: encoder input, decoder input (teacher forcing)."""
    tok = tiny_tokenizer
    tok.src_lang, tok.tgt_lang = "fra_Latn", "deu_Latn"
    src = fixtures.sentences(4, seed=1)
    tgt = fixtures.sentences(4, seed=2)
    batch = tok(src, text_target=tgt, padding=True, return_tensors="pt")
    labels = batch.pop("labels")
    labels_mask = labels != tok.pad_token_id
    decoder_input_ids = torch.cat([torch.full_like(labels[:, :1], tok.eos_token_id), labels[:, :-1]], dim=1)
    decoder_attention_mask = torch.cat([torch.ones_like(labels_mask[:, :1]), labels_mask[:, :-1]], dim=1).long()
    return {**batch, "decoder_input_ids": decoder_input_ids, "decoder_attention_mask": decoder_attention_mask}


@pytest.fixture(scope="module")
def topology(tiny_hf_dir):
    """The tiny fixture's topology, read from its HF-layout checkpoint."""
    from pruning.checkpoint.reader import open_checkpoint

    return open_checkpoint(tiny_hf_dir).topology


@pytest.fixture(scope="module")
def index_path(tmp_path_factory, topology) -> Path:
    """A per-language expert index of the tiny fixture (tests/export_fixtures.py)."""
    from tests import export_fixtures as ef

    return ef.write_lang_index(tmp_path_factory.mktemp("index") / "experts.json", topology)
