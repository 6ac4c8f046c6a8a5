"""Evaluate on FLORES-200: translate each direction, score chrF++ and spBLEU, write the paper's TSV.

Scores (sacrebleu, with its signatures):

* chrF++ = ``sacrebleu.metrics.CHRF(word_order=2)``;
* spBLEU = ``sacrebleu.metrics.BLEU(tokenize="flores200")``: the SPM-200 SentencePiece model of
  FLORES-200 (the NLLB and pruning papers' spBLEU); ``--spm flores101`` gives SPM-100, ``none`` skips it.

sacrebleu keeps the SentencePiece model at ``$SACREBLEU/models/<name>`` (``SACREBLEU`` defaults to
``~/.sacrebleu`` and is read when sacrebleu is imported) and downloads it when missing, which hangs
or fails without network. We look for the file first and never let sacrebleu download: when it is
missing, spBLEU is ``NA`` with a warning that says where to put it, and chrF++ is still computed.

Outputs beside ``--out scores.tsv``: ``scores.hyp/{src}-{tgt}.txt`` (one hypothesis per line),
``scores.tsv`` (``direction, spBLEU, chrF++, len_ratio``: the shape of the paper's per-direction files)
and ``scores.summary.json`` (means over directions, sacrebleu's signatures and ours: model and
manifest hash, expert index hash, decoding settings, versions, device).

Off-target rate (``--lid FILE``, :mod:`pruning.lid`): per direction, the share (in %) of hypotheses whose
identified language is not the target language (an empty hypothesis is ``und``, so off-target). It adds
the column ``off_target`` to the TSV, ``off_target`` per direction and in the mean of the summary, and
the model's identity (path, sha256, kind) as ``lid`` in the summary and ``lid:KIND:SHA12`` in our
signature. Without ``--lid`` the outputs are exactly as before; :func:`read_scores` reads both.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from pruning.data.directions import split_direction
from pruning.errors import UserError
from pruning.model.identity import model_identity
from pruning.versions import versions as package_versions

SPM_CHOICES = ("flores200", "flores101", "none")
SPM_LABEL = {"flores200": "SPM-200", "flores101": "SPM-100"}
TSV_COLUMNS = ("direction", "spBLEU", "chrF++", "len_ratio")
OFF_TARGET = "off_target"
"""Extra TSV column (and summary key) written with ``--lid``: % of hypotheses not in the target language."""
METRICS = ("spBLEU", "chrF++")
NA = "NA"


class EvaluateError(UserError):
    """Bad evaluation input: directions, data, score files."""


class SpmModelMissing(EvaluateError):
    """sacrebleu's SentencePiece model for spBLEU is not on disk (we never download it)."""


# ---- sacrebleu's SentencePiece model -------------------------------------------------------------
def spm_model_path(spm: str) -> Path:
    """Where sacrebleu (2.x) looks for the SentencePiece model of ``tokenize=spm``."""
    from sacrebleu.tokenizers import tokenizer_spm

    try:
        url = tokenizer_spm.SPM_MODELS[spm]["url"]
    except KeyError:
        raise EvaluateError(f"--spm must be one of {', '.join(SPM_CHOICES)}, got {spm!r}") from None
    return Path(tokenizer_spm.SACREBLEU_DIR) / "models" / os.path.basename(url)


def check_spm_model(spm: str) -> Path:
    """The model file's path, or :class:`SpmModelMissing` saying where to put it (no download is tried)."""
    from sacrebleu.tokenizers import tokenizer_spm

    path = spm_model_path(spm)
    if path.is_file() and path.stat().st_size > 0:
        return path
    url = tokenizer_spm.SPM_MODELS[spm]["url"]
    raise SpmModelMissing(
        f"spBLEU (tokenize={spm!r}, {SPM_LABEL.get(spm, spm)}) needs sacrebleu's SentencePiece model at {path}, "
        f"which is {'empty' if path.is_file() else 'missing'}; we do not download it. On a machine with network, "
        f"fetch {url} and put it at {path} (sacrebleu's directory is $SACREBLEU, default ~/.sacrebleu, "
        f"read when sacrebleu is imported); or pass --spm none"
    )


