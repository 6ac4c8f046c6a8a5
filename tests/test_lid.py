"""Language identification (pruning/lid.py) and the off-target rate of `nllb-prune evaluate --lid`."""

from __future__ import annotations

import json
import math
import random
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from pruning.cli import main
from pruning.evaluate import EvaluateError, evaluate_model, read_scores
from pruning.lid import (
    FASTTEXT_MAGIC,
    UNDETERMINED,
    LidError,
    NaiveBayesLid,
    accuracy,
    char_ngrams,
    load_lid,
    off_target_rate,
    read_language_texts,
    train_naive_bayes,
)
from pruning.translate import DecodingOptions
from tests import export_fixtures as ef

FRA, DEU, ENG = ef.LANGS
# Three made-up "languages": two share the Latin alphabet but not their syllables, one is Cyrillic.
SYLLABLES = {
    FRA: ["ka", "lo", "mi", "ne", "ta", "ri"],
    DEU: ["sch", "ur", "ben", "gut", "ost", "elt"],
    ENG: ["да", "ко", "лу", "ни", "ве", "жа"],
}


def synthetic(lang: str, n: int, *, seed: int) -> list[str]:
    rng = random.Random(f"{lang}-{seed}")
    words = lambda: "".join(rng.choice(SYLLABLES[lang]) for _ in range(rng.randint(1, 3)))  # noqa: E731
    return [" ".join(words() for _ in range(rng.randint(3, 7))).capitalize() + "." for _ in range(n)]


