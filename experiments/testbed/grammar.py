"""Abstract sentences ("frames") of the testbed, their sampler, and the English-like realisation.

A :class:`Frame` says what a sentence means, independently of any language: who does what to whom,
where, when, negated or not. Every testbed language realises the same frame, which makes the corpus
multi-way parallel. Four kinds of clause:

    tr       subject verb object [place]        "The old farmer will not sell two cows."
    intr     subject verb [place]               "A dog sleeps under the table."
    cop_adj  subject is adjective               "The soup was hot."
    cop_loc  subject is place                   "We are in the garden."
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from experiments.testbed import concepts as C


@dataclass(frozen=True)
class NounPhrase:
    """A noun phrase: a pronoun (``person`` set) or a noun with number, definiteness, numeral, adjective."""

    noun: str | None = None
    person: str | None = None  # one of concepts.PERSONS for a pronoun
    plural: bool = False
    definite: bool = False
    numeral: str | None = None  # only with plural
    adjective: str | None = None

    @property
    def agreement(self) -> str:
        """Person-number of the phrase as a subject: ``1sg``, ``2sg``, ``3sg``, ``1pl`` or ``3pl``."""
        if self.person is not None:
            return self.person.split(".")[0]
        return "3pl" if self.plural else "3sg"


@dataclass(frozen=True)
class Frame:
    kind: str  # tr | intr | cop_adj | cop_loc
    subject: NounPhrase
    tense: str  # pres | past | fut
    negated: bool = False
    verb: str | None = None
    obj: NounPhrase | None = None
    predicate: str | None = None  # adjective of cop_adj
    preposition: str | None = None
    place: NounPhrase | None = None  # object of the preposition


KINDS = (("tr", 0.45), ("intr", 0.25), ("cop_adj", 0.18), ("cop_loc", 0.12))
TENSE_WEIGHTS = (("pres", 0.4), ("past", 0.4), ("fut", 0.2))
P_PRONOUN = 0.2
P_PLURAL = 0.35
P_NUMERAL = 0.3
P_DEFINITE = 0.6
P_ADJECTIVE = 0.25
P_NEGATED = 0.15
P_PLACE = {"tr": 0.25, "intr": 0.6}
MIN_WORDS, MAX_WORDS = 4, 9


def _weighted(rng: random.Random, table: tuple[tuple[str, float], ...]) -> str:
    return rng.choices([k for k, _ in table], weights=[w for _, w in table])[0]


def _noun_phrase(rng: random.Random, nouns: tuple[C.Noun, ...], *, adjective: str | None = None) -> NounPhrase:
    noun = rng.choice(nouns)
    plural = noun.countable and rng.random() < P_PLURAL
    numeral = rng.choice(C.NUMERALS) if plural and rng.random() < P_NUMERAL else None
    definite = rng.random() < P_DEFINITE
    if adjective is None and rng.random() < P_ADJECTIVE:
        fitting = [a.key for a in C.ADJECTIVES if noun in C.nouns_matching(a.applies)]
        adjective = rng.choice(fitting) if fitting else None
    return NounPhrase(noun=noun.key, plural=plural, definite=definite, numeral=numeral, adjective=adjective)


def _subject(rng: random.Random, classes: str, *, allow_pronoun: bool = True) -> NounPhrase:
    if allow_pronoun and rng.random() < P_PRONOUN:
        return _pronoun_phrase(rng.choice(C.PERSONS))
    return _noun_phrase(rng, C.nouns_matching(tuple(classes)))


def _pronoun_phrase(person: str) -> NounPhrase:
    return NounPhrase(person=person, plural=person.endswith("pl"))


def _place(rng: random.Random) -> tuple[str, NounPhrase]:
    prep = rng.choice(C.PREPOSITIONS)
    return prep.key, _noun_phrase(rng, C.nouns_matching(prep.objects))


def sample_frame(rng: random.Random) -> Frame:
    """One random frame (any length; :func:`sample_sentence_frame` enforces the length range)."""
    kind = _weighted(rng, KINDS)
    tense = _weighted(rng, TENSE_WEIGHTS)
    negated = rng.random() < P_NEGATED
    if kind in ("tr", "intr"):
        verbs = [v for v in C.VERBS if v.transitive == (kind == "tr")]
        verb = rng.choice(verbs)
        subject = _subject(rng, verb.subjects)
        obj = _noun_phrase(rng, C.nouns_matching(verb.objects)) if kind == "tr" else None
        prep, place = _place(rng) if rng.random() < P_PLACE[kind] else (None, None)
        return Frame(kind, subject, tense, negated, verb=verb.key, obj=obj, preposition=prep, place=place)
    if kind == "cop_adj":
        adjective = rng.choice(C.ADJECTIVES)
        subject = _noun_phrase(rng, C.nouns_matching(adjective.applies))
        if "P" in adjective.applies and rng.random() < P_PRONOUN:
            subject = _pronoun_phrase(rng.choice(C.PERSONS))
        return Frame(kind, subject, tense, negated, predicate=adjective.key)
    subject = _subject(rng, "PAT")
    prep, place = _place(rng)
    return Frame(kind, subject, tense, negated, preposition=prep, place=place)


def sample_sentence_frame(rng: random.Random) -> Frame:
    """A frame whose English-like realisation has between MIN_WORDS and MAX_WORDS words."""
    while True:
        frame = sample_frame(rng)
        if MIN_WORDS <= len(english_words(frame)) <= MAX_WORDS:
            return frame


# ---- English-like realisation ------------------------------------------------------------------

_PRONOUNS = {"1sg": "I", "2sg": "you", "3sg.m": "he", "3sg.f": "she", "1pl": "we", "3pl": "they"}
_BE = {
    ("pres", "1sg"): "am", ("pres", "3sg"): "is", ("past", "1sg"): "was", ("past", "3sg"): "was",
}  # fmt: skip


def english_noun_phrase(np: NounPhrase) -> list[str]:
    if np.person is not None:
        return [_PRONOUNS[np.person]]
    noun = C.NOUN[np.noun]  # type: ignore[index]
    words = [noun.plural if np.plural else np.noun]
    if np.adjective:
        words.insert(0, np.adjective)
    if np.numeral:
        words.insert(0, np.numeral)
    if np.definite:
        words.insert(0, "the")
    elif noun.countable and not np.plural:
        words.insert(0, "an" if words[0][0] in "aeiou" else "a")
    return words


def _be(tense: str, agreement: str, negated: bool) -> list[str]:
    if tense == "fut":
        return ["will", "not", "be"] if negated else ["will", "be"]
    default = "are" if tense == "pres" else "were"
    form = _BE.get((tense, agreement), default)
    return [form, "not"] if negated else [form]


def _verb(verb: C.Verb, tense: str, agreement: str, negated: bool) -> list[str]:
    if tense == "fut":
        return ["will", "not", verb.key] if negated else ["will", verb.key]
    if tense == "past":
        return ["did", "not", verb.key] if negated else [verb.past]
    third = agreement == "3sg"
    if negated:
        return ["does" if third else "do", "not", verb.key]
    return [verb.s3 if third else verb.key]


def english_words(frame: Frame) -> list[str]:
    """The English-like sentence as words, without capital or final full stop."""
    words = english_noun_phrase(frame.subject)
    agreement = frame.subject.agreement
    if frame.kind in ("tr", "intr"):
        words += _verb(C.VERB[frame.verb], frame.tense, agreement, frame.negated)  # type: ignore[index]
        if frame.obj is not None:
            words += english_noun_phrase(frame.obj)
    else:
        words += _be(frame.tense, agreement, frame.negated)
        if frame.kind == "cop_adj":
            words.append(frame.predicate)  # type: ignore[arg-type]
    if frame.place is not None:
        words += [frame.preposition, *english_noun_phrase(frame.place)]  # type: ignore[list-item]
    return words


def to_sentence(words: list[str]) -> str:
    """Join words, capitalise the first letter and add a full stop."""
    text = " ".join(words)
    return text[:1].upper() + text[1:] + "."