def make_bleu(spm: str):  # noqa: ANN201 - sacrebleu BLEU
    """A ``BLEU(tokenize=spm)`` built only after the model file was found (no download attempt)."""
    from sacrebleu.metrics import BLEU

    path = check_spm_model(spm)
    try:
        return BLEU(tokenize=spm)
    except Exception as exc:  # sentencepiece raises OSError/RuntimeError on a corrupt model
        raise SpmModelMissing(f"{path} is not a readable SentencePiece model ({exc}); replace it (see sacrebleu's {spm} tokenizer)") from exc


# ---- per-direction scores ------------------------------------------------------------------------
@dataclass
class DirectionScore:
    direction: str
    chrf: float
    spbleu: Optional[float]
    len_ratio: Optional[float]
    sentences: int
    off_target: Optional[float] = None
    """% of hypotheses not identified as the target language (``--lid``), else None."""

    def row(self, *, off_target: bool = False) -> list[str]:
        cells = [self.direction, _fmt(self.spbleu), _fmt(self.chrf), _fmt(self.len_ratio, digits=3)]
        return cells + [_fmt(self.off_target)] if off_target else cells


def _fmt(value: Optional[float], *, digits: int = 2) -> str:
    return NA if value is None else f"{value:.{digits}f}"


@dataclass
class Scorer:
    """chrF++ always; spBLEU when the SentencePiece model is there (else NA and one warning)."""

    spm: str = "flores200"
    chrf: Any = field(init=False)
    bleu: Any = field(init=False, default=None)
    spbleu_problem: Optional[str] = field(init=False, default=None)

    def __post_init__(self) -> None:
        from sacrebleu.metrics import CHRF

        self.chrf = CHRF(word_order=2)
        if self.spm == "none":
            self.spbleu_problem = "spBLEU not computed (--spm none)"
            return
        try:
            self.bleu = make_bleu(self.spm)
        except SpmModelMissing as exc:
            self.spbleu_problem = str(exc)

    def score(self, direction: str, hypotheses: Sequence[str], references: Sequence[str]) -> DirectionScore:
        if len(hypotheses) != len(references):
            raise EvaluateError(f"{direction}: {len(hypotheses)} hypotheses for {len(references)} references")
        chrf = self.chrf.corpus_score(list(hypotheses), [list(references)]).score
        spbleu = len_ratio = None
        if self.bleu is not None:
            bleu = self.bleu.corpus_score(list(hypotheses), [list(references)])
            spbleu = bleu.score
            len_ratio = bleu.sys_len / bleu.ref_len if bleu.ref_len else None
        return DirectionScore(direction, chrf, spbleu, len_ratio, len(hypotheses))

    def signatures(self) -> dict[str, str]:
        out = {"chrF++": self.chrf.get_signature().format()}
        out["spBLEU"] = self.bleu.get_signature().format() if self.bleu is not None else f"{NA}: {self.spbleu_problem}"
        return out


# ---- directions ----------------------------------------------------------------------------------
def eval_directions(*, pairs: Sequence[str] = (), langs: Sequence[str] = ()) -> list[tuple[str, str]]:
    """``--pairs a-b,c-d`` or ``--langs a,b,c`` (every ordered pair of distinct languages)."""
    from pruning.export import ExportError, parse_directions

    if not pairs and not langs:
        raise EvaluateError("say which directions to evaluate: --pairs src-tgt,... or --langs L1,L2,...")
    try:
        return parse_directions(langs=langs, pairs=pairs)
    except ExportError as exc:
        raise EvaluateError(str(exc)) from exc


