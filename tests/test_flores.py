"""FLORES-200 directory reader and NLLB language codes, on small directories built here."""

from __future__ import annotations

from pathlib import Path

import pytest

from pruning.data.flores import FloresDir, FloresError
from pruning.data.languages import (
    LanguageCodeError,
    is_code_form,
    is_nllb_code,
    is_private_use,
    nllb_codes,
    split_code,
    validate_code,
    validate_codes,
)
from pruning.errors import UserError

SENTENCES = {
    "eng_Latn": ["The cat sleeps.", "Two dogs run.", "It rains."],
    "fra_Latn": ["Le chat dort.", "Deux chiens courent.", "Il pleut."],
    "rus_Cyrl": ["Кошка спит.", "Две собаки бегут.", "Идёт дождь."],
}


def write_split(root: Path, split: str, sentences: dict[str, list[str]], *, newline: str = "\n") -> None:
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    for lang, lines in sentences.items():
        (folder / f"{lang}.{split}").write_bytes("".join(line + newline for line in lines).encode("utf-8"))


@pytest.fixture()
def flores_root(tmp_path: Path) -> Path:
    root = tmp_path / "flores"
    write_split(root, "dev", SENTENCES)
    write_split(root, "devtest", {lang: [s.upper() for s in lines[:2]] for lang, lines in SENTENCES.items()})
    return root


def test_reads_lines_languages_and_splits(flores_root: Path) -> None:
    flores = FloresDir(flores_root)
    assert flores.splits() == ["dev", "devtest"]
    assert flores.languages("dev") == ["eng_Latn", "fra_Latn", "rus_Cyrl"]
    assert flores.read("rus_Cyrl", "dev") == SENTENCES["rus_Cyrl"]
    assert flores.num_lines("dev") == 3
    assert flores.num_lines("devtest") == 2
    assert flores.read("fra_Latn", "devtest") == ["LE CHAT DORT.", "DEUX CHIENS COURENT."]


def test_pairs_are_line_aligned(flores_root: Path) -> None:
    pairs = FloresDir(flores_root).pairs(src="fra_Latn", tgt="eng_Latn", split="dev")
    assert pairs == list(zip(SENTENCES["fra_Latn"], SENTENCES["eng_Latn"]))


def test_release_layout_given_the_parent_directory(tmp_path: Path) -> None:
    write_split(tmp_path / "flores200_dataset", "devtest", SENTENCES)
    flores = FloresDir(tmp_path)
    assert flores.root == tmp_path / "flores200_dataset"
    assert flores.read("eng_Latn", "devtest")[1] == "Two dogs run."


def test_crlf_and_missing_final_newline_and_blank_lines(tmp_path: Path) -> None:
    write_split(tmp_path, "dev", {"eng_Latn": ["a", "", "c"]}, newline="\r\n")
    (tmp_path / "dev" / "fra_Latn.dev").write_text("x\n\nz", encoding="utf-8")  # no final newline
    flores = FloresDir(tmp_path)
    assert flores.read("eng_Latn", "dev") == ["a", "", "c"]
    assert flores.read("fra_Latn", "dev") == ["x", "", "z"]


def test_unicode_line_separators_inside_a_line_are_kept(tmp_path: Path) -> None:
    # str.splitlines() would split on U+2028 / U+0085; FLORES lines are split on "\n" only
    write_split(tmp_path, "dev", {"eng_Latn": ["a\u2028b", "c\x85d"], "fra_Latn": ["x", "y"]})
    assert FloresDir(tmp_path).read("eng_Latn", "dev") == ["a\u2028b", "c\x85d"]


def test_misaligned_split_names_file_and_counts(flores_root: Path) -> None:
    bad = dict(SENTENCES)
    bad["fra_Latn"] = SENTENCES["fra_Latn"][:2]
    write_split(flores_root, "dev", bad)
    flores = FloresDir(flores_root)
    with pytest.raises(FloresError, match=r"not line-aligned: 2 files have 3 lines, but fra_Latn\.dev has 2"):
        flores.read("eng_Latn", "dev")
    assert flores.read("eng_Latn", "devtest")  # the other split is still readable


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FloresError, match="does not exist"):
        FloresDir(tmp_path / "nowhere")


