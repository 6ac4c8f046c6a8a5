"""Sounds of the synthetic testbed languages: proto-roots, sound changes, vowel harmony, scripts.

Words are built as strings of one-character phoneme symbols and turned into text only at the end:

    proto-root (family)  --morphology-->  proto word  --sound changes (language)-->  word
                         --orthography (language: Latin, Cyrillic or Greek letters)-->  text

Phoneme symbols (one character each):
    consonants  p t k b d g f v s z h x m n l r y(=j) w c(=sh) q(=ch or ts) j(=zh) G(=gh) N(=ng)
                K(=kh) T(=th) J(=ny)
    vowels      a e i o u I(=close back unrounded) O(=front rounded o) U(=front rounded u) E(=e circumflex)
                W(=u with horn)
    tones       digits 1-5 right after a vowel (the isolating language only)
    harmony     A (a/e) and H (I/u/i/U) stand in suffixes until :func:`harmonize` resolves them
"""

from __future__ import annotations

import random
import re
import unicodedata
from dataclasses import dataclass
from typing import Callable

VOWELS = "aeiouIOUEW"
BACK_VOWELS = "aIou"
FRONT_VOWELS = "eiOU"
ROUNDED_VOWELS = "ouOU"
VOICELESS = "ptkfscqhxKT"

SoundChange = tuple[str, str] | Callable[[str], str]
"""A regular sound change: ``(regex, replacement)`` applied to a whole word, or a function of the word."""


@dataclass(frozen=True)
class Phonotactics:
    """How the roots of one proto-language look."""

    onsets: str  # consonants that may start a syllable
    vowels: str
    codas: str  # consonants that may close a syllable ("" = open syllables only)
    harmony: bool = False  # all vowels of a root are front, or all back
    tones: int = 0  # number of tone marks besides the unmarked tone (isolating language)

    def syllable(self, rng: random.Random, *, vowels: str | None = None, coda: bool | None = None) -> str:
        onset = rng.choice(self.onsets)
        vowel = rng.choice(vowels or self.vowels)
        tone = str(rng.randint(1, self.tones)) if self.tones and rng.random() < 0.8 else ""
        if coda is None:
            coda = bool(self.codas) and rng.random() < 0.4
        return onset + vowel + tone + (rng.choice(self.codas) if coda else "")

    def root(self, rng: random.Random, *, syllables: int, closed: bool) -> str:
        """A root of ``syllables`` syllables; ``closed`` roots end in a consonant (for suffixing morphology)."""
        vowels = None
        if self.harmony:
            vowels = rng.choice((BACK_VOWELS, FRONT_VOWELS))
        parts = [self.syllable(rng, vowels=vowels, coda=False) for _ in range(syllables - 1)]
        parts.append(self.syllable(rng, vowels=vowels, coda=True if closed else None))
        return "".join(parts)


def apply_sound_changes(word: str, changes: tuple[SoundChange, ...]) -> str:
    """Apply regular sound changes in order (each to the whole word; ``^``/``$`` are word edges)."""
    for change in changes:
        if callable(change):
            word = change(word)
        else:
            pattern, replacement = change
            word = re.sub(pattern, replacement, word)
    return word


def harmonize(word: str) -> str:
    """Resolve harmony archiphonemes left to right from the last real vowel before each.

    ``A`` -> ``a`` after a back vowel, ``e`` after a front one; ``H`` -> the high vowel of the same
    backness and rounding (``I u`` back, ``i U`` front). Also ``d`` at the start of a suffix after a
    voiceless consonant becomes ``t`` (marked by the caller as ``D``).
    """
    out: list[str] = []
    last = "a"
    for ch in word:
        if ch == "A":
            ch = "a" if last in BACK_VOWELS else "e"
        elif ch == "H":
            back = last in BACK_VOWELS
            rounded = last in ROUNDED_VOWELS
            ch = {(True, False): "I", (True, True): "u", (False, False): "i", (False, True): "U"}[(back, rounded)]
        elif ch == "D":
            ch = "t" if out and out[-1] in VOICELESS else "d"
        if ch in VOWELS:
            last = ch
        out.append(ch)
    return "".join(out)


