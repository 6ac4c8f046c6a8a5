"""The testbed tokenizer: a sentencepiece model wrapped as transformers' NllbTokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.testbed import corpus as corpus_mod
from experiments.testbed import tokenizer as tok_mod
from experiments.testbed.synthlangs import LANGUAGES, SOURCE
from pruning.data.flores import FloresDir

SMALL = dict(train_sentences=800, low_resource_sentences=200, dev_sentences=40, devtest_sentences=40)
CODES = [spec.code for spec in LANGUAGES]
COMMITTED = Path(__file__).resolve().parents[1] / "experiments" / "testbed" / "data"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    corpus_mod.write(corpus_mod.generate(0, **SMALL), out)
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(data_dir: Path) -> Path:
    return tok_mod.build(data_dir, data_dir / "tokenizer", vocab_size=1500)


def _spm_size(path: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path / tok_mod.SPM_FILE)).get_piece_size()


def test_ids_follow_the_nllb_layout(tokenizer_dir: Path) -> None:
    tokenizer = tok_mod.load(tokenizer_dir)
    n = _spm_size(tokenizer_dir)
    assert n == 1500
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2, 3)
    assert [tokenizer.convert_tokens_to_ids(code) for code in sorted(CODES)] == list(range(n + 1, n + 1 + len(CODES)))
    assert tokenizer.mask_token_id == n + 1 + len(CODES)
    assert len(tokenizer) == n + len(CODES) + 2  # the model's vocab_size


def test_source_and_target_encoding(tokenizer_dir: Path, data_dir: Path) -> None:
    tokenizer = tok_mod.load(tokenizer_dir)
    flores = FloresDir(data_dir / "flores")
    source, target = flores.pairs(src="qka_Cyrl", tgt="qta_Grek", split="dev")[0]
    tokenizer.src_lang, tokenizer.tgt_lang = "qka_Cyrl", "qta_Grek"
    batch = tokenizer(source, text_target=target)
    pieces = tokenizer.convert_ids_to_tokens(batch["input_ids"])
    assert pieces[0] == "qka_Cyrl" and pieces[-1] == "</s>"  # [src_lang] tokens </s>
    assert "".join(pieces[1:-1]).replace("\u2581", " ").strip() == source
    assert batch["labels"][0] == tokenizer.convert_tokens_to_ids("qta_Grek") and batch["labels"][-1] == 2
    for code in CODES:  # a language code is one token, not split into pieces
        assert tokenizer(code, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(code)]


def test_round_trip_in_every_language_and_script(tokenizer_dir: Path, data_dir: Path) -> None:
    from transformers import AutoTokenizer

    slow = tok_mod.load(tokenizer_dir)
    fast = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert type(fast).__name__ == "NllbTokenizerFast"
    flores = FloresDir(data_dir / "flores")
    scripts = set()
    for code in CODES:
        lines = flores.read(code, "devtest")
        ids = slow(lines)["input_ids"]
        assert ids == fast(lines)["input_ids"], code
        for line, row in zip(lines, ids):
            assert slow.unk_token_id not in row, (code, line)
            assert slow.decode(row, skip_special_tokens=True) == line, code
        scripts.add(code.split("_")[1])
    assert scripts == {"Latn", "Cyrl", "Grek"}


def test_training_is_deterministic(data_dir: Path, tokenizer_dir: Path, tmp_path: Path) -> None:
    again = tok_mod.build(data_dir, tmp_path / "again", vocab_size=1500)
    for name in (tok_mod.SPM_FILE, "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"):
        assert (again / name).read_bytes() == (tokenizer_dir / name).read_bytes(), name


def test_too_large_vocabulary_falls_back_to_what_the_corpus_allows(data_dir: Path, tmp_path: Path) -> None:
    out = tok_mod.build(data_dir, tmp_path / "big", vocab_size=10**6)
    assert 1500 < _spm_size(out) < 10**6


def test_missing_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(tok_mod.TokenizerError, match="no sentencepiece.bpe.model in .*python -m experiments.testbed.tokenizer"):
        tok_mod.load(tmp_path)


@pytest.mark.skipif(not (COMMITTED / "tokenizer" / tok_mod.SPM_FILE).is_file(), reason="default tokenizer not built")
def test_committed_tokenizer_covers_the_committed_corpus() -> None:
    tokenizer = tok_mod.load(COMMITTED / "tokenizer")
    flores = FloresDir(COMMITTED / "flores")
    assert set(flores.languages("devtest")) == set(CODES)
    assert len(tokenizer) == _spm_size(COMMITTED / "tokenizer") + len(CODES) + 2
    for code in CODES:
        for line in flores.read(code, "devtest")[:50]:
            ids = tokenizer(line, add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == line, code
    assert tokenizer.src_lang == SOURCE