# ---- score files ---------------------------------------------------------------------------------
def scores_tsv(scores: Iterable[DirectionScore]) -> str:
    """The TSV's text: the paper's columns, plus ``off_target`` when any direction has it (``--lid``)."""
    scores = list(scores)
    extra = any(s.off_target is not None for s in scores)
    lines = ["\t".join(TSV_COLUMNS + ((OFF_TARGET,) if extra else ()))] + ["\t".join(s.row(off_target=extra)) for s in scores]
    return "\n".join(lines) + "\n"


def read_scores(path: str | os.PathLike[str]) -> dict[str, dict[str, Optional[float]]]:
    """``{direction: {"spBLEU": x, "chrF++": y}}`` from our TSV or the paper's (columns found by header name).

    Values ``NA``/``nan``/missing trailing fields are None (the paper's 54B file declares ``len_ratio``
    but its rows stop after chrF++). A file with the ``off_target`` column (``evaluate --lid``) also gives
    ``"off_target"`` per direction.
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluateError(f"score file {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise EvaluateError(f"score file {path} is empty")
    header = lines[0].split("\t")
    missing = [c for c in ("direction", *METRICS) if c not in header]
    if missing:
        raise EvaluateError(f"{path}:1: header {header} lacks column(s) {missing}; expected {list(TSV_COLUMNS[:3])}")
    col = {name: header.index(name) for name in ("direction", *METRICS)}
    out: dict[str, dict[str, Optional[float]]] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        direction = fields[col["direction"]] if len(fields) > col["direction"] else ""
        split_direction(direction, what=f"{path}:{number}")
        if direction in out:
            raise EvaluateError(f"{path}:{number}: direction {direction} appears twice")
        out[direction] = {m: _parse_value(fields, col[m], path, number) for m in METRICS}
        if OFF_TARGET in header:
            out[direction][OFF_TARGET] = _parse_value(fields, header.index(OFF_TARGET), path, number)
    return out


def _parse_value(fields: list[str], position: int, path: Path, number: int) -> Optional[float]:
    if position >= len(fields):
        return None
    text = fields[position].strip()
    if text in ("", NA, "nan", "NaN", "-"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise EvaluateError(f"{path}:{number}: {text!r} is not a number") from None
    return None if math.isnan(value) else value


@dataclass
class Comparison:
    """Per-direction deltas (ours - other) over the directions both files score."""

    rows: list[tuple[str, dict[str, tuple[Optional[float], Optional[float], Optional[float]]]]]
    mean_delta: dict[str, Optional[float]]
    counted: dict[str, int]
    only_ours: list[str]
    only_other: int

    def lines(self, *, limit: int = 60) -> list[str]:
        out = [f"{'direction':<20} {'chrF++':>8} {'other':>8} {'delta':>7}   {'spBLEU':>8} {'other':>8} {'delta':>7}"]
        for direction, values in self.rows[:limit]:
            cells = []
            for metric in ("chrF++", "spBLEU"):
                ours, other, delta = values[metric]
                cells.append(f"{_fmt(ours):>8} {_fmt(other):>8} {(_fmt(delta) if delta is None else f'{delta:+.2f}'):>7}")
            out.append(f"{direction:<20} " + "   ".join(cells))
        if len(self.rows) > limit:
            out.append(f"... {len(self.rows) - limit} more direction(s)")
        for metric in ("chrF++", "spBLEU"):
            mean = self.mean_delta[metric]
            shown = "NA" if mean is None else f"{mean:+.2f}"
            out.append(f"mean {metric} delta over {self.counted[metric]} common direction(s): {shown}")
        if self.only_ours:
            out.append(f"not in the other file: {', '.join(self.only_ours[:10])}{' ...' if len(self.only_ours) > 10 else ''}")
        return out


def compare_scores(ours: dict[str, dict[str, Optional[float]]], other: dict[str, dict[str, Optional[float]]], *, what: str = "the other file") -> Comparison:
    common = [d for d in ours if d in other]
    if not common:
        raise EvaluateError(f"no direction in common with {what} (ours: {', '.join(list(ours)[:5])} ...)")
    rows = []
    sums = {m: 0.0 for m in METRICS}
    counts = {m: 0 for m in METRICS}
    for direction in common:
        values = {}
        for metric in METRICS:
            a, b = ours[direction][metric], other[direction][metric]
            delta = None if a is None or b is None else a - b
            if delta is not None:
                sums[metric] += delta
                counts[metric] += 1
            values[metric] = (a, b, delta)
        rows.append((direction, values))
    mean = {m: (sums[m] / counts[m] if counts[m] else None) for m in METRICS}
    return Comparison(rows, mean, counts, [d for d in ours if d not in other], len([d for d in other if d not in ours]))


def mean_scores(scores: Sequence[DirectionScore]) -> dict[str, Optional[float]]:
    """Means over directions of chrF++, spBLEU (None unless every direction has it) and, with ``--lid``, off_target."""
    chrf = [s.chrf for s in scores]
    bleu = [s.spbleu for s in scores if s.spbleu is not None]
    out = {
        "chrF++": sum(chrf) / len(chrf) if chrf else None,
        "spBLEU": sum(bleu) / len(bleu) if bleu and len(bleu) == len(scores) else None,
    }
    off = [s.off_target for s in scores if s.off_target is not None]
    if off:
        out[OFF_TARGET] = sum(off) / len(off) if len(off) == len(scores) else None
    return out


# ---- the run -------------------------------------------------------------------------------------
@dataclass
class EvaluationResult:
    scores: list[DirectionScore]
    summary: dict[str, Any]
    tsv: Path
    hypotheses: Path
    summary_path: Path
    comparison: Optional[Comparison] = None


def output_paths(out: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """``scores.tsv`` -> (``scores.tsv``, ``scores.hyp/``, ``scores.summary.json``)."""
    tsv = Path(out)
    stem = tsv.with_suffix("") if tsv.suffix else tsv
    return tsv, stem.with_name(stem.name + ".hyp"), stem.with_name(stem.name + ".summary.json")


def evaluate_model(
    model: Any,
    *,
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    directions: Sequence[tuple[str, str]],
    split: str = "devtest",
    max_sentences: Optional[int] = None,
    options: Any = None,
    spm: str = "flores200",
    model_path: Optional[str] = None,
    lid: Any = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    long_input: str = "error",
) -> EvaluationResult:
    """Translate and score every direction; write hypotheses, the TSV and the summary (see module doc).

    Everything is checked before the first translation: the FLORES files, the export's directions, the
    tokenizer's language codes, the sources' lengths (``long_input``, as ``translate``), the identifier's
    languages. The three outputs are then written as one set: the hypotheses go to a temporary directory,
    and the TSV, the summary and the hypotheses replace the previous ones together once every direction is
    scored; a failure leaves the previous set untouched. ``lid``: a
    :class:`pruning.lid.LanguageIdentifier` for the off-target rate, or None.
    """
    from pruning.translate import DecodingOptions, translate_sentences

    options = options or DecodingOptions()
    options.validate()
    if spm not in SPM_CHOICES:
        raise EvaluateError(f"--spm must be one of {', '.join(SPM_CHOICES)}, got {spm!r}")
    flores = check_data(data, split=split, directions=directions, max_sentences=max_sentences)
    check_model_serves(model, directions, flores=flores, split=split, max_sentences=max_sentences, long_input=long_input)
    if lid is not None:
        check_lid_targets(lid, [tgt for _, tgt in directions])
    scorer = Scorer(spm)
    if scorer.spbleu_problem and spm != "none":
        warnings.warn(f"{scorer.spbleu_problem}. spBLEU is reported as {NA}; chrF++ is computed.", stacklevel=2)
    tsv, hyp_dir, summary_path = output_paths(out)
    staged = hyp_dir.with_name(f".{hyp_dir.name}.partial-{os.getpid()}")
    try:
        _fresh_directory(staged)
        scores: list[DirectionScore] = []
        for src, tgt in directions:
            sources = flores.read(src, split)[:max_sentences]
            references = flores.read(tgt, split)[:max_sentences]
            name = flores.path(src, split)
            hypotheses = translate_sentences(
                model,
                sources,
                src=src,
                tgt=tgt,
                options=options,
                progress=progress,
                long_input=long_input,
                line_name=lambda i, name=name: f"{name}:{i + 1}",  # type: ignore[misc]
            )
            (staged / f"{src}-{tgt}.txt").write_text("".join(f"{h}\n" for h in hypotheses), encoding="utf-8")
            score = scorer.score(f"{src}-{tgt}", hypotheses, references)
            if lid is not None:
                from pruning.lid import off_target_rate

                score.off_target = off_target_rate(lid.predict(hypotheses), tgt)
            scores.append(score)
            shown = "" if lid is None else f"\toff-target {_fmt(score.off_target)}%"
            log(f"{score.direction}\tspBLEU {_fmt(score.spbleu)}\tchrF++ {_fmt(score.chrf)}{shown}")
        summary = build_summary(
            model,
            scores,
            scorer=scorer,
            options=options,
            split=split,
            data=flores.root,
            max_sentences=max_sentences,
            model_path=model_path,
            hypotheses=hyp_dir,
            lid=lid,
        )
        if long_input != "error":
            summary["settings"]["long_input"] = long_input
        publish_together(staged, hyp_dir, {tsv: scores_tsv(scores), summary_path: json.dumps(summary, indent=2, sort_keys=True) + "\n"})
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return EvaluationResult(scores, summary, tsv, hyp_dir, summary_path)


def check_data(data: str | os.PathLike[str], *, split: str, directions: Sequence[tuple[str, str]], max_sentences: Optional[int] = None) -> Any:
    """The FLORES directory (a :class:`~pruning.data.flores.FloresDir`) after checking that it holds every direction's files."""
    from pruning.data.flores import FloresDir

    if max_sentences is not None and max_sentences < 1:
        raise EvaluateError(f"--max-sentences must be positive, got {max_sentences}")
    flores = FloresDir(data)
    available = flores.languages(split)
    absent = sorted({lang for pair in directions for lang in pair} - set(available))
    if absent:
        raise EvaluateError(f"language(s) {absent} have no {split} file in {flores.root}; it has {len(available)}: {', '.join(available[:20])}")
    flores.num_lines(split)  # the files are line-aligned
    return flores


