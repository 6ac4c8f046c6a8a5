"""Hostile input, as a new user would try it (issue #17): every failure is one line naming the culprit, nothing is lost.

The table runs each bad input through the CLI (in-process ``pruning.cli.main``; a few through a real
``python -m pruning`` for the exit path) against copies of the embedded testbed model and its FLORES data,
and asserts exit code 2, exactly one line on stderr (``nllb-prune CMD: error: ...``) naming the culprit, no
traceback, and every previous output byte-identical (and no new file beside them). The tests after the
table check what the fixes do when the input is fine: locks taken over, partials cleaned, FIFOs read,
long lines split, merges that keep a direction once, modes that follow the umask.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch

from pruning.cli import main
from pruning.locking import claim_output, lock_path
from pruning.stats.counters import RoutingStats

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "experiments" / "testbed" / "model"
FLORES = ROOT / "experiments" / "testbed" / "data" / "flores"
QBE, QEN, QKA = "qbe_Latn", "qen_Latn", "qka_Cyrl"
LINES = 8


# ---- the bed: inputs and the previous outputs that no failure may touch ------------------------------
@dataclass
class Bed:
    root: Path

    @property
    def inputs(self) -> Path:
        return self.root / "inputs"

    @property
    def out(self) -> Path:
        """The previous outputs: every case must leave this folder byte-identical."""
        return self.root / "outputs"

    @property
    def flores(self) -> Path:
        return self.inputs / "flores"

    @property
    def stats(self) -> Path:
        return self.out / "stats.safetensors"

    @property
    def experts(self) -> Path:
        return self.out / "experts.json"

    @property
    def export(self) -> Path:
        return self.out / "export"

    @property
    def scores(self) -> Path:
        return self.out / "scores.tsv"

    def variant(self, name: str, *, source: Path = MODEL, config: Optional[dict[str, Any]] = None, files: Optional[dict[str, bytes | str]] = None) -> Path:
        """A copy of ``source`` (symlinks: the tracked files are only read) with ``config.json`` keys or whole files replaced."""
        directory = self.inputs / "variants" / name
        if directory.exists():
            return directory
        directory.mkdir(parents=True)
        replaced = dict(files or {})
        if config:
            data = json.loads((source / "config.json").read_text())
            data.update(config)
            replaced["config.json"] = json.dumps(data)
        for item in source.iterdir():
            if item.name in replaced:
                content = replaced[item.name]
                (directory / item.name).write_bytes(content if isinstance(content, bytes) else content.encode())
            else:
                (directory / item.name).symlink_to(item.resolve())
        return directory

    def text(self, name: str, content: bytes | str) -> Path:
        path = self.inputs / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path


def small_flores(root: Path, *, languages: tuple[str, ...] = (QBE, QEN, QKA), change: Optional[str] = None) -> Path:
    """The first lines of some testbed FLORES files; ``change`` alters the first line of that language."""
    (root / "dev").mkdir(parents=True)
    for lang in languages:
        source = FLORES / "dev" / f"{lang if lang in (QBE, QEN, QKA) else QBE}.dev"
        lines = source.read_text(encoding="utf-8").splitlines()[:LINES]
        if lang == change:
            lines[0] = "Changed " + lines[0]
        (root / "dev" / f"{lang}.dev").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def run_cli(argv: list[str]) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own errors
        return int(exc.code)


@pytest.fixture(scope="module")
def bed(tmp_path_factory) -> Bed:
    bed = Bed(tmp_path_factory.mktemp("hostile"))
    bed.out.mkdir()
    small_flores(bed.flores)
    small_flores(bed.inputs / "flores-changed", change=QBE)
    small_flores(bed.inputs / "flores-extra", languages=(QBE, QEN, "xyz_Latn"))
    stats = ["stats", "--model", MODEL, "--data", bed.flores, "--langs", f"{QBE},{QEN}", "--no-progress"]
    assert run_cli([*stats, "--max-sentences", 4, "--out", bed.stats]) == 0
    assert run_cli([*stats, "--first-sentence", 2, "--max-sentences", 4, "--out", bed.inputs / "lines-2-5.safetensors"]) == 0
    assert run_cli(["select", "--stats", bed.stats, "--out", bed.experts, "--ratio", 0.5]) == 0
    assert run_cli(["export", "--model", MODEL, "--experts", bed.experts, "--langs", f"{QBE},{QEN}", "--out", bed.export, "--dtype", "fp32"]) == 0
    assert run_cli(["convert", MODEL, "--out", bed.inputs / "sharded", "--shard-gb", 0.004]) == 0
    bed.scores.write_text("direction\tspBLEU\tchrF++\tlen_ratio\nqbe_Latn-qen_Latn\tNA\t50.00\tNA\n")
    (bed.out / "scores.hyp").mkdir()
    (bed.out / "scores.hyp" / f"{QBE}-{QEN}.txt").write_text("an earlier hypothesis\n")
    (bed.out / "scores.summary.json").write_text("{}\n")
    (bed.out / "plots").mkdir()
    (bed.out / "plots" / "usage-qbe_Latn.png").write_bytes(b"an earlier picture")
    bed.text("sentences.txt", "Una tisina gagurira la sosa.\nUno fino minira.\n")
    return bed


def snapshot(directory: Path) -> dict[str, Any]:
    """Every path under ``directory``: its content's sha256 (or "dir") and its mode."""
    found = {}
    for path in sorted(directory.rglob("*")):
        kind = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        found[str(path.relative_to(directory))] = (kind, path.stat().st_mode)
    return found


