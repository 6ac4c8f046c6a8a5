"""`nllb-prune evaluate`: FLORES directions translated and scored; numbers equal an independent sacrebleu call."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
from sacrebleu.tokenizers import tokenizer_spm

from pruning.cli import main
from pruning.data.directions import DirectionError
from pruning.evaluate import (
    EvaluateError,
    SpmModelMissing,
    check_spm_model,
    compare_scores,
    evaluate_model,
    read_scores,
    spm_model_path,
)
from pruning.export import export_checkpoint, parse_directions
from pruning.manifest import MANIFEST_NAME, ManifestError
from pruning.translate import DecodingOptions
from tests import export_fixtures as ef

FRA, DEU, ENG = ef.LANGS
PAPER = Path(__file__).resolve().parents[2] / "shared" / "data" / "nllb-pruning-paper"
PAPER_FULL = PAPER / "FLORES-devtest-202-54B.tsv"
PAPER_PRUNED = PAPER / "FLORES-devtest-202-pruned80-per-lang-per-layer-importance-3to1.tsv"
LINES = 6


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    from pruning.checkpoint.reader import open_checkpoint

    root = tmp_path_factory.mktemp("evaluate")
    source = ef.talkative_hf_dir(root / "full", tiny_tokenizer_dir)
    index = ef.write_lang_index(root / "experts.json", open_checkpoint(source).topology)
    return export_checkpoint(source, experts=index, out=root / "export", directions=parse_directions(langs=list(ef.LANGS)), dtype=None, progress=False)


@pytest.fixture(scope="module")
def flores(tmp_path_factory) -> Path:
    return ef.flores_dir(tmp_path_factory.mktemp("flores"), lines=LINES)


@pytest.fixture
def spm_installed(tmp_path, monkeypatch) -> Path:
    """sacrebleu's SACREBLEU directory in tmp, holding a small stand-in for the FLORES-200 SPM model."""
    monkeypatch.setattr(tokenizer_spm, "SACREBLEU_DIR", str(tmp_path / "sacrebleu"))
    return ef.install_fake_sacrebleu_spm(tmp_path / "sacrebleu")


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """An empty SACREBLEU directory and no network: any download attempt fails the test at once."""

    def no_download(*args, **kwargs):
        raise AssertionError(f"sacrebleu tried to download {args}")

    monkeypatch.setattr(tokenizer_spm, "SACREBLEU_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(tokenizer_spm, "download_file", no_download)
    monkeypatch.setattr(sacrebleu.utils, "download_file", no_download)
    import urllib.request

    monkeypatch.setattr(urllib.request, "urlopen", no_download)
    return tmp_path / "empty"


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def test_evaluate_end_to_end_equals_independent_sacrebleu(tmp_path, export_dir, flores, spm_installed, capsys):
    out = tmp_path / "run" / "scores.tsv"
    args = [
        "evaluate",
        "--model",
        str(export_dir),
        "--data",
        str(flores),
        "--split",
        "devtest",
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
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out

    lines = read_lines(out)
    assert lines[0] == "direction\tspBLEU\tchrF++\tlen_ratio"
    if PAPER_PRUNED.is_file():
        assert lines[0].split("\t") == PAPER_PRUNED.read_text().split("\n", 1)[0].split("\t")
    rows = [line.split("\t") for line in lines[1:]]
    assert [r[0] for r in rows] == [f"{FRA}-{DEU}", f"{DEU}-{ENG}"]
    summary = json.loads((tmp_path / "run" / "scores.summary.json").read_text())
    chrf_values, bleu_values = [], []
    for (direction, spbleu, chrf, len_ratio), (src, tgt) in zip(rows, [(FRA, DEU), (DEU, ENG)]):
        hyps = read_lines(tmp_path / "run" / "scores.hyp" / f"{src}-{tgt}.txt")
        refs = read_lines(flores / "devtest" / f"{tgt}.devtest")[:4]
        assert len(hyps) == 4 and all(hyps)
        expected_chrf = sacrebleu.corpus_chrf(hyps, [refs], word_order=2).score
        expected_bleu = sacrebleu.corpus_bleu(hyps, [refs], tokenize="flores200")
        assert chrf == f"{expected_chrf:.2f}" and spbleu == f"{expected_bleu.score:.2f}"
        assert len_ratio == f"{expected_bleu.sys_len / expected_bleu.ref_len:.3f}"
        assert summary["scores"][direction]["chrF++"] == pytest.approx(expected_chrf)
        chrf_values.append(expected_chrf)
        bleu_values.append(expected_bleu.score)
    assert summary["mean"]["chrF++"] == pytest.approx(sum(chrf_values) / 2)
    assert summary["mean"]["spBLEU"] == pytest.approx(sum(bleu_values) / 2)
    assert summary["spBLEU_tokenizer"] == "SPM-200"
    assert "tok:flores200" in summary["sacrebleu_signatures"]["spBLEU"]
    assert "nc:6|nw:2" in summary["sacrebleu_signatures"]["chrF++"]
    manifest_sha = hashlib.sha256((export_dir / MANIFEST_NAME).read_bytes()).hexdigest()
    index_sha = hashlib.sha256((export_dir.parent / "experts.json").read_bytes()).hexdigest()
    signature = summary["signature"]
    for part in (
        f"manifest:{manifest_sha[:12]}",
        f"index:{index_sha[:12]}",
        "beam:1|max_new_tokens:6|batch_tokens:4096",
        "device:cpu",
        "n:4",
        f"sacrebleu:{sacrebleu.__version__}",
    ):
        assert part in signature
    assert summary["model"]["path"] == str(export_dir.resolve())
    assert f"mean over 2 direction(s): spBLEU {sum(bleu_values) / 2:.2f}  chrF++ {sum(chrf_values) / 2:.2f}" in printed


def test_missing_spm_model_gives_na_and_still_scores_chrf(tmp_path, export_dir, flores, offline):
    import pruning

    model = pruning.load_model(export_dir)
    with pytest.warns(UserWarning, match=r"needs sacrebleu's SentencePiece model at .*empty/models/flores200sacrebleuspm, which is missing") as caught:
        result = evaluate_model(
            model,
            data=flores,
            out=tmp_path / "s.tsv",
            directions=[(ENG, FRA)],
            options=DecodingOptions(beam=1, max_length=4),
            progress=False,
            log=lambda _: None,
        )
    assert "spBLEU is reported as NA; chrF++ is computed" in str(caught[0].message)
    assert not offline.exists(), "nothing was downloaded or prepared for a download"
    row = read_lines(tmp_path / "s.tsv")[1].split("\t")
    hyps = read_lines(tmp_path / "s.hyp" / f"{ENG}-{FRA}.txt")
    refs = read_lines(flores / "devtest" / f"{FRA}.devtest")
    assert row == [f"{ENG}-{FRA}", "NA", f"{sacrebleu.corpus_chrf(hyps, [refs], word_order=2).score:.2f}", "NA"]
    assert result.summary["mean"]["spBLEU"] is None and result.summary["spBLEU_tokenizer"] is None
    assert result.summary["sacrebleu_signatures"]["spBLEU"].startswith("NA: spBLEU (tokenize='flores200', SPM-200) needs")


def test_check_spm_model_messages(tmp_path, monkeypatch, offline):
    with pytest.raises(SpmModelMissing, match=r"fetch https://tinyurl.com/flores200sacrebleuspm and put it at .*/models/flores200sacrebleuspm"):
        check_spm_model("flores200")
    (offline / "models").mkdir(parents=True)
    (offline / "models" / "sacrebleu_tokenizer_spm.model").write_bytes(b"")
    with pytest.raises(SpmModelMissing, match=r"SPM-100\) needs .*sacrebleu_tokenizer_spm.model, which is empty"):
        check_spm_model("flores101")
    (offline / "models" / "flores200sacrebleuspm").write_bytes(b"not a sentencepiece model")
    from pruning.evaluate import make_bleu

    with pytest.raises(SpmModelMissing, match="is not a readable SentencePiece model"):
        make_bleu("flores200")


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"SACREBLEU": "{tmp}/custom"}, "{tmp}/custom/models/flores200sacrebleuspm"),
        ({"HOME": "{tmp}/home"}, "{tmp}/home/.sacrebleu/models/flores200sacrebleuspm"),
    ],
)
def test_spm_model_path_follows_sacrebleus_directory(tmp_path, env, expected):
    environ = {k: v for k, v in os.environ.items() if k != "SACREBLEU"}
    environ.update({k: v.format(tmp=tmp_path) for k, v in env.items()})
    code = "from pruning.evaluate import spm_model_path; print(spm_model_path('flores200'))"
    done = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == expected.format(tmp=tmp_path)