def synthetic_flores(root: Path, *, lines: int = 6, train: int = 60) -> Path:
    """FLORES layout with dev/, devtest/ (aligned) and train/ (``train`` lines) of the synthetic languages."""
    for split, n, seed in (("dev", lines, 1), ("devtest", lines, 2), ("train", train, 3)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for lang in SYLLABLES:
            (root / split / f"{lang}.{split}").write_text("\n".join(synthetic(lang, n, seed=seed)) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synthetic_flores(tmp_path_factory.mktemp("lid-flores"))


@pytest.fixture(scope="module")
def lid_file(data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lid") / "lid.json"
    assert main(["train-lid", "--data", str(data), "--split", "train", "--out", str(path), "--ngram-max", "3"]) == 0
    return path


# ---- naive Bayes -----------------------------------------------------------------------------------------
def test_char_ngrams_of_the_normalised_text():
    assert char_ngrams("  Ab\tB ", lo=1, hi=2) == {"a": 1, "b": 2, " a": 1, "ab": 1, "b ": 2, " b": 1}  # all-space grams left out
    assert char_ngrams(" \n", lo=1, hi=3) == {}


def test_naive_bayes_log_probability_by_hand():
    lid = train_naive_bayes({"aaa_Latn": ["ab"], "bbb_Latn": ["ba"]}, ngram_range=(1, 2), alpha=1.0)
    # " ab ": a, b, ' a', ab, 'b ' (5 n-grams); " ba ": b, a, ' b', ba, 'a ' (5); V = 2 + 6 = 8.
    assert len(lid.vocab) == 8
    # "ab" holds a, b, ' a', ab, 'b '; each language: (count + 1) / (5 + 8); language bbb never saw the 3 bigrams
    expected_a = 5 * math.log(2 / 13)
    expected_b = 2 * math.log(2 / 13) + 3 * math.log(1 / 13)
    np.testing.assert_allclose(lid.log_scores(["ab"])[0], [expected_a, expected_b], rtol=1e-12)
    assert lid.predict(["ab", "ba", "", "zz", "Ab."]) == ["aaa_Latn", "bbb_Latn", UNDETERMINED, UNDETERMINED, "aaa_Latn"]
    # --max-features 3: by summed relative frequency a = b (2/5, ties by text) > each bigram (1/5, ' a' first by text)
    assert train_naive_bayes({"aaa_Latn": ["ab"], "bbb_Latn": ["ba"]}, ngram_range=(1, 2), max_features=3).vocab == ("a", "b", " a")


def test_naive_bayes_identifies_held_out_sentences():
    train = {lang: synthetic(lang, 40, seed=0) for lang in SYLLABLES}
    held_out = {lang: synthetic(lang, 30, seed=99) for lang in SYLLABLES}
    lid = train_naive_bayes(train, ngram_range=(1, 3))
    assert lid.languages() == sorted(SYLLABLES)
    assert accuracy(lid, held_out) == {lang: 100.0 for lang in SYLLABLES}
    mixed = [held_out[DEU][0], held_out[ENG][0], held_out[FRA][0]]
    assert lid.predict(mixed) == [DEU, ENG, FRA]


def test_save_load_round_trip(tmp_path):
    lid = train_naive_bayes({lang: synthetic(lang, 20, seed=0) for lang in SYLLABLES}, ngram_range=(1, 4), alpha=0.5, max_features=50)
    path = lid.save(tmp_path / "lid.json")
    loaded = load_lid(path)
    assert isinstance(loaded, NaiveBayesLid) and loaded.kind == "naive-bayes"
    texts = [s for lang in SYLLABLES for s in synthetic(lang, 10, seed=7)] + ["", "qqq"]
    assert loaded.predict(texts) == lid.predict(texts)
    np.testing.assert_array_equal(loaded.log_scores(texts), lid.log_scores(texts))
    assert (loaded.vocab, loaded.ngram_range, loaded.alpha) == (lid.vocab, (1, 4), 0.5)
    identity = loaded.identity()
    assert identity["kind"] == "naive-bayes" and identity["path"] == str(path.resolve()) and len(identity["sha256"]) == 64
    assert "\n" not in path.read_text().rstrip("\n"), "one compact JSON line"


def good_json(tmp_path) -> dict:
    path = train_naive_bayes({"aaa_Latn": ["ab"], "bbb_Latn": ["ba"]}).save(tmp_path / "ok.json")
    return json.loads(path.read_text())


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("cut.json", lambda d: json.dumps(d)[:40], r"JSON error at line 1"),
        ("other.json", lambda d: json.dumps({**d, "format": "something-else"}), r"'format' must be 'nllb-prune-lid-naive-bayes', found 'something-else'"),
        ("lang.json", lambda d: json.dumps({**d, "languages": ["aaa_Latn", "french"]}), r"'languages' must be a sorted list"),
        (
            "index.json",
            lambda d: json.dumps({**d, "counts": {**d["counts"], "aaa_Latn": [[0, 999], [1, 1]]}}),
            r"counts of aaa_Latn: index 999 outside the vocabulary of",
        ),
        ("missing.json", lambda d: json.dumps({k: v for k, v in d.items() if k != "vocab"}), r"missing key\(s\) \['vocab'\]"),
        ("model.bin", lambda d: "not fasttext", r"has a fastText extension but is not a fastText model"),
        ("model.txt", lambda d: "__label__fra_Latn hello", r"is not a language-identification model: expected a fastText model"),
    ],
)
def test_malformed_files_name_the_file(tmp_path, name, change, message):
    path = tmp_path / name
    path.write_text(change(good_json(tmp_path)))
    with pytest.raises(LidError, match=message) as caught:
        load_lid(path)
    assert str(path) in str(caught.value)


def test_missing_file(tmp_path):
    with pytest.raises(LidError, match=r"nope.json does not exist"):
        load_lid(tmp_path / "nope.json")


def test_train_lid_cli_reads_unaligned_splits_and_reports_accuracy(tmp_path, data, capsys):
    short = tmp_path / "flores"
    synthetic_flores(short, train=30)
    (short / "train" / f"{ENG}.train").write_text("\n".join(synthetic(ENG, 7, seed=3)) + "\n")  # fewer lines, like a low-resource language
    out = tmp_path / "lid.json"
    argv = ["train-lid", "--data", str(short), "--split", "train", "--langs", f"{FRA},{ENG}", "--out", str(out), "--eval-split", "devtest"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["languages"] == sorted([FRA, ENG]) and saved["sentences"] == {ENG: 7, FRA: 30}
    assert saved["source"]["split"] == "train"
    assert f"  {FRA}\t100.00\t(6 sentences)" in printed and "mean\t100.00" in printed
    assert main(["train-lid", "--data", str(short), "--split", "train", "--langs", "zzz_Latn", "--out", str(out)]) == 2
    assert "zzz_Latn" in capsys.readouterr().err


def test_read_language_texts_default_all_languages(data):
    texts = read_language_texts(data, split="dev", max_sentences=2)
    assert sorted(texts) == sorted(SYLLABLES) and all(len(v) == 2 for v in texts.values())
    assert texts[DEU] == synthetic(DEU, 6, seed=1)[:2]


# ---- fastText (a stand-in module: no real model can be downloaded here) -----------------------------------
class FakeFastText:
    def __init__(self, labels, answers):
        self.labels, self.answers, self.calls = labels, answers, []

    def get_labels(self):
        return list(self.labels)

    def predict(self, texts, k=1):
        assert isinstance(texts, list) and k == 1
        self.calls.append(texts)
        return [[self.answers[t]] for t in texts], [np.array([0.9])] * len(texts)


def fake_module(monkeypatch, model) -> list[str]:
    loaded: list[str] = []
    module = types.ModuleType("fasttext")
    module.load_model = lambda path: loaded.append(path) or model
    monkeypatch.setitem(sys.modules, "fasttext", module)
    return loaded


def fasttext_file(path: Path) -> Path:
    path.write_bytes(FASTTEXT_MAGIC + b"\x0c\x00\x00\x00 rest of a model")
    return path


def test_fasttext_labels_map_to_flores_codes(tmp_path, monkeypatch):
    model = FakeFastText(["__label__fra_Latn", "__label__deu_Latn"], {"bonjour": "__label__fra_Latn", "guten tag": "__label__deu_Latn"})
    loaded = fake_module(monkeypatch, model)
    path = fasttext_file(tmp_path / "lid218e.bin")
    lid = load_lid(path)
    assert loaded == [str(path)] and lid.kind == "fasttext"
    assert lid.languages() == [DEU, FRA]
    assert lid.predict(["bonjour", "guten\ntag", " "]) == [FRA, DEU, UNDETERMINED]
    assert model.calls == [["bonjour", "guten tag"]], "newlines become spaces; blank texts are not sent"
    assert lid.identity()["kind"] == "fasttext" and len(lid.identity()["sha256"]) == 64


def test_fasttext_with_other_labels_is_refused(tmp_path, monkeypatch):
    fake_module(monkeypatch, FakeFastText(["__label__fr", "__label__de"], {}))
    path = fasttext_file(tmp_path / "lid.176.ftz")
    with pytest.raises(LidError, match=r"lid.176.ftz: fastText label '__label__fr' is not of the form __label__xxx_Xxxx"):
        load_lid(path)


def test_fasttext_missing_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fasttext", None)  # import fasttext -> ImportError
    path = fasttext_file(tmp_path / "lid218e.bin")
    with pytest.raises(LidError, match=r"lid218e.bin is a fastText model; .* needs the optional package fasttext.*pip install fasttext-wheel"):
        load_lid(path)


def test_real_fasttext_model(tmp_path):
    """Only where the optional package is installed: a tiny supervised model with FLORES labels."""
    fasttext = pytest.importorskip("fasttext")
    lines = [f"__label__{lang} {s}" for lang in SYLLABLES for s in synthetic(lang, 50, seed=0)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    model = fasttext.train_supervised(str(tmp_path / "train.txt"), epoch=20, minn=1, maxn=3, verbose=0, seed=0, thread=1)
    model.save_model(str(tmp_path / "m.bin"))
    lid = load_lid(tmp_path / "m.bin")
    assert lid.kind == "fasttext" and lid.languages() == sorted(SYLLABLES)
    held_out = {lang: synthetic(lang, 10, seed=5) for lang in SYLLABLES}
    assert min(accuracy(lid, held_out).values()) >= 90


# ---- evaluate --lid ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return ef.talkative_hf_dir(tmp_path_factory.mktemp("lid-model") / "full", tiny_tokenizer_dir)


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def test_evaluate_with_lid_equals_the_classifiers_share(tmp_path, model_dir, data, lid_file, capsys):
    out = tmp_path / "scores.tsv"
    argv = [
        "evaluate",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--pairs",
        f"{FRA}-{DEU},{DEU}-{ENG}",
        "--out",
        str(out),
        "--max-sentences",
        "4",
        "--beam",
        "1",
        "--max-length",
        "6",
        "--device",
        "cpu",
        "--spm",
        "none",
        "--lid",
        str(lid_file),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    lid = load_lid(lid_file)
    lines = read_lines(out)
    assert lines[0] == "direction\tspBLEU\tchrF++\tlen_ratio\toff_target"
    summary = json.loads((tmp_path / "scores.summary.json").read_text())
    expected = {}
    for line, (src, tgt) in zip(lines[1:], [(FRA, DEU), (DEU, ENG)]):
        hyps = read_lines(tmp_path / "scores.hyp" / f"{src}-{tgt}.txt")
        predicted = lid.predict(hyps)
        expected[f"{src}-{tgt}"] = 100 * sum(p != tgt for p in predicted) / len(hyps)
        assert line.split("\t")[4] == f"{expected[f'{src}-{tgt}']:.2f}"
        assert summary["scores"][f"{src}-{tgt}"]["off_target"] == pytest.approx(expected[f"{src}-{tgt}"])
    mean = sum(expected.values()) / 2
    assert summary["mean"]["off_target"] == pytest.approx(mean)
    assert summary["lid"]["kind"] == "naive-bayes" and summary["lid"]["path"] == str(lid_file.resolve())
    assert summary["lid"]["sha256"] == __import__("hashlib").sha256(lid_file.read_bytes()).hexdigest()
    assert f"|lid:naive-bayes:{summary['lid']['sha256'][:12]}" in summary["signature"]
    assert f"off-target {mean:.2f}%" in printed
    assert read_scores(out)[f"{FRA}-{DEU}"]["off_target"] == pytest.approx(expected[f"{FRA}-{DEU}"], abs=0.005)


def test_copies_of_the_source_are_off_target(tmp_path, model_dir, data, lid_file, monkeypatch):
    """Hypotheses: 2 copies of the source, 1 reference, 1 empty line -> 3 of 4 off-target, by construction."""
    import pruning

    def fake_translate(model, sentences, *, src, tgt, **kwargs):
        refs = read_lines(data / "devtest" / f"{tgt}.devtest")
        return [sentences[0], sentences[1], refs[2], ""]

    monkeypatch.setattr(pruning.translate, "translate_sentences", fake_translate)
    lid = load_lid(lid_file)
    sources, refs = read_lines(data / "devtest" / f"{FRA}.devtest"), read_lines(data / "devtest" / f"{ENG}.devtest")
    assert lid.predict([sources[0], sources[1], refs[2], ""]) == [FRA, FRA, ENG, UNDETERMINED]  # the premise
    model = pruning.load_model(model_dir)
    result = evaluate_model(
        model, data=data, out=tmp_path / "s.tsv", directions=[(FRA, ENG)], max_sentences=4, spm="none", lid=lid, progress=False, log=lambda _: None
    )
    assert result.scores[0].off_target == 75.0 and result.summary["mean"]["off_target"] == 75.0
    assert off_target_rate([ENG, ENG], ENG) == 0.0


def test_without_lid_outputs_are_unchanged(tmp_path, model_dir, data):
    import pruning

    result = evaluate_model(
        pruning.load_model(model_dir),
        data=data,
        out=tmp_path / "s.tsv",
        directions=[(FRA, DEU)],
        max_sentences=2,
        options=DecodingOptions(beam=1, max_length=3),
        spm="none",
        progress=False,
        log=lambda _: None,
    )
    assert read_lines(tmp_path / "s.tsv")[0] == "direction\tspBLEU\tchrF++\tlen_ratio"
    assert "lid" not in result.summary and "off_target" not in result.summary["mean"]
    assert "off_target" not in result.summary["scores"][f"{FRA}-{DEU}"] and "|lid:" not in result.summary["signature"]
    assert "off_target" not in read_scores(tmp_path / "s.tsv")[f"{FRA}-{DEU}"]


def test_target_unknown_to_the_lid_fails_before_translating(tmp_path, model_dir, data, capsys):
    lid = train_naive_bayes({FRA: synthetic(FRA, 5, seed=0), DEU: synthetic(DEU, 5, seed=0)}).save(tmp_path / "two.json")
    argv = [
        "evaluate",
        "--model",
        str(tmp_path / "no-model"),
        "--data",
        str(data),
        "--pairs",
        f"{FRA}-{ENG}",
        "--out",
        str(tmp_path / "s.tsv"),
        "--spm",
        "none",
        "--lid",
        str(lid),
    ]
    assert main(argv) == 2
    assert f"target language(s) ['{ENG}'] are not among the 2 languages it identifies ({DEU}, {FRA})" in capsys.readouterr().err
    assert not (tmp_path / "s.hyp").exists()
    with pytest.raises(EvaluateError, match="not among the 2 languages"):
        from pruning.evaluate import check_lid_targets

        check_lid_targets(load_lid(lid), [ENG])
