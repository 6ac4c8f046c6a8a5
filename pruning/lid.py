"""Language identification for the off-target rate of ``nllb-prune evaluate --lid FILE``.

A :class:`LanguageIdentifier` maps sentences to FLORES-200 codes (``fra_Latn``). Two kinds, told
apart by the file's content (:func:`load_lid`):

* ``fasttext``: a fastText classifier (``.bin`` / ``.ftz``, e.g. NLLB's LID-218 model ``lid218e.bin``)
  whose labels are ``__label__{FLORES code}``. Reading it needs the optional package ``fasttext``
  (``pip install fasttext-wheel``, or the extra ``nllb-prune[langid]``); models with other labels
  (fastText's ``lid.176``: ``__label__fr``) are refused, since their labels are not FLORES codes.
* ``naive-bayes``: our own character n-gram multinomial naive Bayes, trained by
  ``nllb-prune train-lid`` from one text file per language and stored as JSON (never pickle).

Naive Bayes, per language c, over the character n-grams g (orders ``ngram_min`` .. ``ngram_max``)
of the casefolded sentence with single spaces and one space at each end (all-space n-grams left out),
counting only n-grams of the stored vocabulary::

    log P(g | c) = log((count[c, g] + alpha) / (sum_g' count[c, g'] + alpha * V))
    score(c, text) = sum over n-grams g of the text of n_g * log P(g | c)

The class prior is uniform (a language with less training text is not predicted less often), so
the prediction is the language with the highest score (ties: the first in sorted code order).
A text with no n-gram in the vocabulary (an empty hypothesis, another script) is
:data:`UNDETERMINED` (``und``), which is never a target language, so it counts as off-target;
both kinds answer ``und`` for an empty or blank text.

Vocabulary (``--max-features N``): the N n-grams with the highest sum over languages of their
relative frequency in that language (so a low-resource language's n-grams are not crowded out);
ties by the n-gram's text.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol, Sequence

import numpy as np

from pruning.atomic import write_text
from pruning.data.languages import is_code_form
from pruning.errors import UserError

UNDETERMINED = "und"
NB_FORMAT = "nllb-prune-lid-naive-bayes"
NB_VERSION = 1
FASTTEXT_MAGIC = (793712314).to_bytes(4, "little")
"""The first 4 bytes of every fastText model file (``.bin`` and quantized ``.ftz``)."""
FASTTEXT_LABEL = re.compile(r"__label__(?P<code>.+)")
INSTALL_HINT = "pip install fasttext-wheel (or the extra: pip install 'nllb-prune[langid]')"


class LidError(UserError):
    """A language-identification model file is missing, malformed or of an unknown kind."""


class LanguageIdentifier(Protocol):
    """Predicts a FLORES-200 code (or :data:`UNDETERMINED`) for each text."""

    kind: str

    def predict(self, texts: Sequence[str]) -> list[str]: ...

    def languages(self) -> list[str]: ...

    def identity(self) -> dict[str, Any]: ...


def off_target_rate(predictions: Sequence[str], target: str) -> float:
    """Share (in %) of ``predictions`` that are not ``target``; an empty list is an error."""
    if not predictions:
        raise LidError(f"no hypotheses to identify the language of (target {target})")
    return 100.0 * sum(p != target for p in predictions) / len(predictions)


def file_identity(path: Path, kind: str, languages: Sequence[str]) -> dict[str, Any]:
    """``{"path", "sha256", "kind", "languages"}`` of a model file, for signatures."""
    return {"path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "kind": kind, "languages": len(languages)}


# ---- character n-grams -----------------------------------------------------------------------------
def normalise(text: str) -> str:
    """NFC, casefolded, whitespace runs as one space, one space at each end ('' for a blank text)."""
    words = unicodedata.normalize("NFC", text).casefold().split()
    return f" {' '.join(words)} " if words else ""


def char_ngrams(text: str, *, lo: int, hi: int) -> collections.Counter[str]:
    """Counts of the character n-grams of orders ``lo`` .. ``hi`` of :func:`normalise` (``text``), except all-space ones.

    A lone space says nothing about the language; counting it would let a text in an unknown script
    (only its spaces known) get a language instead of ``und``.
    """
    norm = normalise(text)
    counts: collections.Counter[str] = collections.Counter()
    for n in range(lo, hi + 1):
        counts.update(gram for gram in (norm[i : i + n] for i in range(len(norm) - n + 1)) if not gram.isspace())
    return counts


# ---- naive Bayes -------------------------------------------------------------------------------------
@dataclass
class NaiveBayesLid:
    """Character n-gram multinomial naive Bayes (see the module docstring)."""

    codes: tuple[str, ...]
    """Languages, sorted (C)."""
    vocab: tuple[str, ...]
    """n-grams (V)."""
    counts: np.ndarray
    """int64 [C, V]: training count of each n-gram in each language."""
    ngram_range: tuple[int, int] = (1, 3)
    alpha: float = 1.0
    sentences: dict[str, int] = field(default_factory=dict)
    """Training sentences per language (recorded; the prior is uniform)."""
    source: dict[str, Any] = field(default_factory=dict)
    """Where the training text came from (recorded in the file)."""
    path: Optional[Path] = None
    kind: str = "naive-bayes"
    _log_prob: np.ndarray = field(init=False, repr=False)
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        counts = self.counts.astype(np.float64)  # [C, V]
        totals = counts.sum(1, keepdims=True)  # [C, 1]
        self._log_prob = np.log(counts + self.alpha) - np.log(totals + self.alpha * len(self.vocab))  # [C, V]
        self._index = {gram: i for i, gram in enumerate(self.vocab)}

    def languages(self) -> list[str]:
        return list(self.codes)

    def log_scores(self, texts: Sequence[str]) -> np.ndarray:
        """float64 [N, C]: sum of n-gram log-probabilities per language (NaN row: no known n-gram)."""
        lo, hi = self.ngram_range
        out = np.full((len(texts), len(self.codes)), np.nan)
        for row, text in enumerate(texts):
            grams = [(self._index[g], n) for g, n in char_ngrams(text, lo=lo, hi=hi).items() if g in self._index]
            if grams:
                idx = np.array([i for i, _ in grams])
                n = np.array([c for _, c in grams], dtype=np.float64)  # [G]
                out[row] = self._log_prob[:, idx] @ n  # [C, G] @ [G]
        return out

    def predict(self, texts: Sequence[str]) -> list[str]:
        scores = self.log_scores(texts)  # [N, C]
        return [UNDETERMINED if np.isnan(row).any() else self.codes[int(np.argmax(row))] for row in scores]

    def identity(self) -> dict[str, Any]:
        if self.path is None:
            return {"path": None, "sha256": None, "kind": self.kind, "languages": len(self.codes)}
        return file_identity(self.path, self.kind, self.codes)

    # ---- file ----------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        sparse = {}
        for c, code in enumerate(self.codes):
            nonzero = np.nonzero(self.counts[c])[0]
            sparse[code] = [nonzero.tolist(), self.counts[c, nonzero].tolist()]
        return {
            "format": NB_FORMAT,
            "version": NB_VERSION,
            "ngram_range": list(self.ngram_range),
            "alpha": self.alpha,
            "prior": "uniform",
            "normalisation": "NFC, casefold, single spaces, a space at each end",
            "languages": list(self.codes),
            "sentences": self.sentences,
            "source": self.source,
            "vocab": list(self.vocab),
            "counts": sparse,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        write_text(path, json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":")) + "\n")
        self.path = path
        return path


def train_naive_bayes(
    texts: Mapping[str, Sequence[str]],
    *,
    ngram_range: tuple[int, int] = (1, 3),
    alpha: float = 1.0,
    max_features: Optional[int] = None,
    source: Optional[dict[str, Any]] = None,
) -> NaiveBayesLid:
    """Train on ``{code: sentences}``; keep the ``max_features`` n-grams of highest summed relative frequency."""
    lo, hi = ngram_range
    if not 1 <= lo <= hi:
        raise LidError(f"n-gram orders must satisfy 1 <= min <= max, got {lo}..{hi}")
    if not alpha > 0:
        raise LidError(f"the smoothing alpha must be positive, got {alpha}")
    if max_features is not None and max_features < 1:
        raise LidError(f"--max-features must be positive, got {max_features}")
    bad = [code for code in texts if not is_code_form(code)]
    if bad:
        raise LidError(f"language codes must look like FLORES-200 codes 'xxx_Xxxx', got {bad}")
    if len(texts) < 2:
        raise LidError(f"a language identifier needs at least 2 languages, got {sorted(texts)}")
    codes = tuple(sorted(texts))
    per_lang: dict[str, collections.Counter[str]] = {}
    for code in codes:
        counts: collections.Counter[str] = collections.Counter()
        for sentence in texts[code]:
            counts.update(char_ngrams(sentence, lo=lo, hi=hi))
        if not counts:
            raise LidError(f"language {code} has no training text (no non-blank sentence)")
        per_lang[code] = counts
    weight: collections.Counter[str] = collections.Counter()
    for counts in per_lang.values():
        total = sum(counts.values())
        for gram, n in counts.items():
            weight[gram] += n / total
    ranked = sorted(weight, key=lambda g: (-weight[g], g))
    vocab = tuple(ranked[:max_features] if max_features else sorted(ranked))
    matrix = np.array([[per_lang[code].get(g, 0) for g in vocab] for code in codes], dtype=np.int64)  # [C, V]
    sentences = {code: sum(1 for s in texts[code] if normalise(s)) for code in codes}
    return NaiveBayesLid(codes, vocab, matrix, (lo, hi), float(alpha), sentences, dict(source or {}))


def _read_naive_bayes(path: Path, text: str) -> NaiveBayesLid:
    def bad(what: str) -> LidError:
        return LidError(f"{path}: not a valid naive-Bayes language identifier ({what}); rebuild it with `nllb-prune train-lid`")

    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad(f"JSON error at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict) or data.get("format") != NB_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise bad(f"'format' must be {NB_FORMAT!r}, found {found!r}")
    if data.get("version") != NB_VERSION:
        raise bad(f"'version' must be {NB_VERSION}, found {data.get('version')!r}")
    missing = [k for k in ("ngram_range", "alpha", "languages", "vocab", "counts") if k not in data]
    if missing:
        raise bad(f"missing key(s) {missing}")
    codes, vocab, counts = data["languages"], data["vocab"], data["counts"]
    rng = data["ngram_range"]
    if not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(n, int) for n in rng) and 1 <= rng[0] <= rng[1]):
        raise bad(f"'ngram_range' must be [min, max] with 1 <= min <= max, found {rng!r}")
    if not (isinstance(data["alpha"], (int, float)) and data["alpha"] > 0):
        raise bad(f"'alpha' must be a positive number, found {data['alpha']!r}")
    if not (isinstance(codes, list) and len(codes) >= 2 and all(is_code_form(c) for c in codes) and codes == sorted(set(codes))):
        raise bad(f"'languages' must be a sorted list of at least 2 distinct codes 'xxx_Xxxx', found {str(codes)[:80]}")
    if not (isinstance(vocab, list) and all(isinstance(g, str) and g for g in vocab) and len(set(vocab)) == len(vocab)):
        raise bad("'vocab' must be a list of distinct non-empty strings")
    if not isinstance(counts, dict) or sorted(counts) != codes:
        raise bad(f"'counts' must have one entry per language {codes}, found {sorted(counts) if isinstance(counts, dict) else type(counts).__name__}")
    matrix = np.zeros((len(codes), len(vocab)), dtype=np.int64)  # [C, V]
    for c, code in enumerate(codes):
        entry = counts[code]
        try:
            idx, values = (np.asarray(part, dtype=np.int64) for part in entry)
        except (TypeError, ValueError):
            raise bad(f"counts of {code} must be [[indices], [counts]] of integers") from None
        if idx.shape != values.shape or idx.ndim != 1:
            raise bad(f"counts of {code}: {idx.size} indices for {values.size} counts")
        if idx.size and (idx.min() < 0 or idx.max() >= len(vocab)):
            raise bad(f"counts of {code}: index {int(idx.max() if idx.max() >= len(vocab) else idx.min())} outside the vocabulary of {len(vocab)}")
        if (values < 0).any():
            raise bad(f"counts of {code}: negative count")
        matrix[c, idx] = values
    return NaiveBayesLid(
        tuple(codes),
        tuple(vocab),
        matrix,
        (rng[0], rng[1]),
        float(data["alpha"]),
        dict(data.get("sentences") or {}),
        dict(data.get("source") or {}),
        path=path,
    )


# ---- fastText ----------------------------------------------------------------------------------------
class FastTextLid:
    """A fastText classifier whose labels are ``__label__{FLORES code}`` (NLLB's LID-218)."""

    kind = "fasttext"

    def __init__(self, path: Path) -> None:
        try:
            import fasttext  # optional dependency
        except ImportError:
            raise LidError(f"{path} is a fastText model; reading it needs the optional package fasttext, which is not installed: {INSTALL_HINT}") from None
        self.path = path
        try:
            self.model = fasttext.load_model(str(path))
        except (ValueError, RuntimeError, OSError) as exc:
            raise LidError(f"{path}: fastText could not load it ({exc})") from exc
        labels = list(self.model.get_labels())
        self._codes = {label: label_to_code(label, path=path) for label in labels}

    def languages(self) -> list[str]:
        return sorted(self._codes.values())

    def predict(self, texts: Sequence[str]) -> list[str]:
        out = [UNDETERMINED] * len(texts)
        rows = [i for i, text in enumerate(texts) if text.strip()]
        if rows:
            # fastText reads one line per text: newlines inside a text would split it. The list form of predict
            # (not the single-string one) also works with numpy 2 in fasttext-wheel 0.9.2.
            labels, _ = self.model.predict([" ".join(texts[i].split()) for i in rows], k=1)
            for i, label in zip(rows, labels):
                out[i] = self._codes.get(label[0]) or label_to_code(label[0], path=self.path)
        return out

    def identity(self) -> dict[str, Any]:
        return file_identity(self.path, self.kind, self.languages())


def label_to_code(label: str, *, path: Path) -> str:
    """``__label__fra_Latn`` -> ``fra_Latn``; any other form is a :class:`LidError` naming the file."""
    match = FASTTEXT_LABEL.fullmatch(label)
    if match is None or not is_code_form(match.group("code")):
        raise LidError(
            f"{path}: fastText label {label!r} is not of the form __label__xxx_Xxxx (a FLORES-200 code, as NLLB's "
            f"LID-218 model uses); models with other labels (e.g. lid.176's __label__fr) cannot be used"
        )
    return match.group("code")


# ---- loading by content ------------------------------------------------------------------------------
def load_lid(path: str | os.PathLike[str]) -> LanguageIdentifier:
    """The identifier stored in ``path``: a fastText model (by its magic number) or our naive-Bayes JSON."""
    path = Path(path)
    if not path.is_file():
        raise LidError(f"language-identification model {path} {'is a directory' if path.is_dir() else 'does not exist'}")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head == FASTTEXT_MAGIC:
        return FastTextLid(path)
    if path.suffix in (".bin", ".ftz"):
        raise LidError(f"{path} has a fastText extension but is not a fastText model: its first bytes are {head!r}, expected {FASTTEXT_MAGIC!r}")
    raw = path.read_bytes()
    if raw.lstrip()[:1] == b"{":
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise LidError(f"{path}: not UTF-8 text ({exc})") from None
        return _read_naive_bayes(path, text)
    raise LidError(
        f"{path} is not a language-identification model: expected a fastText model (.bin/.ftz, first bytes "
        f"{FASTTEXT_MAGIC!r}) or the JSON of `nllb-prune train-lid` (starting with '{{'), found first bytes {raw[:8]!r}"
    )


# ---- training data and accuracy ------------------------------------------------------------------------
def read_language_texts(data: str | os.PathLike[str], *, split: str, langs: Sequence[str] = (), max_sentences: Optional[int] = None) -> dict[str, list[str]]:
    """``{code: sentences}`` from a FLORES-layout directory (``{split}/{code}.{split}``; all languages by default).

    The files of a split need not be line-aligned here (the testbed's ``train/`` holds fewer lines for a
    low-resource language), so they are read one by one without FLORES's alignment check.
    """
    from pruning.data.flores import FloresDir

    if max_sentences is not None and max_sentences < 1:
        raise LidError(f"--max-sentences must be positive, got {max_sentences}")
    flores = FloresDir(data)
    codes = list(langs) or flores.languages(split)
    out = {}
    for code in codes:
        lines = flores.path(code, split).read_text(encoding="utf-8").splitlines()
        out[code] = lines[:max_sentences]
    return out


def accuracy(lid: LanguageIdentifier, texts: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Per language, the share (in %) of its sentences that ``lid`` identifies as that language."""
    return {code: 100.0 - off_target_rate(lid.predict(list(sentences)), code) for code, sentences in texts.items()}