def test_spm_model_path_in_this_process_is_sacrebleus():
    assert spm_model_path("flores101").name == "sacrebleu_tokenizer_spm.model"
    assert str(spm_model_path("flores200")).startswith(tokenizer_spm.SACREBLEU_DIR)


# ---- comparing score files ---------------------------------------------------------------------------
def write_tsv(path: Path, rows: list[list[str]], header: str = "direction\tspBLEU\tchrF++\tlen_ratio") -> Path:
    path.write_text(header + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    return path


def test_compare_deltas_and_mean(tmp_path):
    ours = write_tsv(tmp_path / "a.tsv", [["x_Latn-y_Latn", "10.00", "30.00", "1.0"], ["y_Latn-x_Latn", "NA", "40.50", "NA"], ["z_Latn-x_Latn", "1", "2", "1"]])
    other = write_tsv(
        tmp_path / "b.tsv",
        [["y_Latn-x_Latn", "5.0", "41.0"], ["x_Latn-y_Latn", "12.5", "29.0"], ["q_Latn-x_Latn", "1", "1"]],
        header="direction\tspBLEU\tchrF++\tlen_ratio",
    )
    comparison = compare_scores(read_scores(ours), read_scores(other))
    assert comparison.mean_delta["chrF++"] == pytest.approx(((30 - 29) + (40.5 - 41)) / 2)
    assert comparison.mean_delta["spBLEU"] == pytest.approx(10 - 12.5)
    assert comparison.counted == {"spBLEU": 1, "chrF++": 2}
    assert comparison.only_ours == ["z_Latn-x_Latn"] and comparison.only_other == 1
    text = "\n".join(comparison.lines())
    assert "mean chrF++ delta over 2 common direction(s): +0.25" in text and "mean spBLEU delta over 1 common direction(s): -2.50" in text


@pytest.mark.parametrize(
    "content, message",
    [
        ("direction\tBLEU\tchrF\nx-y\t1\t2\n", r"header \['direction', 'BLEU', 'chrF'\] lacks column\(s\) \['spBLEU', 'chrF\+\+'\]"),
        ("direction\tspBLEU\tchrF++\nx-y\t1\tabc\n", r":2: 'abc' is not a number"),
        ("direction\tspBLEU\tchrF++\nx-y\t1\t2\nx-y\t1\t2\n", r":3: direction x-y appears twice"),
        ("direction\tspBLEU\tchrF++\nxy\t1\t2\n", r":2: 'xy' is not a direction"),
        ("", r"is empty"),
    ],
)
def test_bad_score_files(tmp_path, content, message):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises((EvaluateError, DirectionError), match=message):
        read_scores(path)


@pytest.mark.skipif(not (PAPER_FULL.is_file() and PAPER_PRUNED.is_file()), reason="the paper's score files are not in ../shared/data")
def test_compare_reads_the_papers_files():
    def mean_chrf(path: Path) -> dict[str, float]:
        with open(path, newline="") as handle:
            reader = csv.reader(handle, delimiter="\t")
            header = next(reader)
            column = header.index("chrF++")
            return {row[0]: float(row[column]) for row in reader}

    full, pruned = mean_chrf(PAPER_FULL), mean_chrf(PAPER_PRUNED)
    expected = sum(pruned[d] - full[d] for d in pruned) / len(pruned)
    comparison = compare_scores(read_scores(PAPER_PRUNED), read_scores(PAPER_FULL))
    assert comparison.counted["chrF++"] == len(pruned) == 40602
    assert comparison.mean_delta["chrF++"] == pytest.approx(expected)
    assert round(sum(pruned.values()) / len(pruned), 2) == 35.46 and round(sum(full.values()) / len(full), 2) == 35.74


@pytest.mark.skipif(not PAPER_FULL.is_file(), reason="the paper's score files are not in ../shared/data")
def test_evaluate_compare_against_the_paper(tmp_path, export_dir, flores, offline, capsys):
    out = tmp_path / "scores.tsv"
    args = [
        "evaluate",
        "--model",
        str(export_dir),
        "--data",
        str(flores),
        "--pairs",
        f"{FRA}-{DEU}",
        "--out",
        str(out),
        "--max-sentences",
        "2",
        "--beam",
        "1",
        "--max-length",
        "3",
        "--device",
        "cpu",
        "--compare",
        str(PAPER_FULL),
    ]
    with pytest.warns(UserWarning):
        assert main(args) == 0
    printed = capsys.readouterr().out
    ours = read_scores(out)[f"{FRA}-{DEU}"]["chrF++"]
    paper = read_scores(PAPER_FULL)[f"{FRA}-{DEU}"]["chrF++"]
    assert f"mean chrF++ delta over 1 common direction(s): {ours - paper:+.2f}" in printed
    assert "mean spBLEU delta over 0 common direction(s): NA" in printed


# ---- bad input -----------------------------------------------------------------------------------------
def test_direction_outside_the_export_fails_before_translating(tmp_path, tiny_hf_dir, flores):
    import pruning
    from pruning.checkpoint.reader import open_checkpoint

    index = ef.write_lang_index(tmp_path / "experts.json", open_checkpoint(tiny_hf_dir).topology)
    single = pruning.load_model(export_checkpoint(tiny_hf_dir, experts=index, out=tmp_path / "one", directions=[(FRA, DEU)], progress=False))
    with pytest.raises(ManifestError, match=r"direction 'deu_Latn-fra_Latn' is not served by this export; it serves: fra_Latn-deu_Latn"):
        evaluate_model(single, data=flores, out=tmp_path / "s.tsv", directions=[(FRA, DEU), (DEU, FRA)], spm="none", progress=False)
    assert not (tmp_path / "s.hyp").exists()


def test_language_missing_from_flores(tmp_path, export_dir, flores, capsys):
    args = ["evaluate", "--model", str(export_dir), "--data", str(flores), "--pairs", f"{FRA}-zul_Latn", "--out", str(tmp_path / "s.tsv"), "--spm", "none"]
    assert main(args) == 2
    assert "language(s) ['zul_Latn'] have no devtest file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--pairs", "a_Latn-b_Latn", "--langs", "fra_Latn,deu_Latn"], "give exactly one of --pairs"),
        ([], "give exactly one of --pairs"),
        (["--langs", "fra_Latn,deu_Latn", "--max-sentences", "0"], "--max-sentences must be positive"),
        (["--langs", "fra_Latn,deu_Latn", "--beam", "0"], "--beam must be a positive integer"),
    ],
)
def test_bad_flags(tmp_path, flores, export_dir, capsys, extra, message):
    assert main(["evaluate", "--model", str(export_dir), "--data", str(flores), "--out", str(tmp_path / "s.tsv"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_zero_experts_flag_scores_the_floor_and_signs_it(tmp_path, export_dir, flores, capsys):
    common = [
        "evaluate",
        "--model",
        str(export_dir),
        "--data",
        str(flores),
        "--pairs",
        f"{ENG}-{FRA}",
        "--beam",
        "1",
        "--max-length",
        "6",
        "--spm",
        "none",
        "--device",
        "cpu",
    ]
    from pruning.cli import main

    assert main([*common, "--out", str(tmp_path / "full.tsv")]) == 0
    assert main([*common, "--zero-experts", "--out", str(tmp_path / "floor.tsv")]) == 0
    full = json.loads((tmp_path / "full.summary.json").read_text())
    floor = json.loads((tmp_path / "floor.summary.json").read_text())
    assert floor["settings"]["no_experts"] and "|experts:none|" in floor["signature"]
    assert not full["settings"]["no_experts"] and "experts:none" not in full["signature"]
    assert read_lines(tmp_path / "floor.hyp" / f"{ENG}-{FRA}.txt") != read_lines(tmp_path / "full.hyp" / f"{ENG}-{FRA}.txt")