def attach_suffix(stem: str, suffix: str, *, buffer: str = "y") -> str:
    """``stem + suffix``, with a buffer consonant between vowels.

    A suffix starting with a vowel after a vowel-final stem gets ``buffer``; a suffix written with an
    optional consonant, ``"(y)lA"``, keeps it only after a vowel.
    """
    if not suffix:
        return stem
    after_vowel = bool(stem) and _is_vowel(stem[-1])
    if suffix.startswith("("):
        optional, suffix = suffix[1:].split(")", 1)
        return stem + (optional if after_vowel else "") + suffix
    if after_vowel and _is_vowel(suffix[0]):
        return stem + buffer + suffix
    return stem + suffix


def _is_vowel(ch: str) -> bool:
    return ch in VOWELS or ch in "AH"


# ---- scripts ----------------------------------------------------------------------------------

_TONE_MARKS = {"1": "\u0301", "2": "\u0300", "3": "\u0309", "4": "\u0303", "5": "\u0323"}

LATIN_BASE = {
    "a": "a", "e": "e", "i": "i", "o": "o", "u": "u", "I": "ı", "O": "ö", "U": "ü", "E": "ê", "W": "ư",
    "p": "p", "t": "t", "k": "k", "b": "b", "d": "d", "g": "g", "f": "f", "v": "v", "s": "s", "z": "z",
    "h": "h", "x": "x", "m": "m", "n": "n", "l": "l", "r": "r", "y": "y", "w": "w", "c": "sh", "q": "ch",
    "j": "zh", "G": "gh", "N": "ng", "K": "kh", "T": "th", "J": "nh",
}  # fmt: skip

CYRILLIC_BASE = {
    "a": "а", "e": "е", "i": "и", "o": "о", "u": "у", "I": "ы", "O": "ө", "U": "ү", "E": "э", "W": "ў",
    "p": "п", "t": "т", "k": "к", "b": "б", "d": "д", "g": "г", "f": "ф", "v": "в", "s": "с", "z": "з",
    "h": "һ", "x": "х", "m": "м", "n": "н", "l": "л", "r": "р", "y": "й", "w": "ў", "c": "ш", "q": "ч",
    "j": "ж", "G": "ғ", "N": "ң", "K": "х", "T": "т", "J": "нь",
}  # fmt: skip

GREEK_BASE = {
    "a": "α", "e": "ε", "i": "ι", "o": "ο", "u": "ου", "I": "υ", "O": "ω", "U": "υι", "E": "η", "W": "ου",
    "p": "π", "t": "τ", "k": "κ", "b": "μπ", "d": "δ", "g": "γ", "f": "φ", "v": "β", "s": "σ", "z": "ζ",
    "h": "χ", "x": "ξ", "m": "μ", "n": "ν", "l": "λ", "r": "ρ", "y": "γι", "w": "ου", "c": "σσ", "q": "τσ",
    "j": "ζζ", "G": "γχ", "N": "γκ", "K": "χ", "T": "θ", "J": "νι",
}  # fmt: skip

SCRIPT_TABLES = {"Latn": LATIN_BASE, "Cyrl": CYRILLIC_BASE, "Grek": GREEK_BASE}


@dataclass(frozen=True)
class Orthography:
    """How one language writes its phonemes: a script table plus that language's own spellings."""

    script: str  # ISO 15924: Latn, Cyrl, Grek
    overrides: tuple[tuple[str, str], ...] = ()

    def table(self) -> dict[str, str]:
        return {**SCRIPT_TABLES[self.script], **dict(self.overrides)}

    def write(self, word: str) -> str:
        table = self.table()
        out: list[str] = []
        for ch in word:
            if ch in _TONE_MARKS:
                out.append(_TONE_MARKS[ch])
            elif ch in table:
                out.append(table[ch])
            else:
                raise ValueError(f"phoneme {ch!r} of {word!r} has no letter in the {self.script} orthography")
        text = unicodedata.normalize("NFC", "".join(out))
        if self.script == "Grek" and text.endswith("σ"):
            text = text[:-1] + "ς"  # Greek final sigma
        return text