# ---- the table --------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    argv: Callable[[Bed], list[Any]]
    expect: Callable[[Bed], list[str]]
    """Substrings of the one error line: the culprit, expected and actual values."""
    stdin: Optional[bytes] = None
    hold: Optional[Callable[[Bed], Any]] = None
    """A context manager held around the run (another run's lock on an output)."""
    marks: list[Any] = field(default_factory=list)


def same(*items: str) -> Callable[[Bed], list[str]]:
    return lambda b: list(items)


def model_case(id: str, config: dict[str, Any], *expect: str, command: str = "info") -> Case:
    def argv(b: Bed) -> list[Any]:
        model = b.variant(id, config=config)
        if command == "stats":
            return ["stats", "--model", model, "--data", b.flores, "--langs", f"{QBE},{QEN}", "--out", b.out / "new.safetensors", "--no-progress"]
        if command == "export":
            return ["export", "--model", model, "--experts", b.experts, "--langs", f"{QBE},{QEN}", "--out", b.out / "new-export"]
        return ["info", model]

    return Case(id, argv, lambda b: [str(b.inputs / "variants" / id), *expect])


def unwritable(command: str, argv: Callable[[Bed, Path], list[Any]], flag: str = "--out") -> Case:
    """``command`` writing below a regular file (the previous statistics file): refused before any work."""
    return Case(
        f"unwritable-{command}",
        lambda b: argv(b, b.stats / "sub" / "target"),
        lambda b: [f"{flag} {b.stats / 'sub' / 'target'}", f"{b.stats} is a file, not a directory"],
    )


def pid_line(b: Bed) -> list[str]:
    return ["is being written by nllb-prune", f"pid {os.getpid()}"]


BAD_UTF8 = "Una tisina.\nUno fado d\xe9gurira.\n".encode("latin-1")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a CPU-only torch")

