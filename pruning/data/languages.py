"""NLLB language codes: the ``xxx_Xxxx`` form and the 202 codes NLLB-200 knows.

An NLLB code is an ISO 639-3 language code (3 lower-case letters), an underscore, and an ISO 15924
script code (an upper-case letter and 3 lower-case letters): ``fra_Latn``, ``zho_Hant``.

The list of the 202 NLLB-200 codes is not copied here: it is read from ``transformers``
(``FAIRSEQ_LANGUAGE_CODES`` of the NLLB tokenizer), which carries the released model's list.
The synthetic languages of the testbed (``experiments/testbed``) have codes of the same form from
the ISO 639-3 private-use range ``qaa``-``qtz``, so they can never be mistaken for real languages.
"""

from __future__ import annotations

import difflib
import functools
import re
from typing import Iterable

from pruning.errors import UserError

CODE_PATTERN = re.compile(r"[a-z]{3}_[A-Z][a-z]{3}")
"""The form of an NLLB language code (``fullmatch`` it)."""


class LanguageCodeError(UserError):
    """A language code is malformed or not among the codes allowed where it was given."""


@functools.lru_cache(maxsize=1)
def nllb_codes() -> tuple[str, ...]:
    """The 202 language codes of NLLB-200, in the order of the released tokenizer."""
    from transformers.models.nllb.tokenization_nllb import FAIRSEQ_LANGUAGE_CODES

    return tuple(FAIRSEQ_LANGUAGE_CODES)


def is_code_form(code: object) -> bool:
    """Whether ``code`` has the ``xxx_Xxxx`` form (it need not be an NLLB language)."""
    return isinstance(code, str) and CODE_PATTERN.fullmatch(code) is not None


def is_nllb_code(code: str) -> bool:
    """Whether ``code`` is one of the 202 NLLB-200 languages."""
    return code in _nllb_code_set()


def is_private_use(code: str) -> bool:
    """Whether the language part is in ISO 639-3's private-use range ``qaa``-``qtz`` (never a real language)."""
    return is_code_form(code) and code[0] == "q" and "a" <= code[1] <= "t"


def split_code(code: str, *, what: str = "language code") -> tuple[str, str]:
    """``"fra_Latn"`` -> ``("fra", "Latn")``, after checking the form."""
    check_code_form(code, what=what)
    language, script = code.split("_")
    return language, script


def check_code_form(code: object, *, what: str = "language code") -> str:
    """Return ``code`` if it has the ``xxx_Xxxx`` form, else raise :class:`LanguageCodeError`."""
    if not is_code_form(code):
        raise LanguageCodeError(
            f"{what} {code!r} is not of the NLLB form 'xxx_Xxxx' (3 lower-case letters of the ISO 639-3 "
            f"language, '_', the ISO 15924 script with a capital first letter), e.g. 'fra_Latn'"
        )
    return code  # type: ignore[return-value]


def validate_code(code: object, *, known: Iterable[str] | None = None, what: str = "language code") -> str:
    """Check the form of ``code`` and that it is among ``known`` (default: the 202 NLLB codes).

    The error names the code, where it came from (``what``), close matches and how many codes are valid.
    """
    check_code_form(code, what=what)
    allowed = _nllb_code_set() if known is None else frozenset(known)
    if code not in allowed:
        where = "the 202 NLLB-200 languages" if known is None else f"the {len(allowed)} languages available here"
        raise LanguageCodeError(f"{what} {code!r} is not one of {where}{_suggest(code, allowed)}")
    return code  # type: ignore[return-value]


def validate_codes(codes: Iterable[object], *, known: Iterable[str] | None = None, what: str = "language code") -> list[str]:
    """:func:`validate_code` for each code; one error lists every bad code at once."""
    allowed = None if known is None else frozenset(known)
    good: list[str] = []
    problems: list[str] = []
    for code in codes:
        try:
            good.append(validate_code(code, known=allowed, what=what))
        except LanguageCodeError as err:
            problems.append(str(err))
    if problems:
        raise LanguageCodeError("; ".join(problems))
    return good


@functools.lru_cache(maxsize=1)
def _nllb_code_set() -> frozenset[str]:
    return frozenset(nllb_codes())


def _suggest(code: str, allowed: Iterable[str]) -> str:
    pool = sorted(allowed)
    close = difflib.get_close_matches(code, pool, n=3, cutoff=0.8)
    # same language, other script: "srp_Latn" -> "srp_Cyrl"
    close += [c for c in pool if c[:3] == code[:3] and c not in close]
    hint = f"; did you mean {', '.join(repr(c) for c in close[:4])}?" if close else ""
    if len(pool) <= 20:
        hint += f"; valid: {', '.join(pool)}"
    return hint


def tokenizer_codes(tokenizer: object) -> list[str]:
    """The language codes a tokenizer holds as tokens (its added special tokens of the ``xxx_Xxxx`` form), sorted.

    Read from the tokenizer itself, not from the 202 NLLB codes: the testbed's tokenizer holds private-use
    codes (``qbe_Latn``) and none of NLLB's.
    """
    added = getattr(tokenizer, "added_tokens_encoder", None) or {}
    special = getattr(tokenizer, "additional_special_tokens", None) or []
    return sorted({token for token in (*added, *special) if is_code_form(token)})
