"""The concepts the testbed languages can talk about, with their English-like forms.

Every content word of every testbed language translates one concept listed here. A concept's key is
its English lemma (unique over all parts of speech). Nouns carry a semantic class, which restricts the
verbs, adjectives and prepositions they combine with, so that sentences stay plausible:

    P person, A animal, F food (countable or mass), D drink (mass), T thing, L place

Tables are whitespace-separated strings, one entry per line, to keep the inventory readable.
"""

from __future__ import annotations

from dataclasses import dataclass

CLASSES = ("P", "A", "F", "D", "T", "L")


@dataclass(frozen=True)
class Noun:
    key: str
    plural: str  # English plural; "" for a mass noun (never plural, never with "a" or a numeral)
    cls: str  # one of CLASSES

    @property
    def countable(self) -> bool:
        return bool(self.plural)


@dataclass(frozen=True)
class Verb:
    key: str
    s3: str  # 3rd person singular present
    past: str
    subjects: str  # classes of possible subjects, e.g. "PA"
    objects: tuple[str, ...]  # () for intransitive; else classes ("P", "A", ...) and/or noun keys

    @property
    def transitive(self) -> bool:
        return bool(self.objects)


@dataclass(frozen=True)
class Adjective:
    key: str
    applies: str  # classes of nouns it can describe


@dataclass(frozen=True)
class Preposition:
    key: str
    objects: tuple[str, ...]  # classes and/or noun keys


def _plural(word: str) -> str:
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


# key [plural|-] ; "-" marks a mass noun; no plural given = regular
_NOUNS = {
    "P": """man men | woman women | child children | boy | girl | teacher | farmer | king | queen | doctor
            | soldier | friend | mother | father | brother | sister | student | baker | hunter | singer""",
    "A": """dog | cat | horse | cow | bird | fish fish | sheep sheep | goat | wolf wolves | bear | mouse mice
            | snake | lion | duck | pig | frog | rabbit | fox | deer deer | monkey""",
    "F": """apple | egg | cake | orange | banana | potato potatoes | carrot | onion | pie | cookie
            | bread - | rice - | meat - | cheese - | soup -""",
    "D": """water - | milk - | tea - | juice -""",
    "T": """book | stone | ball | cup | box | knife knives | key | letter | hat | shoe | rope | basket | bag
            | flower | stick | coin | lamp | chair | table | bed | door | window | boat | picture | bottle
            | clock""",
    "L": """house | river | forest | garden | city | village | field | road | mountain | lake | school
            | market | kitchen | bridge | hill | shop | room | farm | beach | island | tree""",
}

# key s3 past subjects : objects (classes and noun keys; empty = intransitive)
_VERBS = """
see sees saw PA : P A F D T L
find finds found PA : P A F T
eat eats ate PA : F
drink drinks drank PA : D
carry carries carried PA : T F
buy buys bought P : T F D A
sell sells sold P : T F D A
hold holds held P : T F A
cook cooks cooked P : F
read reads read P : book letter
write writes wrote P : book letter
open opens opened P : door window box bag book letter bottle shop
close closes closed P : door window box bag book bottle shop
build builds built P : house boat bridge table chair bed box school shop farm
paint paints painted P : house door picture chair table boat bed box window bridge
wash washes washed P : T A
love loves loved PA : P A
like likes liked PA : P A F D T L
help helps helped P : P
call calls called P : P A
follow follows followed PA : P A
visit visits visited P : P city village school market farm island forest garden
know knows knew PA : P L
want wants wanted PA : T F D A
watch watches watched PA : P A
feed feeds fed P : P A
throw throws threw P : ball stone stick coin apple egg key hat shoe cup bottle
catch catches caught PA : ball fish mouse bird rabbit frog duck
break breaks broke PA : cup window box chair table lamp door bottle clock stick bed
lose loses lost P : T
hide hides hid PA : T F
clean cleans cleaned P : T room kitchen house school shop
fix fixes fixed P : chair table lamp door window boat clock bed bridge road
cut cuts cut P : F rope stick flower
draw draws drew P : P A T L
meet meets met PA : P A
bring brings brought PA : T F D
sleep sleeps slept PA :
run runs ran PA :
walk walks walked PA :
sing sings sang PA :
dance dances danced P :
swim swims swam PA :
sit sits sat PA :
stand stands stood PA :
wait waits waited PA :
work works worked P :
play plays played PA :
cry cries cried P :
laugh laughs laughed P :
jump jumps jumped PA :
live lives lived PA :
fall falls fell PA :
rest rests rested PA :
"""

