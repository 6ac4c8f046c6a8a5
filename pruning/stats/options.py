"""What ``nllb-prune stats`` collects (:class:`StatsOptions`, the flags and keys of ``conf/collect_stats.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from pruning.config import ConfigError, check_required, required
from pruning.data.directions import direction_key, split_direction
from pruning.stats.counters import StatsError

MODES = ("teacher", "beam")


# ---- options -----------------------------------------------------------------------------------
@dataclass
class StatsOptions:
    """What ``nllb-prune stats`` collects; each field is a flag and a key of ``conf/collect_stats.yaml``."""

    model: str = required(help="checkpoint: HF-layout directory, fairseq checkpoint, or a pruned export")
    data: str = required(help="FLORES-200 directory (holding dev/ and devtest/, or flores200_dataset/)")
    split: str = field(default="dev", metadata={"help": "FLORES split: dev or devtest"})
    langs: list[str] = field(default_factory=list, metadata={"help": "languages, comma-separated: every direction among them"})
    pairs: list[str] = field(default_factory=list, metadata={"help": "directions src-tgt, comma-separated"})
    lang: str = field(default="", metadata={"help": "one language: the directions into and out of it against --partners"})
    partners: list[str] = field(default_factory=list, metadata={"help": "partner languages for --lang, comma-separated"})
    mode: str = field(default="teacher", metadata={"help": "teacher (forcing the reference) or beam (count the beam-search hypothesis)", "choices": MODES})
    beam: int = field(default=4, metadata={"help": "beam size for --mode beam"})
    max_new_tokens: int = field(default=256, metadata={"help": "longest hypothesis for --mode beam, in tokens (its language code included)"})
    batch_tokens: int = field(default=4096, metadata={"help": "padded tokens per batch: sentences x longest (source or target)"})
    max_sentences: int | None = field(default=None, metadata={"help": "use at most N sentences of the split (from --first-sentence)"})
    first_sentence: int = field(default=0, metadata={"help": "first line (0-based) of the split to use; with --chunk-sentences K a multiple of K"})
    chunk_sentences: int | None = field(
        default=None,
        metadata={
            "help": "also keep the counters per chunk of K sentences (lines [cK, (c+1)K)) so that they can be resampled (nllb-prune stability); 0 or unset: off"
        },
    )
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto (under torchrun: cuda:LOCAL_RANK)"})
    dtype: str | None = field(default=None, metadata={"help": "fp32, bf16 or fp16 (default: the checkpoint's); routers always run in fp32"})
    dispatch: str = field(
        default="auto", metadata={"help": "expert dispatch: auto (grouped GEMM where supported), grouped or loop", "choices": ("auto", "grouped", "loop")}
    )
    out: str = required(help="statistics file to write (.safetensors)")
    resume: bool = field(default=False, metadata={"help": "continue --out: skip the directions it already holds"})
    expert_parallel: int = field(default=1, metadata={"help": "ranks sharing one model's experts (torchrun); world = this x data-parallel size"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    expert_outputs: bool = field(
        default=False,
        metadata={
            "help": "also count expert-output norms, gate x norm, max |activation|, mean output, co-activation and the p2/p1 gate histogram (one process: the experts run twice; docs/statistics.md)"
        },
    )

    def validate(self) -> None:
        check_required(self)  # also when built in Python, not from flags
        given = [flag for flag, value in (("--langs", self.langs), ("--pairs", self.pairs), ("--lang", self.lang)) if value]
        if len(given) != 1:
            what = "none" if not given else " and ".join(given)
            raise ConfigError(f"give exactly one of --langs, --pairs, --lang (with --partners), got {what}")
        if self.lang and not self.partners:
            raise ConfigError("--lang needs --partners: the languages it is translated from and into")
        if self.partners and not self.lang:
            raise ConfigError("--partners is for --lang")
        if self.langs and len(set(self.langs)) < 2:
            raise ConfigError(f"--langs needs at least two languages (every direction among them), got {self.langs}")
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        from pruning.model.loading import check_device

        check_device(self.device)
        for flag, value in (
            ("--beam", self.beam),
            ("--max-new-tokens", self.max_new_tokens),
            ("--batch-tokens", self.batch_tokens),
            ("--expert-parallel", self.expert_parallel),
        ):
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1, got {value}")
        if self.max_sentences is not None and self.max_sentences < 1:
            raise ConfigError(f"--max-sentences must be at least 1, got {self.max_sentences}")
        if self.first_sentence < 0:
            raise ConfigError(f"--first-sentence must be a line number >= 0, got {self.first_sentence}")
        if self.chunk_sentences is not None and self.chunk_sentences < 0:
            raise ConfigError(f"--chunk-sentences must be a number of sentences >= 1 (0: off), got {self.chunk_sentences}")
        if self.chunk_size and self.first_sentence % self.chunk_size:
            raise ConfigError(
                f"--first-sentence {self.first_sentence} must be a multiple of --chunk-sentences {self.chunk_size}, "
                "so that a chunk id names the same sentences in every file"
            )
        self.directions()

    def directions(self) -> list[str]:
        """The directions asked for, in a stable order (no duplicates, no ``x-x``)."""
        if self.pairs:
            out = []
            for pair in self.pairs:
                src, tgt = split_direction(pair, what="--pairs")
                if src == tgt:
                    raise ConfigError(f"--pairs: {pair!r} translates a language into itself")
                out.append(direction_key(src, tgt))
            return list(dict.fromkeys(out))
        if self.langs:
            langs = list(dict.fromkeys(self.langs))
            return [direction_key(s, t) for s in langs for t in langs if s != t]
        partners = [p for p in dict.fromkeys(self.partners) if p != self.lang]
        return [direction_key(self.lang, p) for p in partners] + [direction_key(p, self.lang) for p in partners]

    def languages(self) -> list[str]:
        return sorted({lang for d in self.directions() for lang in split_direction(d)})

    @property
    def chunk_size(self) -> Optional[int]:
        """K of ``--chunk-sentences``, or None when chunking is off (unset or 0)."""
        return self.chunk_sentences or None

    def lines(self, num_lines: int) -> range:
        """The line numbers counted in a split of ``num_lines`` lines (``--first-sentence``, ``--max-sentences``)."""
        end = num_lines if self.max_sentences is None else min(num_lines, self.first_sentence + self.max_sentences)
        return range(self.first_sentence, end)

    def chunk_ids(self, num_lines: int) -> range:
        """The ids of the chunks those lines fall in (``--chunk-sentences`` must be on)."""
        k, lines = self.chunk_size, self.lines(num_lines)
        assert k is not None
        return range(lines.start // k, (lines.stop - 1) // k + 1)


def check_languages(options: StatsOptions, flores: Any) -> None:
    """Every language must have a file in the split (the FLORES reader's error lists the valid codes)."""
    num_lines = flores.num_lines(options.split)
    for lang in options.languages():
        flores.path(lang, options.split)
    if options.first_sentence >= num_lines:
        raise StatsError(f"--first-sentence {options.first_sentence} is past the end of split {options.split} ({num_lines} lines)")


def check_tokenizer_languages(tokenizer: Any, languages: list[str]) -> None:
    from pruning.data.languages import tokenizer_codes

    unknown = [lang for lang in languages if tokenizer.convert_tokens_to_ids(lang) == tokenizer.unk_token_id]
    if unknown:
        known = tokenizer_codes(tokenizer)
        raise StatsError(
            f"the model's tokenizer has no language code for {unknown}; it knows {len(known)} codes" + (f": {', '.join(known[:10])} ..." if known else "")
        )