CASES = [
    # 1. config.json against the weights
    model_case("experts-32", {"num_experts": 32}, "num_experts is 32", "hold 16 expert(s)", "set num_experts to 16", command="export"),
    model_case("experts-8", {"num_experts": 8}, "num_experts is 8", "up to index 15", "set num_experts to 16", command="stats"),
    model_case("experts-word", {"num_experts": "sixteen"}, "num_experts must be an integer >= 1, got 'sixteen'"),
    model_case("d-model", {"d_model": 96}, "do not match the config", "config expects"),
    model_case("layers", {"encoder_layers": 6}, "missing for the model in config"),
    model_case("heads", {"decoder_attention_heads": 3}, "decoder_attention_heads (3) must divide d_model (128)"),
    model_case("pad-id", {"pad_token_id": 99999}, "pad_token_id must be a token id in 0..vocab_size-1 (4012), got 99999"),
    model_case("config-list", {}, "expected a JSON object"),  # replaced below by a JSON list
    # 2. concurrent runs on one output
    Case(
        "locked-stats",
        lambda b: [
            "stats",
            "--model",
            MODEL,
            "--data",
            b.flores,
            "--langs",
            f"{QBE},{QEN}",
            "--max-sentences",
            4,
            "--resume",
            "--out",
            b.stats,
            "--no-progress",
        ],
        pid_line,
        hold=lambda b: claim_output(b.stats, command="stats"),
    ),
    Case(
        "locked-export",
        lambda b: ["export", "--model", MODEL, "--experts", b.experts, "--langs", f"{QBE},{QEN}", "--out", b.export, "--overwrite"],
        pid_line,
        hold=lambda b: claim_output(b.export, command="export", kind="directory"),
    ),
    Case(
        "locked-evaluate",
        lambda b: ["evaluate", "--model", MODEL, "--data", b.flores, "--split", "dev", "--pairs", f"{QBE}-{QEN}", "--out", b.scores, "--spm", "none"],
        pid_line,
        hold=lambda b: claim_output(b.scores, command="evaluate"),
    ),
    # 3. --resume with other data
    Case(
        "resume-other-data",
        lambda b: [
            "stats",
            "--model",
            MODEL,
            "--data",
            b.inputs / "flores-changed",
            "--langs",
            f"{QBE},{QEN}",
            "--max-sentences",
            4,
            "--resume",
            "--out",
            b.stats,
            "--no-progress",
        ],
        lambda b: ["--resume", str(b.stats), "other sentences", f"{QBE}.dev", "sha256"],
    ),
    # 4. evaluate and translate check every direction before translating
    Case(
        "evaluate-unknown-code",
        lambda b: [
            "evaluate",
            "--model",
            MODEL,
            "--data",
            b.inputs / "flores-extra",
            "--split",
            "dev",
            "--pairs",
            f"{QBE}-{QEN},{QEN}-xyz_Latn",
            "--out",
            b.scores,
            "--spm",
            "none",
            "--beam",
            1,
        ],
        same(f"direction {QEN}-xyz_Latn: target language 'xyz_Latn' is not a language code of this model's tokenizer", "it knows 10 codes: qbe_Latn"),
    ),
    Case(
        "stats-unknown-code",
        lambda b: [
            "stats",
            "--model",
            MODEL,
            "--data",
            b.inputs / "flores-extra",
            "--langs",
            f"{QBE},xyz_Latn",
            "--out",
            b.out / "new-dir" / "stats.safetensors",
            "--no-progress",
        ],  # and no empty new-dir/ left
        same("the model's tokenizer has no language code for ['xyz_Latn']; it knows 10 codes: qbe_Latn"),
    ),
    Case(
        "translate-unknown-code",
        lambda b: ["translate", "--model", MODEL, "--src", QBE, "--tgt", "xyz_Latn", "--input", b.inputs / "sentences.txt"],
        same("--tgt 'xyz_Latn' is not a language code", "it knows 10 codes: qbe_Latn, qbo_Latn"),
    ),
    # 5. an unwritable output location, in every writing command, before any work
    unwritable("stats", lambda b, o: ["stats", "--model", MODEL, "--data", b.flores, "--langs", f"{QBE},{QEN}", "--out", o, "--no-progress"]),
    unwritable("merge-stats", lambda b, o: ["merge-stats", b.stats, "--out", o]),
    unwritable("select", lambda b, o: ["select", "--stats", b.stats, "--out", o]),
    unwritable("prune", lambda b, o: ["prune", "--model", MODEL, "--stats", b.stats, "--langs", f"{QBE},{QEN}", "--ratio", 0.5, "--out", o]),
    unwritable("plot", lambda b, o: ["plot", "--experts", b.experts, "--out", o]),
    unwritable("compare-metrics", lambda b, o: ["compare-metrics", "--stats", b.stats, "--out", o]),
    unwritable("stability", lambda b, o: ["stability", "--stats", b.stats, "--out", o]),
    unwritable("export", lambda b, o: ["export", "--model", MODEL, "--experts", b.experts, "--langs", f"{QBE},{QEN}", "--out", o]),
    unwritable("convert", lambda b, o: ["convert", MODEL, "--out", o]),
    unwritable(
        "translate",
        lambda b, o: ["translate", "--model", MODEL, "--src", QBE, "--tgt", QEN, "--input", b.inputs / "sentences.txt", "--output", o],
        flag="--output",
    ),
    unwritable("evaluate", lambda b, o: ["evaluate", "--model", MODEL, "--data", b.flores, "--split", "dev", "--pairs", f"{QBE}-{QEN}", "--out", o]),
    unwritable("train-lid", lambda b, o: ["train-lid", "--data", b.flores, "--out", o]),
    Case(
        "out-is-a-directory",
        lambda b: ["select", "--stats", b.stats, "--out", b.out / "scores.hyp"],
        lambda b: [f"--out {b.out / 'scores.hyp'} is a directory; expected the name of a file"],
    ),
    Case(
        "export-out-is-a-file",
        lambda b: ["export", "--model", MODEL, "--experts", b.experts, "--langs", f"{QBE},{QEN}", "--out", b.scores, "--overwrite"],
        lambda b: [f"--out {b.scores} is a file; expected a directory"],
    ),
    Case(
        "export-overwrite-bad-index",
        lambda b: [
            "export",
            "--model",
            MODEL,
            "--experts",
            b.text("bad-index.json", '{"qbe_Latn": [1,'),
            "--langs",
            f"{QBE},{QEN}",
            "--out",
            b.export,
            "--overwrite",
        ],
        lambda b: [f"expert index {b.inputs / 'bad-index.json'} is not valid JSON (line 1"],
    ),
    # 5. malformed files
    Case(
        "yaml-syntax",
        lambda b: ["select", "--config", b.text("bad.yaml", "stats: [a,\nratio: 0.5\n"), "--out", b.out / "new.json"],
        lambda b: [f"--config {b.inputs / 'bad.yaml'} is not valid YAML (line"],
    ),
    Case(
        "yaml-list",
        lambda b: ["select", "--config", b.text("list.yaml", "- stats\n- out\n"), "--out", b.out / "new.json"],
        lambda b: [f"--config {b.inputs / 'list.yaml'} must hold a mapping of keys", "found a YAML list"],
    ),
    Case(
        "corrupt-spm",
        lambda b: [
            "translate",
            "--model",
            b.variant("spm", files={"sentencepiece.bpe.model": b"\x00not a sentencepiece model" * 40}),
            "--src",
            QBE,
            "--tgt",
            QEN,
            "--input",
            b.inputs / "sentences.txt",
        ],
        same("cannot load the tokenizer", "could not parse ModelProto", "sentencepiece.bpe.model"),
    ),
    Case(
        "tokenizer-config",
        lambda b: [
            "translate",
            "--model",
            b.variant("tokcfg", files={"tokenizer_config.json": '{"model_max_length": '}),
            "--src",
            QBE,
            "--tgt",
            QEN,
            "--input",
            b.inputs / "sentences.txt",
        ],
        same("tokenizer config", "tokenizer_config.json is not valid JSON (line 1"),
    ),
    Case(
        "manifest-syntax",
        lambda b: ["info", b.variant("manifest-syntax", source=b.export, files={"pruning_manifest.json": '{"format": '})],
        same("pruning_manifest.json: not a readable JSON manifest"),
    ),
    Case(
        "manifest-list",
        lambda b: ["info", b.variant("manifest-list", source=b.export, files={"pruning_manifest.json": "[]"})],
        same("pruning_manifest.json: not an nllb-prune export manifest (format 'list'"),
    ),
    Case(
        "manifest-experts",
        lambda b: [
            "translate",
            "--model",
            b.variant("manifest-experts", source=b.export, files={"pruning_manifest.json": wrong_experts(b)}),
            "--src",
            QBE,
            "--tgt",
            QEN,
            "--input",
            b.inputs / "sentences.txt",
        ],
        same("'experts' does not list the experts the weights hold", "encoder layer 1"),
    ),
    Case(
        "index-list",
        lambda b: ["info", b.variant("index-list", source=b.inputs / "sharded", files={"model.safetensors.index.json": "[1, 2]"})],
        same("model.safetensors.index.json: malformed shard index", "got a JSON list"),
    ),
    Case(
        "index-null",
        lambda b: ["info", b.variant("index-null", source=b.inputs / "sharded", files={"model.safetensors.index.json": '{"weight_map": null}'})],
        same("model.safetensors.index.json: malformed shard index", "'weight_map': NoneType"),
    ),
    Case(
        "input-latin1",
        lambda b: ["translate", "--model", MODEL, "--src", QBE, "--tgt", QEN, "--input", b.text("latin1.txt", BAD_UTF8)],
        lambda b: [f"--input {b.inputs / 'latin1.txt'} is not valid UTF-8: line 2, byte 22"],
    ),
    Case(
        "stdin-latin1", lambda b: ["translate", "--model", MODEL, "--src", QBE, "--tgt", QEN], same("stdin is not valid UTF-8: line 2, byte 22"), stdin=BAD_UTF8
    ),
    Case(
        "device-cuda",
        lambda b: ["translate", "--model", MODEL, "--src", QBE, "--tgt", QEN, "--input", b.inputs / "sentences.txt", "--device", "cuda"],
        same("--device cuda: this torch", "CPU-only build; use --device cpu"),
        marks=[NO_CUDA],
    ),
    Case(
        "stats-device-cuda",
        lambda b: ["stats", "--model", MODEL, "--data", b.flores, "--langs", f"{QBE},{QEN}", "--out", b.out / "new.safetensors", "--device", "cuda:0"],
        same("--device cuda:0: this torch"),
        marks=[NO_CUDA],
    ),
    Case(
        "dash-value",
        lambda b: ["select", "--stats", b.stats, "--out", b.out / "new.json", "--enc-dec", "-1:3"],
        same("--enc-dec parts must be positive, got '-1:3'"),
    ),
    Case(
        "missing-value",
        lambda b: ["select", "--stats", b.stats, "--out", b.out / "new.json", "--ratio"],
        same("argument --ratio: expected one argument (see nllb-prune select --help)"),
    ),
    Case(
        "flag-as-value",
        lambda b: ["stats", "--model", MODEL, "--data", b.flores, "--langs", f"{QBE},{QEN}", "--out", "--resume"],
        same("argument --out: expected one argument"),
    ),
    # 6. inputs users pass
    Case(
        "input-directory",
        lambda b: ["translate", "--model", MODEL, "--src", QBE, "--tgt", QEN, "--input", b.inputs],
        lambda b: [f"--input {b.inputs} is a directory"],
    ),
    Case(
        "long-line",
        lambda b: ["translate", "--model", MODEL, "--src", QBE, "--tgt", QEN, "--input", b.text("long.txt", "Uno fino minira.\n" + "sosa " * 400 + "\n")],
        lambda b: [f"line 2 of {b.inputs / 'long.txt'} has", "more than the 256 positions the model reads", "--long-input truncate", "or split"],
    ),
    # 7. merge-stats
    Case(
        "merge-self",
        lambda b: ["merge-stats", b.stats, b.stats, "--out", b.out / "merged.safetensors"],
        lambda b: [f"{b.stats} is given twice", "added to themselves"],
    ),
    Case(
        "merge-into-input",
        lambda b: ["merge-stats", b.stats, b.inputs / "lines-2-5.safetensors", "--out", b.stats],
        lambda b: [f"--out {b.stats} is also an input"],
    ),
    Case("select-into-stats", lambda b: ["select", "--stats", b.stats, "--out", b.stats], lambda b: [f"--out {b.stats} is also an input (--stats {b.stats})"]),
    Case(
        "merge-overlap",
        lambda b: ["merge-stats", b.stats, b.inputs / "lines-2-5.safetensors", "--out", b.out / "merged.safetensors"],
        same(f"direction {QBE}-{QEN} was counted over lines 2..5 there and over lines 0..3", "the ranges overlap"),
    ),
    # plan (issue 13)
    Case(
        "plan-memory-format",
        lambda b: ["plan", "--model", "nllb-moe-54b", "--gpu-mem", "32 gigs"],
        same("--gpu-mem must be a size like 32GB, 24GiB, 80G or 512MB, got '32 gigs'"),
    ),
    Case(
        "plan-negative-batch",
        lambda b: ["plan", "--model", "nllb-moe-54b", "--gpu-mem", "32GB", "--batch", "-4"],
        same("--batch must be a positive integer, got -4"),
    ),
    Case(
        "plan-foreign-selection",
        lambda b: ["plan", "--model", "nllb-moe-54b", "--gpu-mem", "32GB", "--experts", b.experts, "--langs", f"{QBE},{QEN}"],
        lambda b: [f"{b.experts} does not fit this model"],
    ),
    Case(
        "plan-unknown-model",
        lambda b: ["plan", "--model", "nllb-moe-3b", "--gpu-mem", "32GB"],
        same("--model 'nllb-moe-3b' is neither a checkpoint path nor a preset (nllb-moe-54b)"),
    ),
]
CASES[7] = Case(
    "config-list",
    lambda b: ["info", b.variant("config-list", files={"config.json": "[16]"})],
    lambda b: [f"{b.inputs / 'variants' / 'config-list' / 'config.json'}: expected a JSON object of config keys, found a JSON list"],
)


