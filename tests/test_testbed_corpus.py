"""The testbed's synthetic corpus: determinism, layout, disjoint splits, and the grammar of each language."""

from __future__ import annotations

import difflib
import hashlib
import json
import unicodedata
from pathlib import Path

import pytest

from experiments.testbed import corpus as corpus_mod
from experiments.testbed.concepts import NOUN, NOUNS, VERBS, content_concepts
from experiments.testbed.grammar import MAX_WORDS, MIN_WORDS, Frame, NounPhrase
from experiments.testbed.synthlangs import LANGUAGES, SOURCE, SPEC, build_languages
from pruning.data.flores import FloresDir
from pruning.data.languages import is_code_form, is_nllb_code, is_private_use

SMALL = dict(train_sentences=1200, low_resource_sentences=300, dev_sentences=80, devtest_sentences=80)
CODES = [spec.code for spec in LANGUAGES]
COMMITTED = Path(__file__).resolve().parents[1] / "experiments" / "testbed" / "data"


@pytest.fixture(scope="module")
def small() -> corpus_mod.Corpus:
    return corpus_mod.generate(0, **SMALL)


@pytest.fixture(scope="module")
def written(small: corpus_mod.Corpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    corpus_mod.write(small, out)
    return out


@pytest.fixture(scope="module")
def languages() -> dict:
    return build_languages(0)


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---- determinism and layout ----------------------------------------------------------------------


def test_same_seed_same_bytes_and_other_seed_differs(written: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    corpus_mod.write(corpus_mod.generate(0, **SMALL), again)
    assert _file_bytes(again) == _file_bytes(written)

    other = tmp_path / "other"
    corpus_mod.write(corpus_mod.generate(1, **SMALL), other)
    first, second = _file_bytes(written), _file_bytes(other)
    assert first.keys() == second.keys()
    for code in CODES:  # every language's text changes, the English-like source included
        assert first[f"flores/dev/{code}.dev"] != second[f"flores/dev/{code}.dev"], code


def test_layout_is_read_by_the_flores_reader(written: Path) -> None:
    flores = FloresDir(written / "flores")
    assert flores.splits() == ["dev", "devtest"]
    assert flores.languages("dev") == sorted(CODES) == flores.languages("devtest")
    assert flores.num_lines("dev") == SMALL["dev_sentences"]
    assert flores.num_lines("devtest") == SMALL["devtest_sentences"]
    assert {p.name for p in (written / "train").iterdir()} == {f"{code}.train" for code in CODES}


def test_manifest_counts_and_hashes(written: Path) -> None:
    manifest = json.loads((written / "corpus.json").read_text(encoding="utf-8"))
    assert manifest["seed"] == 0 and manifest["source"] == SOURCE
    for entry in manifest["languages"]:
        expected = SMALL["low_resource_sentences"] if entry["resource"] == "low" else SMALL["train_sentences"]
        assert entry["train_lines"] == expected
        lines = (written / "train" / f"{entry['code']}.train").read_text(encoding="utf-8").count("\n")
        assert lines == expected, entry["code"]
    for relative, digest in manifest["sha256"].items():
        assert hashlib.sha256((written / relative).read_bytes()).hexdigest() == digest, relative
    assert len(manifest["sha256"]) == 3 * len(CODES)


def test_low_resource_train_files_are_prefixes_and_pairs_align(small: corpus_mod.Corpus, written: Path) -> None:
    low = [s.code for s in LANGUAGES if s.resource == "low"]
    high = [s.code for s in LANGUAGES if s.resource == "high"]
    assert 2 <= len(low) < len(high)
    pairs = corpus_mod.read_train_pairs(written, src="qbe_Latn", tgt="qbo_Latn")  # high -> low
    assert len(pairs) == SMALL["low_resource_sentences"]
    assert pairs[17] == (small.train["qbe_Latn"][17], small.train["qbo_Latn"][17])
    # line i is the same sentence in every language: the English-like line names the same number of things
    full = corpus_mod.read_train_pairs(written, src=SOURCE, tgt="qka_Cyrl")
    assert len(full) == SMALL["train_sentences"]


def test_writing_removes_files_of_an_older_corpus(written: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    corpus_mod.write(corpus_mod.generate(0, **SMALL), out)
    (out / "train" / "qzz_Latn.train").write_text("old\n", encoding="utf-8")
    (out / "flores" / "dev" / "qzz_Latn.dev").write_text("old\n", encoding="utf-8")
    corpus_mod.write(corpus_mod.generate(0, **SMALL), out)
    assert not (out / "train" / "qzz_Latn.train").exists()
    assert not (out / "flores" / "dev" / "qzz_Latn.dev").exists()
    assert not list(out.rglob("*.tmp"))


def test_splits_are_disjoint_and_sentences_unique_in_every_language(small: corpus_mod.Corpus) -> None:
    for code in CODES:
        train, dev, devtest = small.train[code], small.dev[code], small.devtest[code]
        everything = train + dev + devtest
        assert len(set(everything)) == len(everything), code
        assert not set(dev) & set(train) and not set(devtest) & set(train) and not set(dev) & set(devtest)


def test_bad_sizes_are_user_errors() -> None:
    with pytest.raises(corpus_mod.CorpusError, match="--low-resource-sentences must be between 1 and --train-sentences"):
        corpus_mod.generate(0, train_sentences=10, low_resource_sentences=20)
    with pytest.raises(corpus_mod.CorpusError, match="--dev-sentences must be at least 1, got 0"):
        corpus_mod.generate(0, dev_sentences=0)


def test_cli_prints_statistics_and_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--out", str(tmp_path), "--seed", "3", "--train-sentences", "200", "--low-resource-sentences", "50",
            "--dev-sentences", "10", "--devtest-sentences", "10"]  # fmt: skip
    assert corpus_mod.main(args) == 0
    out = capsys.readouterr().out
    assert "10 synthetic languages" in out and "devtest sentence 2:" in out
    assert FloresDir(tmp_path / "flores").read("qta_Grek", "devtest")[0] in out
    assert corpus_mod.main(["--out", str(tmp_path), "--low-resource-sentences", "0"]) == 2
    assert "--low-resource-sentences must be between" in capsys.readouterr().err


# ---- languages -----------------------------------------------------------------------------------


def test_codes_are_synthetic_nllb_style() -> None:
    assert 9 <= len(CODES) <= 12 and len(set(CODES)) == len(CODES)
    for code in CODES:
        assert is_code_form(code) and is_private_use(code) and not is_nllb_code(code), code
    assert {spec.script for spec in LANGUAGES} == {"Latn", "Cyrl", "Grek"}
    assert {spec.order for spec in LANGUAGES} == {"SVO", "SOV", "VSO"}


def test_text_is_in_the_script_of_the_code(small: corpus_mod.Corpus) -> None:
    names = {"Latn": "LATIN", "Cyrl": "CYRILLIC", "Grek": "GREEK"}
    for spec in LANGUAGES:
        letters = {ch for s in small.train[spec.code] for ch in s if ch.isalpha()}
        scripts = {unicodedata.name(ch).split()[0] for ch in letters}
        assert scripts == {names[spec.script]}, (spec.code, scripts)
        assert all(s[0].isupper() and s.endswith(".") for s in small.dev[spec.code]), spec.code


def test_english_like_sentences_have_4_to_9_words(small: corpus_mod.Corpus) -> None:
    lengths = [len(s.split()) for s in small.train[SOURCE] + small.dev[SOURCE]]
    assert min(lengths) >= MIN_WORDS and max(lengths) <= MAX_WORDS
    assert 5 <= sum(lengths) / len(lengths) <= 7


def test_vocabulary_is_modest(small: corpus_mod.Corpus) -> None:
    assert 150 <= len(content_concepts()) <= 250
    source_words = {w.lower().rstrip(".") for s in small.train[SOURCE] for w in s.split()}
    assert len(source_words) < 500


def _transitive(verb: str, *, subject: str = "farmer", obj: str = "apple", tense: str = "pres") -> Frame:
    return Frame("tr", NounPhrase(noun=subject, definite=True), tense, verb=verb, obj=NounPhrase(noun=obj, definite=True))


@pytest.mark.parametrize("subject,obj", [("farmer", "apple"), ("dog", "cake"), ("queen", "egg")])
@pytest.mark.parametrize("tense", ["pres", "past", "fut"])
def test_word_order_verb_position(languages: dict, subject: str, obj: str, tense: str) -> None:
    """Changing only the verb changes exactly one word: last in SOV, first in VSO, inside in SVO."""
    for spec in LANGUAGES:
        if spec.code == SOURCE and tense != "pres":
            continue  # English "will eat" / "did" auxiliaries: checked through the present only
        first = languages[spec.code].words(_transitive("eat", subject=subject, obj=obj, tense=tense))
        second = languages[spec.code].words(_transitive("buy", subject=subject, obj=obj, tense=tense))
        assert len(first) == len(second), spec.code
        changed = [i for i, (a, b) in enumerate(zip(first, second)) if a != b]
        assert len(changed) == 1, (spec.code, first, second)
        position = changed[0]
        if spec.order == "SOV":
            assert position == len(first) - 1, (spec.code, first)
        elif spec.order == "VSO":
            assert position == 0, (spec.code, first)
        else:
            assert 0 < position < len(first) - 1, (spec.code, first)


def _verb_word(languages: dict, code: str, *, plural: bool) -> str:
    frame = Frame("intr", NounPhrase(noun="dog", definite=True, plural=plural), "pres", verb="sleep")
    words = languages[code].words(frame)
    return words[{"SVO": -1, "SOV": -1, "VSO": 0}[SPEC[code].order]]


def test_verb_agreement_suffix_with_plural_subjects(languages: dict) -> None:
    # (3sg ending, 3pl ending) as designed: Belic -a/-an, Karic -/-lAr (harmony), Telic -/-u
    expected_plural = {
        "qbe_Latn": "an", "qbo_Latn": "an", "qbr_Cyrl": "ан", "qka_Cyrl": ("лар", "лер"),
        "qko_Cyrl": ("лар", "лер"), "qkl_Latn": ("lar", "ler"), "qta_Grek": "ου", "qti_Grek": "ου",
    }  # fmt: skip
    for code, ending in expected_plural.items():
        singular, plural = _verb_word(languages, code, plural=False), _verb_word(languages, code, plural=True)
        assert plural.endswith(ending) and not singular.endswith(ending), (code, singular, plural)
        assert plural.startswith(singular.rstrip("aа")), (code, singular, plural)  # same stem, added suffix
    # the isolating language has no agreement: the verb is the same word
    assert _verb_word(languages, "qmi_Latn", plural=False) == _verb_word(languages, "qmi_Latn", plural=True)


def test_belic_adjective_agrees_with_noun_in_gender_and_number(languages: dict) -> None:
    endings = set()
    for noun in NOUNS:
        if not noun.countable or noun.cls not in "PA":
            continue
        for plural in (False, True):
            np = NounPhrase(noun=noun.key, definite=True, plural=plural, adjective="big")
            words = languages["qbe_Latn"].words(Frame("intr", np, "pres", verb="sleep"))
            article, noun_word, adjective = words[0], words[1], words[2]  # article noun adjective verb
            assert noun_word[-1] == adjective[-1] == article[-1], words
            endings.add(noun_word[-1])
    assert endings == set("oaie")  # 2 genders x 2 numbers


def test_karic_plural_suffix_harmony_and_no_plural_after_numerals(languages: dict) -> None:
    back, front = set("aıou"), set("eiöü")
    for noun in NOUNS:
        if not noun.countable:
            continue

        def subject(**kw: object) -> list[str]:
            frame = Frame("intr", NounPhrase(noun=noun.key, definite=True, **kw), "pres", verb="sleep")  # type: ignore[arg-type]  # noqa: B023 - called right away
            return languages["qkl_Latn"].words(frame)

        singular, plural, counted = subject()[0], subject(plural=True)[0], subject(plural=True, numeral="three")[1]
        last_vowel = [ch for ch in singular if ch in back | front][-1]
        assert plural.endswith("lar" if last_vowel in back else "ler"), (singular, plural)
        # the stem is unchanged, but for Kalish's word-final k > h and z > s (lögüh, lögükler; yukus, yukuzlar)
        stem = plural[:-3]
        assert stem == singular or (stem[:-1] == singular[:-1] and (stem[-1], singular[-1]) in {("k", "h"), ("z", "s")}), (singular, plural)
        assert counted == singular  # "three dog", not "three dogs"


def test_karic_accusative_marks_definite_objects_only_where_designed(languages: dict) -> None:
    def object_word(code: str, definite: bool) -> str:
        frame = Frame("tr", NounPhrase(person="1pl", plural=True), "past", verb="see",
                      obj=NounPhrase(noun="horse", definite=definite, plural=True))  # fmt: skip
        words = languages[code].words(frame)
        return words[-2]

    # qka: definite objects only; qko: every object
    assert object_word("qka_Cyrl", True) != object_word("qka_Cyrl", False)
    assert object_word("qka_Cyrl", True).startswith(object_word("qka_Cyrl", False))
    assert object_word("qko_Cyrl", True) == object_word("qko_Cyrl", False)


def test_partial_pro_drop(languages: dict) -> None:
    def length(code: str, person: str) -> int:
        frame = Frame("intr", NounPhrase(person=person, plural=person.endswith("pl")), "past", verb="sleep")
        return len(languages[code].words(frame))

    assert length("qbe_Latn", "1sg") == 1 and length("qbe_Latn", "3sg.f") == 2  # dropped / kept
    assert length("qbo_Latn", "1sg") == 2  # Boran keeps pronouns


def test_related_languages_are_more_alike_than_unrelated(small: corpus_mod.Corpus) -> None:
    def similarity(a: str, b: str) -> float:
        pairs = list(zip(small.devtest[a], small.devtest[b]))
        return sum(difflib.SequenceMatcher(None, x, y).ratio() for x, y in pairs) / len(pairs)

    assert similarity("qbe_Latn", "qbo_Latn") > similarity("qbe_Latn", "qkl_Latn") + 0.2
    assert similarity("qka_Cyrl", "qko_Cyrl") > similarity("qka_Cyrl", "qbr_Cyrl") + 0.2
    assert similarity("qta_Grek", "qti_Grek") > 0.5


def test_every_language_distinguishes_every_content_concept(languages: dict) -> None:
    """No two nouns (or two verbs) of a language are written alike in the same context."""
    for spec in LANGUAGES:
        nouns = {" ".join(languages[spec.code].words(Frame("intr", NounPhrase(noun=n.key), "pres", verb="sleep"))) for n in NOUNS}
        assert len(nouns) == len(NOUNS), spec.code
        verbs = {" ".join(languages[spec.code].words(_transitive(v.key, obj="apple"))) for v in VERBS}
        assert len(verbs) == len(VERBS), spec.code


def test_mass_nouns_never_plural(small: corpus_mod.Corpus) -> None:
    words = {w.lower().rstrip(".") for s in small.train[SOURCE] for w in s.split()}
    assert "waters" not in words and "a water" not in " ".join(small.train[SOURCE]).lower()
    assert not NOUN["water"].countable and NOUN["dog"].countable


# ---- the committed default corpus ----------------------------------------------------------------


@pytest.mark.skipif(not (COMMITTED / "corpus.json").is_file(), reason="default corpus not generated")
def test_committed_corpus_is_what_the_generator_makes(tmp_path: Path) -> None:
    manifest = json.loads((COMMITTED / "corpus.json").read_text(encoding="utf-8"))
    corpus_mod.write(corpus_mod.generate(manifest["seed"]), tmp_path)
    regenerated = json.loads((tmp_path / "corpus.json").read_text(encoding="utf-8"))
    assert regenerated == manifest
    for relative, digest in manifest["sha256"].items():
        assert hashlib.sha256((COMMITTED / relative).read_bytes()).hexdigest() == digest, relative


def test_readme_language_table_matches_the_generator() -> None:
    readme = (COMMITTED.parent / "README.md").read_text(encoding="utf-8")
    for spec in LANGUAGES:
        row = f"| `{spec.code}` | {spec.name} | {spec.family} | {spec.order} | {spec.script} | {spec.resource} | {spec.summary} |"
        assert row in readme, spec.code
