"""Translation directions (``src-tgt``) and model sides (encoder / decoder): the one place that names them.

A direction's key is ``"{src}-{tgt}"`` (``fra_Latn-eng_Latn``), as in the pruning paper's files; NLLB
language codes never contain ``-``. A side is ``encoder`` or ``decoder``; statistics files and plots
use the short forms ``enc`` / ``dec`` (:data:`SHORT_SIDE`, :func:`long_side`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

from pruning.data.languages import tokenizer_codes
from pruning.errors import UserError

Side = Literal["encoder", "decoder"]
SIDES: tuple[Side, Side] = ("encoder", "decoder")
SHORT_SIDE: dict[str, str] = {"encoder": "enc", "decoder": "dec"}
"""encoder -> enc, decoder -> dec (statistics files, plots, summaries)."""
ANY_DIRECTION = "*"
"""The key of an export or index entry that serves every direction."""


class DirectionError(UserError):
    """A direction or side is malformed, or names a language the model's tokenizer lacks."""


def long_side(short: str) -> Side:
    """``enc`` -> ``encoder``, ``dec`` -> ``decoder``."""
    for side, abbreviation in SHORT_SIDE.items():
        if short == abbreviation:
            return side  # type: ignore[return-value]
    raise DirectionError(f"side must be one of {', '.join(SHORT_SIDE.values())}, got {short!r}")


@dataclass(frozen=True, order=True)
class Direction:
    """One translation direction."""

    src: str
    tgt: str

    @property
    def key(self) -> str:
        return direction_key(self.src, self.tgt)

    def __str__(self) -> str:
        return self.key

    @classmethod
    def parse(cls, text: str, *, what: str = "direction") -> "Direction":
        """``"fra_Latn-eng_Latn"`` -> Direction; ``what`` names the flag, file or key in the error."""
        parts = str(text).split("-")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise DirectionError(f"{what}: {text!r} is not a direction 'src-tgt' (e.g. fra_Latn-eng_Latn)")
        return cls(parts[0].strip(), parts[1].strip())

    def check_codes(self, tokenizer: Any) -> None:
        """Both languages must be codes the tokenizer knows (it adds them to sources and forces them on targets)."""
        known = tokenizer_codes(tokenizer)
        unknown = [code for code in (self.src, self.tgt) if code not in known]
        if unknown:
            shown = ", ".join(known[:12]) + (" ..." if len(known) > 12 else "")
            raise DirectionError(
                f"direction {self}: {', '.join(repr(c) for c in unknown)} is not a language code of the model's tokenizer; "
                f"it knows {len(known)} codes{': ' + shown if known else ''}"
            )


def direction_key(src: str, tgt: str) -> str:
    return f"{src}-{tgt}"


def split_direction(key: str, *, what: str = "direction") -> tuple[str, str]:
    """``"src-tgt"`` -> ``(src, tgt)``."""
    direction = Direction.parse(key, what=what)
    return direction.src, direction.tgt


def parse_directions(texts: Sequence[str], *, what: str) -> list[Direction]:
    return [Direction.parse(text, what=what) for text in texts]