def wrong_experts(b: Bed) -> str:
    manifest = json.loads((b.export / "pruning_manifest.json").read_text())
    manifest["experts"]["encoder.1"] = manifest["experts"]["encoder.1"][1:]
    return json.dumps(manifest)


def test_the_table_covers_every_writing_command():
    from pruning.cli import COMMANDS

    readers = {"info", "plan"}
    assert {c.id.removeprefix("unwritable-") for c in CASES if c.id.startswith("unwritable-")} == set(COMMANDS) - readers


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_is_one_line_and_loses_nothing(case: Case, bed: Bed, capsys, monkeypatch):
    argv = case.argv(bed)
    if case.stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(case.stdin), encoding="utf-8"))
    capsys.readouterr()
    with case.hold(bed) if case.hold else contextlib.nullcontext():
        before = snapshot(bed.out)
        rc = run_cli(argv)
        after = snapshot(bed.out)
    err = capsys.readouterr().err
    lines = err.strip("\n").split("\n")
    assert rc == 2, err
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    command = next(a for a in map(str, argv) if not a.startswith("-"))
    assert lines[0].startswith(f"nllb-prune {command}: error: "), lines[0]
    assert "Traceback" not in err
    for part in case.expect(bed):
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    assert after == before, "a failed run changed the previous outputs"