def check_model_serves(
    model: Any,
    directions: Sequence[tuple[str, str]],
    *,
    flores: Any,
    split: str,
    max_sentences: Optional[int],
    long_input: str,
) -> None:
    """Every direction is one the model serves (an export's manifest), with codes its tokenizer knows and
    sources that fit its positions (with ``long_input`` error): checked before anything is translated."""
    from pruning.translate import TranslateError, check_direction_codes, fit_sources, source_limit

    manifest = getattr(model, "manifest", None)
    if manifest:
        from pruning.manifest import direction_experts

        for src, tgt in directions:
            direction_experts(manifest, src, tgt)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise TranslateError("the model has no tokenizer: put sentencepiece.bpe.model or tokenizer_config.json beside its weights")
    check_direction_codes(tokenizer, directions)
    limit = source_limit(model)
    if limit is None or long_input != "error":
        return
    for src in dict.fromkeys(src for src, _ in directions):
        tokenizer.src_lang = src
        sources = flores.read(src, split)[:max_sentences]
        encoded = tokenizer(sources, add_special_tokens=True, verbose=False)["input_ids"] if sources else []
        name = flores.path(src, split)
        fit_sources(encoded, limit=limit, long_input="error", tokenizer=tokenizer, where=lambda i, name=name: f"{name}:{i + 1}", warn=lambda _: None)