_ADJECTIVES = """
big PATLF | small PATLF | old PATL | young PA | new TL | good PAFDT | bad PAFDT | happy PA | sad PA
| tall PA | long TL | red TF | blue T | green TF | white ATF | black AT | yellow TF | brown ATF
| hot FDL | cold FDLT | wet PATL | dirty PATL | beautiful PATL | strong PA | weak PA | fast PA
| slow PA | quiet PAL | loud PA | rich P | poor P | hungry PA | tired PA | heavy TFA | sick PA
| angry PA | clever PA | brave P | kind P | sweet FD | fresh FD | empty cup box bag basket bottle room
| full cup box bag basket bottle room
"""

_PREPOSITIONS = """
in house forest garden city village field lake school market kitchen room shop river box bag basket
on table chair bed road bridge hill mountain beach island field boat
under table chair bed bridge tree
near L
with P A
behind house door tree school shop hill
"""

NUMERALS = ("two", "three", "four", "five")
"""Numerals used with plural nouns; "one" is not a concept of its own (English uses "a")."""

PERSONS = ("1sg", "2sg", "3sg.m", "3sg.f", "1pl", "3pl")
"""Subject pronouns: I, you (singular), he, she, we, they."""

TENSES = ("pres", "past", "fut")


def _parse_nouns() -> tuple[Noun, ...]:
    nouns = []
    for cls, table in _NOUNS.items():
        for entry in table.split("|"):
            words = entry.split()
            key = words[0]
            plural = _plural(key) if len(words) == 1 else ("" if words[1] == "-" else words[1])
            nouns.append(Noun(key, plural, cls))
    return tuple(nouns)


def _parse_verbs() -> tuple[Verb, ...]:
    verbs = []
    for line in _VERBS.strip().splitlines():
        head, objects = line.split(":")
        key, s3, past, subjects = head.split()
        verbs.append(Verb(key, s3, past, subjects, tuple(objects.split())))
    return tuple(verbs)


def _parse_adjectives() -> tuple[Adjective, ...]:
    adjectives = []
    for entry in _ADJECTIVES.split("|"):
        key, *applies = entry.split()
        adjectives.append(Adjective(key, " ".join(applies) if len(applies) > 1 else applies[0]))
    return tuple(adjectives)


def _parse_prepositions() -> tuple[Preposition, ...]:
    return tuple(Preposition(line.split()[0], tuple(line.split()[1:])) for line in _PREPOSITIONS.strip().splitlines())


NOUNS = _parse_nouns()
VERBS = _parse_verbs()
ADJECTIVES = _parse_adjectives()
PREPOSITIONS = _parse_prepositions()

NOUN = {n.key: n for n in NOUNS}
VERB = {v.key: v for v in VERBS}
ADJECTIVE = {a.key: a for a in ADJECTIVES}
PREPOSITION = {p.key: p for p in PREPOSITIONS}


def nouns_matching(spec: tuple[str, ...] | str) -> tuple[Noun, ...]:
    """The nouns allowed by a spec of classes and/or noun keys (``("P", "A")``, ``("door", "box")``,
    or an adjective's ``applies`` string such as ``"PATL"`` or ``"cup box"``)."""
    items: tuple[str, ...]
    if isinstance(spec, str):
        items = tuple(spec.split()) if " " in spec or spec in NOUN else tuple(spec)
    else:
        items = spec
    classes = {item for item in items if item in CLASSES}
    keys = {item for item in items if item not in CLASSES}
    unknown = sorted(keys - NOUN.keys())
    if unknown:
        raise KeyError(f"unknown noun keys in the concept tables: {unknown}")
    return tuple(n for n in NOUNS if n.cls in classes or n.key in keys)


def content_concepts() -> list[str]:
    """Every content concept key (nouns, verbs, adjectives, prepositions, numerals), in table order."""
    return [n.key for n in NOUNS] + [v.key for v in VERBS] + [a.key for a in ADJECTIVES] + [p.key for p in PREPOSITIONS] + list(NUMERALS)


def _check_unique() -> None:
    keys = content_concepts()
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise AssertionError(f"concept keys must be unique across parts of speech: {duplicates}")


_check_unique()