# ---- the real exit path: a separate process, its exit status and its whole stderr --------------------
@pytest.mark.parametrize("case_id", ["experts-word", "yaml-syntax", "corrupt-spm"])
def test_bad_input_in_a_real_process(case_id: str, bed: Bed):
    case = next(c for c in CASES if c.id == case_id)
    argv = [str(a) for a in case.argv(bed)]
    before = snapshot(bed.out)
    done = subprocess.run(
        [sys.executable, "-m", "pruning", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().split("\n")) == 1, done.stderr
    assert all(part in done.stderr for part in case.expect(bed)), done.stderr
    assert snapshot(bed.out) == before


# ---- locks -----------------------------------------------------------------------------------------
HOLDER = """
import sys, time
from pruning.locking import claim_output
with claim_output(sys.argv[1], command="stats"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_lock_held_by_another_process_names_it_and_a_dead_ones_lock_is_taken_over(bed: Bed, tmp_path, capsys):
    out = tmp_path / "stats.safetensors"
    argv = ["stats", "--model", MODEL, "--data", bed.flores, "--langs", f"{QBE},{QEN}", "--max-sentences", 2, "--out", out, "--no-progress"]
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_cli(argv) == 2
        err = capsys.readouterr().err
        assert f"--out {out} is being written by nllb-prune stats (pid {holder.pid} on " in err and not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # killed: the kernel released its lock, its file remains; the next run takes it over and says whose it was
    assert json.loads(lock_path(out).read_text())["pid"] == holder.pid
    assert run_cli(argv) == 0
    err = capsys.readouterr().err
    assert f"taking over the lock {lock_path(out)} left by nllb-prune stats (pid {holder.pid}" in err
    assert out.is_file() and not lock_path(out).exists()


def test_stale_partial_outputs_of_dead_processes_are_removed(bed: Bed, tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    partial = tmp_path / f".export.partial-{dead}"
    (partial / "sub").mkdir(parents=True)
    (partial / "sub" / "shard-00001.safetensors.partial").write_bytes(b"half a shard")
    leftover = tmp_path / f".export.tmp-{dead}"
    leftover.write_text("x")
    alive = tmp_path / f".export.partial-{os.getppid()}"
    alive.mkdir()
    argv = ["export", "--model", MODEL, "--experts", bed.experts, "--langs", f"{QBE},{QEN}", "--out", tmp_path / "export"]
    assert run_cli(argv) == 0
    err = capsys.readouterr().err
    assert not partial.exists() and not leftover.exists() and f"removed {partial}, a partial output left by process {dead}, which is gone" in err
    assert alive.is_dir() and f"left {alive} in place: process {os.getppid()} is still running" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_is_refused_before_any_work(bed: Bed, tmp_path, capsys):
    locked = tmp_path / "read-only"
    locked.mkdir(mode=0o555)
    out = locked / "stats.safetensors"
    assert run_cli(["stats", "--model", MODEL, "--data", bed.flores, "--langs", f"{QBE},{QEN}", "--out", out, "--no-progress"]) == 2
    assert f"--out {out}: cannot write in {locked} (Permission denied)" in capsys.readouterr().err


def test_outputs_follow_the_umask(bed: Bed, tmp_path):
    previous = os.umask(0o022)
    try:
        assert run_cli(["merge-stats", bed.stats, "--out", tmp_path / "stats.safetensors"]) == 0
        assert run_cli(["export", "--model", MODEL, "--experts", bed.experts, "--langs", f"{QBE},{QEN}", "--out", tmp_path / "export"]) == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "stats.safetensors").stat().st_mode & 0o777 == 0o644
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "export").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


# ---- evaluate writes its three outputs as one set -----------------------------------------------------
def test_evaluate_failing_midway_keeps_the_previous_set(bed: Bed, tmp_path, monkeypatch, capsys):
    out = tmp_path / "scores.tsv"
    argv = [
        "evaluate",
        "--model",
        MODEL,
        "--data",
        bed.flores,
        "--split",
        "dev",
        "--pairs",
        f"{QBE}-{QEN},{QEN}-{QBE}",
        "--out",
        out,
        "--spm",
        "none",
        "--beam",
        1,
        "--max-length",
        8,
        "--max-sentences",
        2,
    ]
    assert run_cli(argv) == 0
    before = snapshot(tmp_path)
    import pruning.translate

    real = pruning.translate.translate_sentences

    def second_fails(model, sentences, *, src, **kwargs):
        if src == QEN:
            raise OSError(28, "No space left on device")
        return real(model, sentences, src=src, **kwargs)

    monkeypatch.setattr(pruning.translate, "translate_sentences", second_fails)
    with pytest.raises(OSError):
        main([str(a) for a in argv])
    assert snapshot(tmp_path) == before, "the TSV, the summary and the hypotheses stay the previous run's"


# ---- inputs users pass --------------------------------------------------------------------------------
def test_a_fifo_is_read_as_input(bed: Bed, tmp_path, capsys):
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("Una tisina gagurira la sosa.\nUno fino minira.\n"))
    writer.start()
    assert run_cli(["translate", "--model", MODEL, "--src", QBE, "--tgt", QEN, "--input", fifo, "--beam", 1, "--max-length", 8, "--device", "cpu"]) == 0
    writer.join(timeout=10)
    assert len(capsys.readouterr().out.splitlines()) == 2


@pytest.mark.parametrize("choice, pieces", [("truncate", 1), ("split", 3)])
def test_long_input_is_truncated_or_split_with_a_warning(choice: str, pieces: int, bed: Bed, tmp_path, capsys, monkeypatch):
    import pruning.translate

    calls: list[int] = []
    real_fit = pruning.translate.fit_sources

    def counting_fit(encoded, **kwargs):
        out = real_fit(encoded, **kwargs)
        calls.extend(len(ids) for ids in out[0])
        return out

    monkeypatch.setattr(pruning.translate, "fit_sources", counting_fit)
    long = " ".join(["sosa"] * 600)  # 600 tokens: 3 pieces of at most 254 + the code and </s>
    source = tmp_path / "in.txt"
    source.write_text(f"Uno fino minira.\n{long}\n", encoding="utf-8")
    assert (
        run_cli(
            [
                "translate",
                "--model",
                MODEL,
                "--src",
                QBE,
                "--tgt",
                QEN,
                "--input",
                source,
                "--beam",
                1,
                "--max-length",
                4,
                "--long-input",
                choice,
                "--device",
                "cpu",
                "--output",
                tmp_path / "out.txt",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert f"warning: line 2 of {source} has " in err and "more than the 256 positions" in err
    assert len(calls) == 1 + pieces and max(calls) <= 256
    outputs = (tmp_path / "out.txt").read_text(encoding="utf-8").split("\n")
    assert len(outputs) == 3 and outputs[1] and outputs[2] == ""


def test_split_cuts_before_a_word_when_it_can():
    from pruning.translate import split_tokens

    starts = {0, 3, 5, 9}  # token ids that begin a word
    body = list(range(12))
    assert split_tokens(body, size=6, word_start=lambda t: t in starts) == [[0, 1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]
    assert split_tokens(body, size=4, word_start=lambda t: False) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


# ---- merge-stats: the documented per-language workflow --------------------------------------------------
def test_per_language_files_merge_without_counting_a_direction_twice(bed: Bed, tmp_path, capsys):
    def collect(lang: str, partners: str, out: Path, *extra: Any) -> RoutingStats:
        assert (
            run_cli(
                [
                    "stats",
                    "--model",
                    MODEL,
                    "--data",
                    bed.flores,
                    "--lang",
                    lang,
                    "--partners",
                    partners,
                    "--max-sentences",
                    3,
                    "--out",
                    out,
                    "--no-progress",
                    *extra,
                ]
            )
            == 0
        )
        return RoutingStats.load(out)

    qbe = collect(QBE, f"{QEN},{QKA}", tmp_path / "qbe.safetensors")
    qen = collect(QEN, f"{QBE},{QKA}", tmp_path / "qen.safetensors")
    assert run_cli(["merge-stats", tmp_path / "qbe.safetensors", tmp_path / "qen.safetensors", "--out", tmp_path / "all.safetensors"]) == 0
    assert (
        f"merged 2 file(s), 6 direction(s) (2 of them counted over the same sentences in several files, kept once: {QBE}-{QEN}, {QEN}-{QBE})"
        in capsys.readouterr().out
    )
    merged = RoutingStats.load(tmp_path / "all.safetensors")
    for direction, side, name, value in merged.items():
        alone = (qbe if direction in qbe.counters else qen).counters[direction][side][name]
        assert torch.equal(value, alone), f"{direction}/{side}/{name} is not one file's counter"
    # the next sentences of one direction add up; the same sentences with other counters are refused
    collect(QEN, QBE, tmp_path / "next.safetensors", "--first-sentence", 3)
    assert run_cli(["merge-stats", tmp_path / "all.safetensors", tmp_path / "next.safetensors", "--out", tmp_path / "more.safetensors"]) == 0
    more = RoutingStats.load(tmp_path / "more.safetensors")
    tokens = more.counters[f"{QBE}-{QEN}"]["enc"]["tokens"]
    assert torch.all(tokens > merged.counters[f"{QBE}-{QEN}"]["enc"]["tokens"])
    tampered = RoutingStats.load(tmp_path / "qen.safetensors")
    tampered.counters[f"{QBE}-{QEN}"]["dec"]["top1"][0, 0] += 1
    tampered.save(tmp_path / "tampered.safetensors")
    capsys.readouterr()
    assert run_cli(["merge-stats", tmp_path / "qbe.safetensors", tmp_path / "tampered.safetensors", "--out", tmp_path / "bad.safetensors"]) == 2
    assert (
        f"direction {QBE}-{QEN} was counted over the same sentences (lines 0..2) there and in the file(s) before it, but its counter dec/top1 differs"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "bad.safetensors").exists()


def test_resume_on_the_same_data_elsewhere_is_accepted(bed: Bed, tmp_path):
    out = tmp_path / "stats.safetensors"
    shutil.copy(bed.stats, out)
    copy = shutil.copytree(bed.flores, tmp_path / "flores-copy")
    argv = ["stats", "--model", MODEL, "--data", copy, "--langs", f"{QBE},{QEN},{QKA}", "--max-sentences", 4, "--resume", "--out", out, "--no-progress"]
    assert run_cli(argv) == 0
    stats = RoutingStats.load(out)
    assert len(stats.directions) == 6 and f"{QKA}.dev" in stats.info["data"]["files"]