def test_directory_without_splits(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "README").write_text("nothing", encoding="utf-8")
    with pytest.raises(FloresError, match="not a FLORES directory.*flores200_dataset"):
        FloresDir(tmp_path)


def test_unknown_split_lists_valid_splits(flores_root: Path) -> None:
    with pytest.raises(FloresError, match="split 'test' not found.*valid splits here: dev, devtest"):
        FloresDir(flores_root).languages("test")


def test_unknown_language_lists_valid_codes_and_close_matches(flores_root: Path) -> None:
    with pytest.raises(FloresError) as err:
        FloresDir(flores_root).read("fra_Latm", "dev")
    message = str(err.value)
    assert "fra_Latm.dev" in message
    assert "did you mean fra_Latn" in message
    assert "valid codes (3): eng_Latn, fra_Latn, rus_Cyrl" in message
    assert isinstance(err.value, UserError)


def test_swapped_arguments_give_a_clear_error(flores_root: Path) -> None:
    with pytest.raises(FloresError, match="split 'eng_Latn' not found"):
        FloresDir(flores_root).read("dev", "eng_Latn")


def test_badly_named_file_is_an_error(flores_root: Path) -> None:
    (flores_root / "dev" / "french.dev").write_text("x\ny\nz\n", encoding="utf-8")
    with pytest.raises(FloresError, match=r"french\.dev is not named.*'french'"):
        FloresDir(flores_root).languages("dev")


def test_invalid_utf8_names_file_and_line(flores_root: Path) -> None:
    (flores_root / "dev" / "deu_Latn.dev").write_bytes(b"gut\nschl\xff\nja\n")
    with pytest.raises(FloresError, match=r"deu_Latn\.dev is not valid UTF-8 \(line 2"):
        FloresDir(flores_root).read("deu_Latn", "dev")


# ---- language codes ---------------------------------------------------------------------------


def test_nllb_codes_come_from_transformers() -> None:
    codes = nllb_codes()
    assert len(codes) == 202 == len(set(codes))
    assert {"eng_Latn", "fra_Latn", "zho_Hant", "srp_Cyrl"} <= set(codes)
    assert all(is_code_form(code) for code in codes)


@pytest.mark.parametrize(
    ("code", "form", "nllb"),
    [
        ("fra_Latn", True, True),
        ("qen_Latn", True, False),
        ("fra_latn", False, False),
        ("FRA_Latn", False, False),
        ("fr_Latn", False, False),
        ("fra-Latn", False, False),
        ("fra_Latn ", False, False),
        ("", False, False),
    ],
)
def test_code_form(code: str, form: bool, nllb: bool) -> None:
    assert is_code_form(code) is form
    assert is_nllb_code(code) is nllb


def test_private_use_range() -> None:
    assert is_private_use("qaa_Latn") and is_private_use("qtz_Cyrl") and is_private_use("qen_Latn")
    assert not is_private_use("quy_Latn")  # Ayacucho Quechua, a real NLLB language
    assert not any(is_private_use(code) for code in nllb_codes())


def test_validate_code_errors() -> None:
    assert validate_code("fra_Latn") == "fra_Latn"
    assert split_code("zho_Hant") == ("zho", "Hant")
    with pytest.raises(LanguageCodeError, match="'fr' is not of the NLLB form"):
        validate_code("fr")
    with pytest.raises(LanguageCodeError, match="'srp_Latn' is not one of the 202 NLLB-200 languages; did you mean.*'srp_Cyrl'"):
        validate_code("srp_Latn")
    with pytest.raises(LanguageCodeError, match="--src 'qen_Latn' is not one of the 2 languages available here; .*valid: eng_Latn, fra_Latn"):
        validate_code("qen_Latn", known=["eng_Latn", "fra_Latn"], what="--src")
    with pytest.raises(LanguageCodeError, match="'xx'.*; .*'yyy_Zzzz'"):
        validate_codes(["fra_Latn", "xx", "yyy_Zzzz"])