def _fresh_directory(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir()


def publish_together(staged: Path, directory: Path, files: dict[Path, str]) -> None:
    """Replace ``directory`` by ``staged`` and write ``files``, as one set: every file is written to a
    temporary name first, then the renames follow one another (no work left between them)."""
    temporary = {path: path.with_name(f".{path.name}.tmp-{os.getpid()}") for path in files}
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    try:
        for path, text in files.items():
            temporary[path].write_text(text, encoding="utf-8")
        if directory.exists():
            os.replace(directory, old)
        os.replace(staged, directory)
        for path, tmp in temporary.items():
            os.replace(tmp, path)
    finally:
        for tmp in temporary.values():
            tmp.unlink(missing_ok=True)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        elif old.exists():
            old.unlink()


def build_summary(
    model: Any,
    scores: Sequence[DirectionScore],
    *,
    scorer: Scorer,
    options: Any,
    split: str,
    data: Path,
    max_sentences: Optional[int],
    model_path: Optional[str],
    hypotheses: Path,
    lid: Any = None,
) -> dict[str, Any]:
    from pruning.translate import device_name, dtype_name

    identity = model_identity(model, model_path)
    settings = {
        "split": split,
        "data": str(data),
        "sentences_per_direction": max(s.sentences for s in scores) if scores else 0,
        "max_sentences": max_sentences,
        "decoding": options.signature(),
        "dtype": dtype_name(model),
        "device": device_name(model),
        "no_experts": bool(getattr(model, "no_experts", False)),
    }
    versions = package_versions("sacrebleu")
    ours = "|".join(
        [
            f"nllb-prune:{versions['nllb-prune']}",
            f"model:{identity['path']}",
            f"manifest:{identity['manifest_sha256'][:12] if identity['manifest_sha256'] else 'none'}",
            f"index:{identity['index_sha256'][:12] if identity['index_sha256'] else 'none'}",
            *(["experts:none"] if settings["no_experts"] else []),
            f"split:{split}",
            f"n:{settings['sentences_per_direction']}",
            options.signature(),
            f"dtype:{settings['dtype']}",
            f"device:{settings['device']}",
            f"torch:{versions['torch']}",
            f"transformers:{versions['transformers']}",
            f"sacrebleu:{versions['sacrebleu']}",
        ]
    )
    lid_identity = lid.identity() if lid is not None else None
    if lid_identity is not None:
        ours += f"|lid:{lid_identity['kind']}:{(lid_identity['sha256'] or 'in-memory')[:12]}"
    summary = {
        "directions": len(scores),
        "mean": mean_scores(scores),
        "spBLEU_tokenizer": SPM_LABEL.get(scorer.spm, "none") if scorer.bleu is not None else None,
        "sacrebleu_signatures": scorer.signatures(),
        "signature": ours,
        "model": identity,
        "settings": settings,
        "versions": versions,
        "hypotheses": str(hypotheses),
        "scores": {s.direction: {"spBLEU": s.spbleu, "chrF++": s.chrf, "len_ratio": s.len_ratio} for s in scores},
    }
    if lid_identity is not None:
        summary["lid"] = lid_identity
        for s in scores:
            summary["scores"][s.direction][OFF_TARGET] = s.off_target
    return summary


def check_lid_targets(lid: Any, targets: Sequence[str]) -> None:
    """Every target language must be one the identifier can predict (else its off-target rate is 100% by construction)."""
    known = set(lid.languages())
    unknown = sorted(set(targets) - known)
    if unknown:
        identity = lid.identity()
        raise EvaluateError(
            f"--lid {identity['path']}: target language(s) {unknown} are not among the {len(known)} languages it "
            f"identifies ({', '.join(sorted(known)[:20])}{' ...' if len(known) > 20 else ''})"
        )
