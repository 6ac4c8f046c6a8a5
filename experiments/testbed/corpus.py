"""The testbed's synthetic multilingual parallel corpus: generation, files on disk, statistics.

    python -m experiments.testbed.corpus --out experiments/testbed/data --seed 0

Every sentence is a random :class:`~experiments.testbed.grammar.Frame` realised in every language of
:data:`~experiments.testbed.synthlangs.LANGUAGES`, so the corpus is multi-way parallel. Nothing comes
from outside: the same seed gives the same bytes.

Layout written under ``--out``::

    corpus.json                        seed, language table, line counts, sha256 of every file
    train/{lang}.train                 line i of every file = sentence i; a low-resource language
                                       has fewer lines: it holds sentences 0 .. n-1 (a prefix), so
                                       a direction src-tgt has min(n_src, n_tgt) training pairs
                                       (:func:`read_train_pairs`)
    flores/dev/{lang}.dev              FLORES-200 layout, line-aligned across all languages
    flores/devtest/{lang}.devtest      (read them with pruning.data.flores.FloresDir)

No sentence occurs twice in one language, so dev, devtest and train are disjoint in every language.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from experiments.testbed import concepts
from experiments.testbed.grammar import sample_sentence_frame
from experiments.testbed.synthlangs import SOURCE, SPEC, LanguageSpec, build_languages
from pruning.errors import UserError

FORMAT = "nllb-prune-testbed-corpus"
VERSION = 1  # bump when a change of the generator changes the output for a given seed
SPLITS = ("dev", "devtest")

DEFAULT_TRAIN = 10_000
DEFAULT_LOW_RESOURCE = 2_000
DEFAULT_DEV = 200
DEFAULT_DEVTEST = 200


class CorpusError(UserError):
    """Bad corpus settings or a corpus directory that does not match its corpus.json."""


@dataclass(frozen=True)
class Corpus:
    """Sentences of every language: ``train[lang]`` (a prefix of the common sentence list for a
    low-resource language), ``dev[lang]`` and ``devtest[lang]`` (all the same length)."""

    seed: int
    languages: tuple[LanguageSpec, ...]
    train: dict[str, list[str]]
    dev: dict[str, list[str]]
    devtest: dict[str, list[str]]

    @property
    def codes(self) -> list[str]:
        return [spec.code for spec in self.languages]

    def split(self, name: str) -> dict[str, list[str]]:
        return {"train": self.train, "dev": self.dev, "devtest": self.devtest}[name]


def generate(
    seed: int = 0,
    *,
    train_sentences: int = DEFAULT_TRAIN,
    low_resource_sentences: int = DEFAULT_LOW_RESOURCE,
    dev_sentences: int = DEFAULT_DEV,
    devtest_sentences: int = DEFAULT_DEVTEST,
) -> Corpus:
    """Generate the corpus. Sentences are drawn until each is new in every language; the first
    ``dev_sentences`` go to dev, the next ``devtest_sentences`` to devtest, the rest to train."""
    _check_sizes(train_sentences, low_resource_sentences, dev_sentences, devtest_sentences)
    realizers = build_languages(seed)
    rng = random.Random(f"{seed}:sentences")
    total = dev_sentences + devtest_sentences + train_sentences
    seen: dict[str, set[str]] = {code: set() for code in realizers}
    rows: list[dict[str, str]] = []
    attempts = 0
    while len(rows) < total:
        attempts += 1
        if attempts > 20 * total + 1000:
            raise CorpusError(f"could only make {len(rows)} distinct sentences of the {total} asked for")
        frame = sample_sentence_frame(rng)
        row = {code: realizer.sentence(frame) for code, realizer in realizers.items()}
        if any(row[code] in seen[code] for code in row):
            continue
        for code, sentence in row.items():
            seen[code].add(sentence)
        rows.append(row)
    dev_rows = rows[:dev_sentences]
    devtest_rows = rows[dev_sentences : dev_sentences + devtest_sentences]
    train_rows = rows[dev_sentences + devtest_sentences :]
    specs = tuple(SPEC[code] for code in realizers)

    def column(part: list[dict[str, str]], code: str) -> list[str]:
        return [row[code] for row in part]

    train = {spec.code: column(train_rows[: low_resource_sentences if spec.resource == "low" else None], spec.code) for spec in specs}
    dev = {code: column(dev_rows, code) for code in realizers}
    devtest = {code: column(devtest_rows, code) for code in realizers}
    return Corpus(seed, specs, train, dev, devtest)


def _check_sizes(train: int, low: int, dev: int, devtest: int) -> None:
    problems = []
    for flag, value in (("--train-sentences", train), ("--dev-sentences", dev), ("--devtest-sentences", devtest)):
        if value < 1:
            problems.append(f"{flag} must be at least 1, got {value}")
    if not 1 <= low <= train:
        problems.append(f"--low-resource-sentences must be between 1 and --train-sentences ({train}), got {low}")
    if problems:
        raise CorpusError("; ".join(problems))


# ---- files ----------------------------------------------------------------------------------------


def relative_paths(corpus: Corpus) -> dict[tuple[str, str], str]:
    """(split, lang) -> path relative to the corpus directory."""
    paths = {("train", code): f"train/{code}.train" for code in corpus.codes}
    for split in SPLITS:
        paths.update({(split, code): f"flores/{split}/{code}.{split}" for code in corpus.codes})
    return paths


def write(corpus: Corpus, out: str | os.PathLike[str]) -> Path:
    """Write the corpus under ``out`` (each file to a temporary name, then renamed); returns corpus.json.

    Files of other languages left in ``train/`` or ``flores/`` by an earlier run are removed, so that
    the directory holds exactly this corpus.
    """
    root = Path(out)
    hashes: dict[str, str] = {}
    for (split, code), relative in relative_paths(corpus).items():
        data = "".join(line + "\n" for line in corpus.split(split)[code]).encode("utf-8")
        _write_atomic(root / relative, data)
        hashes[relative] = hashlib.sha256(data).hexdigest()
    _remove_stale(root, set(hashes))
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "seed": corpus.seed,
        "source": SOURCE,
        "synthetic": "every language here is invented; codes are from the ISO 639-3 private-use range qaa-qtz",
        "train_alignment": "prefix: line i of every train file is sentence i; a file with n lines holds sentences 0..n-1",
        "languages": [
            {
                "code": spec.code,
                "name": spec.name,
                "family": spec.family,
                "order": spec.order,
                "script": spec.script,
                "resource": spec.resource,
                "train_lines": len(corpus.train[spec.code]),
                "summary": spec.summary,
            }
            for spec in corpus.languages
        ],
        "flores_lines": {split: len(next(iter(corpus.split(split).values()))) for split in SPLITS},
        "sha256": hashes,
    }
    path = root / "corpus.json"
    _write_atomic(path, (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    return path


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _remove_stale(root: Path, keep: set[str]) -> None:
    for pattern in ("train/*.train", "flores/dev/*.dev", "flores/devtest/*.devtest"):
        for path in root.glob(pattern):
            if path.relative_to(root).as_posix() not in keep:
                path.unlink()


def read_manifest(data_dir: str | os.PathLike[str]) -> dict:
    path = Path(data_dir) / "corpus.json"
    if not path.is_file():
        raise CorpusError(f"{path} not found: generate the corpus with `python -m experiments.testbed.corpus --out {data_dir}`")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise CorpusError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def read_train(data_dir: str | os.PathLike[str], lang: str) -> list[str]:
    """The training sentences of ``lang`` (checked against corpus.json's line count)."""
    manifest = read_manifest(data_dir)
    counts = {entry["code"]: entry["train_lines"] for entry in manifest["languages"]}
    if lang not in counts:
        raise CorpusError(f"language {lang!r} is not in the testbed corpus at {data_dir}; valid: {', '.join(counts)}")
    path = Path(data_dir) / "train" / f"{lang}.train"
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    if len(lines) != counts[lang]:
        raise CorpusError(f"{path} has {len(lines)} lines, but corpus.json says {counts[lang]}: regenerate the corpus")
    return lines


def read_train_pairs(data_dir: str | os.PathLike[str], *, src: str, tgt: str) -> list[tuple[str, str]]:
    """Training pairs of the direction ``src``-``tgt``: the first min(n_src, n_tgt) lines of both files."""
    source, target = read_train(data_dir, src), read_train(data_dir, tgt)
    n = min(len(source), len(target))
    return list(zip(source[:n], target[:n]))


# ---- statistics -----------------------------------------------------------------------------------


def _words(sentence: str) -> list[str]:
    return sentence.rstrip(".").lower().split()


def statistics(corpus: Corpus) -> list[dict[str, object]]:
    """Per language: lines per split, word types (train), mean words and characters per sentence."""
    rows = []
    for spec in corpus.languages:
        train = corpus.train[spec.code]
        words = [w for s in train for w in _words(s)]
        rows.append(
            {
                "code": spec.code,
                "train": len(train),
                "dev": len(corpus.dev[spec.code]),
                "devtest": len(corpus.devtest[spec.code]),
                "word_types": len(set(words)),
                "words_per_sentence": len(words) / len(train),
                "chars_per_sentence": sum(len(s) for s in train) / len(train),
                "scripts": sorted({_script_of(ch) for s in train for ch in s if ch.isalpha()}),
            }
        )
    return rows


def _script_of(ch: str) -> str:
    name = unicodedata.name(ch, "")
    for script in ("LATIN", "CYRILLIC", "GREEK"):
        if name.startswith(script):
            return script.title()
    return "other"


def report(corpus: Corpus, *, out: Path | None = None, samples: int = 3) -> str:
    """Statistics table and ``samples`` parallel devtest sentences in every language."""
    lines = [f"testbed corpus, seed {corpus.seed}: {len(corpus.languages)} synthetic languages, {len(concepts.content_concepts())} content concepts"]
    lines.append(f"{'code':<9} {'family':<20} {'order':<5} {'res':<4} {'train':>6} {'dev':>4} {'devtest':>7} "
                 f"{'types':>6} {'words/s':>7} {'chars/s':>7}")  # fmt: skip
    for spec, row in zip(corpus.languages, statistics(corpus)):
        lines.append(
            f"{spec.code:<9} {spec.family:<20} {spec.order:<5} {spec.resource:<4} {row['train']:>6} {row['dev']:>4} "
            f"{row['devtest']:>7} {row['word_types']:>6} {row['words_per_sentence']:>7.2f} {row['chars_per_sentence']:>7.1f}"
        )
    if out is not None:
        sizes = {part: sum(f.stat().st_size for f in (out / part).rglob("*") if f.is_file()) for part in ("train", "flores")}
        lines.append(f"bytes on disk: train {sizes['train']:,}, flores {sizes['flores']:,}")
    for i in range(min(samples, len(corpus.devtest[SOURCE]))):
        lines.append(f"devtest sentence {i}:")
        lines += [f"  {code:<9} {corpus.devtest[code][i]}" for code in corpus.codes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.testbed.corpus", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory to write (train/, flores/, corpus.json)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--train-sentences", type=int, default=DEFAULT_TRAIN, help=f"training sentences of a high-resource language (default {DEFAULT_TRAIN})")
    parser.add_argument(
        "--low-resource-sentences",
        type=int,
        default=DEFAULT_LOW_RESOURCE,
        help=f"training sentences of a low-resource language (default {DEFAULT_LOW_RESOURCE})",
    )
    parser.add_argument("--dev-sentences", type=int, default=DEFAULT_DEV, help=f"FLORES-style dev lines (default {DEFAULT_DEV})")
    parser.add_argument("--devtest-sentences", type=int, default=DEFAULT_DEVTEST, help=f"FLORES-style devtest lines (default {DEFAULT_DEVTEST})")
    args = parser.parse_args(argv)
    try:
        corpus = generate(
            args.seed,
            train_sentences=args.train_sentences,
            low_resource_sentences=args.low_resource_sentences,
            dev_sentences=args.dev_sentences,
            devtest_sentences=args.devtest_sentences,
        )
        manifest = write(corpus, args.out)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report(corpus, out=Path(args.out)))
    print(f"wrote {manifest.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
