"""The synthetic languages of the testbed: families, language table, and realisers of frames.

All languages are invented. Their codes use the ISO 639-3 private-use range ``qaa``-``qtz`` (never
assigned to a real language) with the ISO 15924 code of the script they are written in.

A family has a proto-language: random roots for every concept (from the family's phonotactics) and
hand-made affixes. Each member inherits the proto-roots (cognates), replaces a share of them with
roots of its own, applies its own regular sound changes to whole words, and writes them in its own
orthography. Grammar (word order, agreement, case, articles, ...) is per family, with switches per
language (``LanguageSpec.options``).
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field

from experiments.testbed import concepts as C
from experiments.testbed.grammar import Frame, NounPhrase, english_words, to_sentence
from experiments.testbed.phonology import (
    Orthography,
    Phonotactics,
    SoundChange,
    apply_sound_changes,
    attach_suffix,
    harmonize,
)

V = "[aeiouIOUEW]"  # any vowel, for sound-change patterns

_MALE = ("man", "boy", "king", "father", "brother")
_FEMALE = ("woman", "girl", "queen", "mother", "sister")


@dataclass(frozen=True)
class LanguageSpec:
    """One testbed language (documentation and generation both read this table)."""

    code: str  # NLLB-style code from the ISO 639-3 private-use range
    name: str  # invented name
    family: str
    order: str  # basic word order: SVO, SOV or VSO
    resource: str  # "high" (all training sentences) or "low" (a prefix of them)
    summary: str  # morphology in a phrase, for the README
    orthography: Orthography
    sound_changes: tuple[SoundChange, ...] = ()
    replacement: float = 0.0  # share of content concepts with a root of its own instead of the cognate
    options: tuple[tuple[str, object], ...] = field(default=())

    @property
    def script(self) -> str:
        return self.orthography.script

    def option(self, name: str) -> object:
        return dict(self.options)[name]


def _intervocalic(pairs: str) -> SoundChange:
    """Lenition between vowels: ``"pb td kg"`` turns p, t, k between vowels into b, d, g."""
    table = {pair[0]: pair[1] for pair in pairs.split()}
    pattern = re.compile(f"(?<={V})([{''.join(table)}])(?={V})")
    return lambda word: pattern.sub(lambda m: table[m.group(1)], word)


def _drop_final_o(word: str) -> str:
    """Loss of final -o after a consonant in words of two or more syllables (m.sg ending -> zero)."""
    vowels = sum(ch in "aeiouIOUEW" for ch in word)
    if vowels >= 2 and word.endswith("o") and len(word) > 1 and word[-2] not in "aeiouIOUEW":
        return word[:-1]
    return word


LANGUAGES: tuple[LanguageSpec, ...] = (
    LanguageSpec(
        "qen_Latn", "Testbed English", "English-like (source)", "SVO", "high",
        "English words and grammar: articles, plural -s, 3sg -s, auxiliaries will/do/did, be",
        Orthography("Latn"),
    ),
    LanguageSpec(
        "qbe_Latn", "Velan", "Belic", "SVO", "high",
        "2 genders; article before the noun and adjective after it agree in gender and number; "
        "verb suffixes for tense and person; partial pro-drop (1st/2nd person)",
        Orthography("Latn", (("c", "ch"),)),
        (_intervocalic("pb td kg"), ("k(?=[ei])", "c")),
        options=(("article", "word"), ("adjective", "post"), ("pro_drop", True)),
    ),
    LanguageSpec(
        "qbo_Latn", "Boran", "Belic", "SVO", "low",
        "like Velan (its close relative) but keeps subject pronouns; final -o > -u, f > h",
        Orthography("Latn"),
        (("o$", "u"), ("f", "h"), (f"(?<={V})s(?={V})", "z"), (f"(?<={V})b(?={V})", "v")),
        replacement=0.1,
        options=(("article", "word"), ("adjective", "post"), ("pro_drop", False)),
    ),
    LanguageSpec(
        "qbr_Cyrl", "Bresan", "Belic", "SVO", "high",
        "Belic in Cyrillic: definite article suffixed to the first word of the noun phrase, "
        "adjective before the noun, masculine singular ending lost, g > h",
        Orthography("Cyrl", (("q", "ц"), ("h", "г"))),
        (("g", "h"), ("k(?=[ei])", "q"), _drop_final_o),
        replacement=0.25,
        options=(("article", "suffix"), ("adjective", "pre"), ("pro_drop", False)),
    ),
    LanguageSpec(
        "qka_Cyrl", "Karan", "Karic", "SOV", "high",
        "agglutinative with vowel harmony; plural suffix (not after numerals); accusative suffix on "
        "definite objects; case suffixes and postpositions; verb suffixes for negation, tense, person; "
        "partial pro-drop",
        Orthography("Cyrl"),
        (_intervocalic("kG"), ("c", "s"), ("q", "c"), ("^y", "j")),
        options=(("indefinite", "adjective-first"), ("accusative", "definite"), ("pro_drop", True)),
    ),
    LanguageSpec(
        "qko_Cyrl", "Korov", "Karic", "SOV", "low",
        "like Karan, but every object takes the accusative; d > z between vowels, final n > ng",
        Orthography("Cyrl"),
        (_intervocalic("dz"), ("n$", "N"), ("^b", "p")),
        replacement=0.1,
        options=(("indefinite", "numeral-first"), ("accusative", "all"), ("pro_drop", True)),
    ),
    LanguageSpec(
        "qkl_Latn", "Kalish", "Karic", "SOV", "high",
        "Karic in a Turkish-like Latin orthography; keeps subject pronouns; b > v between vowels, final k > h, z > s",
        Orthography("Latn", (("c", "ş"), ("q", "ç"), ("G", "ğ"), ("j", "j"))),
        (_intervocalic("bv"), ("k$", "h"), ("z$", "s")),
        replacement=0.15,
        options=(("indefinite", "numeral-first"), ("accusative", "definite"), ("pro_drop", False)),
    ),
    LanguageSpec(
        "qta_Grek", "Telassa", "Telic", "VSO", "high",
        "verb first; tense prefixes and person suffixes; definite suffix on the noun and on its "
        "adjective, which follows and agrees in number; no copula in the present",
        Orthography("Grek"),
        (("p", "f"), ("h", "")),
        options=(("zero_copula", True), ("pro_drop", False)),
    ),
    LanguageSpec(
        "qti_Grek", "Tirun", "Telic", "VSO", "low",
        "like Telassa, but with a present copula and partial pro-drop; o > u, d > z, final m > n",
        Orthography("Grek"),
        (("o", "u"), ("d", "z"), ("m$", "n")),
        replacement=0.15,
        options=(("zero_copula", False), ("pro_drop", True)),
    ),
    LanguageSpec(
        "qmi_Latn", "Ngotai", "isolate (isolating)", "SVO", "high",
        "no inflection: tone-marked syllables, particles for plural, definiteness, tense and negation; "
        "numeral classifiers; adjective after the noun; no copula with adjectives",
        Orthography("Latn", (("d", "đ"), ("c", "ch"), ("O", "ơ"), ("U", "ư"), ("E", "ê"))),
    ),
)  # fmt: skip

SPEC = {spec.code: spec for spec in LANGUAGES}
SOURCE = "qen_Latn"


# ---- realisers ----------------------------------------------------------------------------------


class Realizer:
    """Turns a :class:`Frame` into a sentence of one language."""

    def __init__(self, spec: LanguageSpec) -> None:
        self.spec = spec

    def words(self, frame: Frame) -> list[str]:
        """The sentence as written words (no capital letter, no full stop)."""
        raise NotImplementedError

    def sentence(self, frame: Frame) -> str:
        return to_sentence(self.words(frame))


class EnglishRealizer(Realizer):
    def words(self, frame: Frame) -> list[str]:
        return english_words(frame)


class ProtoRealizer(Realizer):
    """A language built from proto-roots: subclasses assemble proto words, this class writes them."""

    def __init__(self, spec: LanguageSpec, *, lexicon: dict[str, str], genders: dict[str, str]) -> None:
        super().__init__(spec)
        self.lex = lexicon  # item -> root (proto phonemes)
        self.genders = genders
        self.write = functools.lru_cache(maxsize=None)(self._write)

    def _write(self, proto_word: str) -> str:
        return self.spec.orthography.write(apply_sound_changes(proto_word, self.spec.sound_changes))

    def words(self, frame: Frame) -> list[str]:
        return [self.write(w) for w in self.proto_words(frame)]

    def proto_words(self, frame: Frame) -> list[str]:
        raise NotImplementedError

    def citations(self) -> dict[str, str]:
        """item -> one written form per lexicon item, to find items that the language cannot tell apart."""
        return {item: self.write(self.citation(item)) for item in self.lex}

    def citation(self, item: str) -> str:
        return self.lex[item]

    def drops(self, np: NounPhrase) -> bool:
        """Whether a subject pronoun is dropped (partial pro-drop: 1st and 2nd person only)."""
        return bool(self.spec.option("pro_drop")) and np.person is not None and np.person[0] in "12"


def _arrange(order: str, subject: list[str], verb: list[str], obj: list[str], rest: list[str]) -> list[str]:
    if order == "SVO":
        return subject + verb + obj + rest
    if order == "SOV":
        return subject + obj + rest + verb
    return verb + subject + obj + rest  # VSO


# ---- Belic: fusional, genders, articles, SVO ------------------------------------------------------

_BELIC_END = {("m", False): "o", ("f", False): "a", ("m", True): "i", ("f", True): "e"}
_BELIC_TENSE = {"pres": "", "past": "av", "fut": "ir"}
_BELIC_PERSON = {"1sg": "o", "2sg": "es", "3sg": "a", "1pl": "emo", "3pl": "an"}


class BelicRealizer(ProtoRealizer):
    def _gender(self, np: NounPhrase) -> str:
        if np.person is not None:
            return "f" if np.person == "3sg.f" else "m"
        return self.genders[np.noun]  # type: ignore[index]

    def noun_phrase(self, np: NounPhrase) -> list[str]:
        if np.person is not None:
            return [self.lex["pron:" + np.person]]
        gender, plural = self._gender(np), np.plural
        end = _BELIC_END[(gender, plural)]
        core = [self.lex[np.noun] + end]  # type: ignore[index]
        if np.adjective:
            adjective = self.lex[np.adjective] + end
            core = [adjective] + core if self.spec.option("adjective") == "pre" else core + [adjective]
        if np.numeral:
            core = [self.lex[np.numeral]] + core
        countable = C.NOUN[np.noun].countable  # type: ignore[index]
        if np.definite:
            article = "l" + end
            if self.spec.option("article") == "suffix":
                return [core[0] + article] + core[1:]
            return [article] + core
        if countable and not plural:
            return ["un" + end] + core
        return core

    def verb(self, root: str, frame: Frame) -> list[str]:
        form = root + _BELIC_TENSE[frame.tense] + _BELIC_PERSON[frame.subject.agreement]
        return [self.lex["neg"], form] if frame.negated else [form]

    def proto_words(self, frame: Frame) -> list[str]:
        subject = [] if self.drops(frame.subject) else self.noun_phrase(frame.subject)
        rest = [self.lex[frame.preposition], *self.noun_phrase(frame.place)] if frame.place else []
        if frame.kind in ("tr", "intr"):
            obj = self.noun_phrase(frame.obj) if frame.obj else []
            return _arrange("SVO", subject, self.verb(self.lex[frame.verb], frame), obj, rest)  # type: ignore[index]
        verb = self.verb(self.lex["be"], frame)
        if frame.kind == "cop_adj":
            end = _BELIC_END[(self._gender(frame.subject), frame.subject.plural)]
            rest = [self.lex[frame.predicate] + end]  # type: ignore[index]
        return subject + verb + rest

    def citation(self, item: str) -> str:
        if item in C.NOUN:
            return self.lex[item] + _BELIC_END[(self.genders[item], False)]
        if item in C.VERB or item == "be":
            return self.lex[item] + "a"
        if item in C.ADJECTIVE:
            return self.lex[item] + "o"
        return self.lex[item]


# ---- Karic: agglutinative, vowel harmony, cases, SOV ---------------------------------------------

_KARIC_TENSE = {"pres": "Hr", "past": "DH", "fut": "AcAk"}
_KARIC_PERSON = {"1sg": "Hm", "2sg": "sHn", "3sg": "", "1pl": "Hz", "3pl": "lAr"}
_KARIC_CASE_PREPOSITIONS = {"in": "DA", "with": "(y)lA"}  # realised as noun suffixes, not words


def _karic_word(stem: str, *suffixes: str) -> str:
    word = stem
    for suffix in suffixes:
        word = attach_suffix(word, suffix)
    return harmonize(word)


class KaricRealizer(ProtoRealizer):
    def noun_phrase(self, np: NounPhrase, *, case: str = "") -> list[str]:
        if np.person is not None:
            return [self.lex["pron:" + np.person]]
        plural = "lAr" if np.plural and not np.numeral else ""
        words = [_karic_word(self.lex[np.noun], plural, case)]  # type: ignore[index]
        adjective = [self.lex[np.adjective]] if np.adjective else []
        if np.numeral:
            return [self.lex[np.numeral], *adjective, *words]
        if not np.definite and not np.plural and C.NOUN[np.noun].countable:  # type: ignore[index]
            one = [self.lex["one"]]
            if self.spec.option("indefinite") == "adjective-first":
                return adjective + one + words
            return one + adjective + words
        return adjective + words

    def object_phrase(self, np: NounPhrase) -> list[str]:
        marked = np.definite or self.spec.option("accusative") == "all"
        return self.noun_phrase(np, case="H" if marked else "")

    def place_phrase(self, prep: str, np: NounPhrase) -> list[str]:
        if prep in _KARIC_CASE_PREPOSITIONS:
            return self.noun_phrase(np, case=_KARIC_CASE_PREPOSITIONS[prep])
        return [*self.noun_phrase(np), self.lex[prep]]

    def verb(self, root: str, frame: Frame) -> list[str]:
        negation = "mA" if frame.negated else ""
        return [_karic_word(root, negation, _KARIC_TENSE[frame.tense], _KARIC_PERSON[frame.subject.agreement])]

    def proto_words(self, frame: Frame) -> list[str]:
        subject = [] if self.drops(frame.subject) else self.noun_phrase(frame.subject)
        rest = self.place_phrase(frame.preposition, frame.place) if frame.place else []  # type: ignore[arg-type]
        if frame.kind in ("tr", "intr"):
            obj = self.object_phrase(frame.obj) if frame.obj else []
            return _arrange("SOV", subject, self.verb(self.lex[frame.verb], frame), obj, rest)  # type: ignore[index]
        if frame.kind == "cop_adj":
            rest = [self.lex[frame.predicate]]  # type: ignore[index]
        return subject + rest + self.verb(self.lex["be"], frame)

    def citation(self, item: str) -> str:
        if item in C.VERB or item == "be":
            return _karic_word(self.lex[item], "Hr")
        return self.lex[item]


# ---- Telic: VSO, tense prefixes, definite suffix --------------------------------------------------

_TELIC_TENSE = {"pres": "", "past": "ka", "fut": "sa"}
_TELIC_PERSON = {"1sg": "ti", "2sg": "ta", "3sg": "", "1pl": "nu", "3pl": "u"}


class TelicRealizer(ProtoRealizer):
    def noun_phrase(self, np: NounPhrase) -> list[str]:
        if np.person is not None:
            return [self.lex["pron:" + np.person]]
        suffix = ("im" if np.plural else "") + ("an" if np.definite else "")
        words = [self.lex[np.noun] + suffix]  # type: ignore[index]
        if np.adjective:
            words.append(self.lex[np.adjective] + suffix)
        if np.numeral:
            words.insert(0, self.lex[np.numeral])
        return words

    def verb(self, root: str, frame: Frame) -> list[str]:
        form = _TELIC_TENSE[frame.tense] + root + _TELIC_PERSON[frame.subject.agreement]
        return [self.lex["neg"], form] if frame.negated else [form]

    def proto_words(self, frame: Frame) -> list[str]:
        subject = [] if self.drops(frame.subject) else self.noun_phrase(frame.subject)
        rest = [self.lex[frame.preposition], *self.noun_phrase(frame.place)] if frame.place else []  # type: ignore[arg-type]
        if frame.kind in ("tr", "intr"):
            obj = self.noun_phrase(frame.obj) if frame.obj else []
            return _arrange("VSO", subject, self.verb(self.lex[frame.verb], frame), obj, rest)  # type: ignore[index]
        if frame.kind == "cop_adj":
            rest = [self.lex[frame.predicate] + ("im" if frame.subject.plural else "")]  # type: ignore[index]
        if frame.tense == "pres" and self.spec.option("zero_copula"):
            if frame.negated:
                return [self.lex["neg"], *self.noun_phrase(frame.subject), *rest]
            return self.noun_phrase(frame.subject) + rest
        return _arrange("VSO", subject, self.verb(self.lex["be"], frame), [], rest)


# ---- the isolating language: particles, classifiers, tones ----------------------------------------

_CLASSIFIER = {"P": "cl:person", "A": "cl:animal"}


class IsolatingRealizer(ProtoRealizer):
    def noun_phrase(self, np: NounPhrase) -> list[str]:
        if np.person is not None:
            return [self.lex["pron:" + np.person]]
        noun = C.NOUN[np.noun]  # type: ignore[index]
        classifier = self.lex[_CLASSIFIER.get(noun.cls, "cl:thing")]
        words = [self.lex[noun.key]]
        if np.adjective:
            words.append(self.lex[np.adjective])
        if np.numeral:
            words = [self.lex[np.numeral], classifier, *words]
        elif np.plural:
            words = [self.lex["plural"], *words]
        elif not np.definite and noun.countable:
            words = [self.lex["one"], classifier, *words]
        if np.definite:
            words.append(self.lex["definite"])
        return words

    def particles(self, frame: Frame) -> list[str]:
        tense = [self.lex[frame.tense]] if frame.tense != "pres" else []
        return tense + ([self.lex["neg"]] if frame.negated else [])

    def proto_words(self, frame: Frame) -> list[str]:
        subject = self.noun_phrase(frame.subject)
        rest = [self.lex[frame.preposition], *self.noun_phrase(frame.place)] if frame.place else []  # type: ignore[arg-type]
        if frame.kind in ("tr", "intr"):
            obj = self.noun_phrase(frame.obj) if frame.obj else []
            return subject + self.particles(frame) + [self.lex[frame.verb]] + obj + rest  # type: ignore[index]
        if frame.kind == "cop_adj":
            return subject + self.particles(frame) + [self.lex[frame.predicate]]  # type: ignore[index]
        return subject + self.particles(frame) + [self.lex["be"]] + rest


# ---- families -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """A proto-language: how its roots look and which closed-class items it has."""

    name: str
    phonotactics: Phonotactics
    realizer: type[ProtoRealizer]
    function_items: tuple[str, ...]
    closed_roots: bool  # content roots end in a consonant (suffixing morphology needs it)
    exclude: tuple[str, ...] = ()  # concepts with no root of their own (e.g. prepositions realised as cases)
    genders: bool = False
    syllable_weights: tuple[int, int, int] = (4, 5, 1)  # content roots of 1, 2, 3 syllables

    def items(self) -> list[str]:
        return [c for c in C.content_concepts() if c not in self.exclude] + list(self.function_items)

    def new_root(self, rng: random.Random, item: str) -> str:
        if item in C.NOUN or item in C.VERB or item in C.ADJECTIVE or item == "be":
            syllables = rng.choices((1, 2, 3), weights=self.syllable_weights)[0]
            return self.phonotactics.root(rng, syllables=syllables, closed=self.closed_roots)
        if item in C.NUMERALS:
            return self.phonotactics.root(rng, syllables=rng.choice((1, 2)), closed=False)
        return self.phonotactics.root(rng, syllables=1, closed=False)  # function words: short


_PRONOUNS = tuple("pron:" + p for p in C.PERSONS)
_CONTENT = frozenset(C.content_concepts())

FAMILIES = {
    "Belic": Family(
        "Belic", Phonotactics("ptkbdgfvsmnlr", "aeiou", "nlrstkm"), BelicRealizer,
        _PRONOUNS + ("neg", "be"), closed_roots=True, genders=True,
    ),
    "Karic": Family(
        "Karic", Phonotactics("ptkbdgszcqymnlr", "aIouOUei", "ktnlrmszcq", harmony=True), KaricRealizer,
        _PRONOUNS + ("one", "be"), closed_roots=False, exclude=tuple(_KARIC_CASE_PREPOSITIONS),
    ),
    "Telic": Family(
        "Telic", Phonotactics("ptkbdgfszhmnlr", "aeiou", "tkdbmnlrsz"), TelicRealizer,
        _PRONOUNS + ("neg", "be"), closed_roots=True,
    ),
    "isolate (isolating)": Family(
        "isolate (isolating)", Phonotactics("bcdghkKlmnNJstTvx", "aeiouOUE", "nNmtp", tones=5),
        IsolatingRealizer,
        _PRONOUNS + ("neg", "be", "one", "plural", "definite", "past", "fut", "cl:person", "cl:animal", "cl:thing"),
        closed_roots=False, syllable_weights=(6, 4, 0),
    ),
}  # fmt: skip


class LexiconError(RuntimeError):
    """The lexicon generator could not find distinct words (a bug in the tables, not user input)."""


def build_family(family: Family, specs: list[LanguageSpec], *, seed: int) -> dict[str, ProtoRealizer]:
    """Realisers for the members of ``family``: proto-roots, replaced roots, and no two items alike.

    Roots are drawn again (from the same seeded generators, in a fixed order) until no language of
    the family writes two different items the same way.
    """
    rng = random.Random(f"{seed}:family:{family.name}")
    items = family.items()
    proto = {item: family.new_root(rng, item) for item in items}
    genders = {n.key: _gender(rng, n.key) for n in C.NOUNS} if family.genders else {}
    own: dict[tuple[str, str], str] = {}
    own_rngs = {spec.code: random.Random(f"{seed}:lexicon:{spec.code}") for spec in specs}
    for spec in specs:
        for item in items:
            if item in _CONTENT and own_rngs[spec.code].random() < spec.replacement:
                own[(spec.code, item)] = family.new_root(own_rngs[spec.code], item)
    for _ in range(500):
        realizers = {spec.code: family.realizer(spec, lexicon={i: own.get((spec.code, i), proto[i]) for i in items}, genders=genders) for spec in specs}
        clashes = [(code, item) for code, realizer in realizers.items() for item in _clashes(realizer)]
        if not clashes:
            return realizers
        for code, item in clashes:
            if (code, item) in own:
                own[(code, item)] = family.new_root(own_rngs[code], item)
            else:
                proto[item] = family.new_root(rng, item)
    raise LexiconError(f"could not make the words of the {family.name} family distinct: {clashes[:10]}")


def _gender(rng: random.Random, noun: str) -> str:
    if noun in _MALE:
        return "m"
    if noun in _FEMALE:
        return "f"
    return rng.choice("mf")


def _clashes(realizer: ProtoRealizer) -> list[str]:
    """Items written like an earlier item (in item order)."""
    seen: dict[str, str] = {}
    clashes = []
    for item, form in realizer.citations().items():
        if form in seen:
            clashes.append(item)
        else:
            seen[form] = item
    return clashes


def build_languages(seed: int, codes: list[str] | None = None) -> dict[str, Realizer]:
    """A realiser for every language of the table (or for ``codes``), in table order."""
    specs = [spec for spec in LANGUAGES if codes is None or spec.code in codes]
    realizers: dict[str, Realizer] = {}
    for name, family in FAMILIES.items():
        members = [spec for spec in specs if spec.family == name]
        if members:
            realizers.update(build_family(family, members, seed=seed))
    if any(spec.code == SOURCE for spec in specs):
        realizers[SOURCE] = EnglishRealizer(SPEC[SOURCE])
    return {spec.code: realizers[spec.code] for spec in specs}
