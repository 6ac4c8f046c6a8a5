"""Reading FLORES-200 style directories: ``ROOT/{split}/{lang}.{split}``, one sentence per line.

The released FLORES-200 unpacks to ``flores200_dataset/{dev,devtest}/{lang}.{split}`` (997 dev and
1012 devtest lines, line-aligned across the 204 files of a split). :class:`FloresDir` accepts the
directory that holds the split folders, or its parent when that holds ``flores200_dataset/``.
The testbed corpus (``experiments/testbed``) writes the same layout.

Every file of a split must have the same number of lines (line ``i`` of every file is a translation
of the same sentence); this is checked once per split, before the first line of it is returned.
"""

from __future__ import annotations

import collections
import difflib
import os
from pathlib import Path

from pruning.data.languages import is_code_form
from pruning.errors import UserError

RELEASE_FOLDER = "flores200_dataset"
"""Name of the folder the FLORES-200 release unpacks to."""

KNOWN_SPLITS = ("dev", "devtest")


class FloresError(UserError):
    """A FLORES directory, split, language or file is missing or malformed."""


class FloresDir:
    """A FLORES-200 style directory.

    >>> flores = FloresDir("flores200_dataset")       # doctest: +SKIP
    >>> flores.languages("devtest")[:2]                # doctest: +SKIP
    ['ace_Arab', 'ace_Latn']
    >>> flores.pairs(src="fra_Latn", tgt="eng_Latn", split="dev")[0]  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.root = _find_root(Path(path))
        self._files: dict[str, dict[str, Path]] = {}
        self._num_lines: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"FloresDir({str(self.root)!r})"

    # ---- listing ------------------------------------------------------------------------------

    def splits(self) -> list[str]:
        """The splits present (folders holding at least one ``{lang}.{split}`` file), sorted."""
        return _splits_in(self.root)

    def languages(self, split: str) -> list[str]:
        """The language codes that have a file in ``split``, sorted."""
        return sorted(self._split_files(split))

    def path(self, lang: str, split: str) -> Path:
        """The file of ``lang`` in ``split`` (checked to exist)."""
        files = self._split_files(split)
        if lang not in files:
            raise FloresError(f"language {lang!r} has no file {lang}.{split} in {self.root / split}; {_list_codes(sorted(files), lang)}")
        return files[lang]

    # ---- reading ------------------------------------------------------------------------------

    def num_lines(self, split: str) -> int:
        """The number of lines of every file of ``split`` (after checking they agree)."""
        if split not in self._num_lines:
            self._num_lines[split] = self._check_aligned(split)
        return self._num_lines[split]

    def read(self, lang: str, split: str) -> list[str]:
        """The sentences of ``lang`` in ``split``, one per line, without line endings."""
        path = self.path(lang, split)
        self.num_lines(split)
        return _read_lines(path)

    def pairs(self, *, src: str, tgt: str, split: str) -> list[tuple[str, str]]:
        """``(source sentence, target sentence)`` for every line of ``split``."""
        return list(zip(self.read(src, split), self.read(tgt, split), strict=True))

    # ---- internals ----------------------------------------------------------------------------

    def _split_files(self, split: str) -> dict[str, Path]:
        if split not in self._files:
            folder = self.root / split
            if not folder.is_dir() or split not in self.splits():
                present = self.splits()
                raise FloresError(f"FLORES split {split!r} not found in {self.root}: valid splits here: {', '.join(present) if present else 'none'}")
            self._files[split] = _scan_split(folder, split)
        return self._files[split]

    def _check_aligned(self, split: str) -> int:
        counts = {lang: _count_lines(path) for lang, path in self._split_files(split).items()}
        by_count = collections.Counter(counts.values())
        if len(by_count) == 1:
            return next(iter(by_count))
        usual, usual_n = by_count.most_common(1)[0]
        odd = sorted((lang for lang, n in counts.items() if n != usual), key=lambda lang: (counts[lang], lang))
        shown = ", ".join(f"{lang}.{split} has {counts[lang]}" for lang in odd[:5])
        more = f" (and {len(odd) - 5} more files)" if len(odd) > 5 else ""
        raise FloresError(f"FLORES split {split!r} in {self.root / split} is not line-aligned: {usual_n} files have {usual} lines, but {shown}{more}")


def _find_root(path: Path) -> Path:
    if not path.exists():
        raise FloresError(f"FLORES directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise FloresError(f"FLORES directory {str(path)!r} is a file, not a directory")
    if _splits_in(path):
        return path
    release = path / RELEASE_FOLDER
    if release.is_dir() and _splits_in(release):
        return release
    raise FloresError(
        f"{str(path)!r} is not a FLORES directory: expected split folders {'/'.join(KNOWN_SPLITS)} "
        f"holding files named '{{lang}}.{{split}}' (e.g. dev/fra_Latn.dev), in it or in "
        f"{str(path / RELEASE_FOLDER)!r}"
    )


def _splits_in(root: Path) -> list[str]:
    found = []
    for child in sorted(root.iterdir()):
        if child.is_dir() and any(f.suffix == "." + child.name and f.is_file() for f in child.iterdir()):
            found.append(child.name)
    return found


def _scan_split(folder: Path, split: str) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix != "." + split or not path.is_file():
            continue
        if not is_code_form(path.stem):
            raise FloresError(f"FLORES file {path} is not named '{{lang}}.{split}' with an NLLB code of the form 'xxx_Xxxx' (got {path.stem!r})")
        files[path.stem] = path
    return files


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise FloresError(f"FLORES file {path} is not valid UTF-8 (line {line}, byte {err.start})") from err


def _read_lines(path: Path) -> list[str]:
    text = _read_text(path)
    if not text:
        return []
    if text.endswith("\n"):
        text = text[:-1]
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def _count_lines(path: Path) -> int:
    return len(_read_lines(path))


def _list_codes(codes: list[str], wanted: str) -> str:
    if not codes:
        return "this split holds no language files"
    close = difflib.get_close_matches(wanted, codes, n=3, cutoff=0.6)
    close += [c for c in codes if c[:3] == wanted[:3] and c not in close]
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return f"{hint}valid codes ({len(codes)}): {', '.join(codes)}"
