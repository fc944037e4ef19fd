"""Which files are data, and which of them (or of a dataset's splits) evaluate, by name: `*_val*` (or
`validation`), else `*_eval*`, else `*_test*`; the others train. Words of a name are its runs of letters
and digits."""

from __future__ import annotations

import re
from pathlib import Path

_EVALUATION_WORDS = (r"val|valid|validation", r"eval|evaluation", r"test|testing")  # in order of preference
_PATTERNS = [re.compile(rf"^(?:{words})\d*$") for words in _EVALUATION_WORDS]


def data_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The folder's files with these suffixes, sorted; hidden files (a tool's bookkeeping, such as
    convert_ucf101.py's `.convert_ucf101.frames.jsonl`) are not data."""
    return sorted(path for path in folder.iterdir()
                  if path.is_file() and path.suffix in suffixes and not path.name.startswith("."))


def evaluation_rank(name: str) -> int | None:
    """0 for a validation name, 1 for an evaluation name, 2 for a test name, None for a training name."""
    words = re.split(r"[^a-z0-9]+", name.lower())
    return min((rank for rank, pattern in enumerate(_PATTERNS) for word in words if pattern.match(word)), default=None)


def split_by_name(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(training files, evaluation files): the evaluation files are those of the most preferred evaluation
    name present (validation files when there are some: test files then neither train nor evaluate)."""
    ranks = {path: evaluation_rank(path.stem) for path in files}
    best = min((rank for rank in ranks.values() if rank is not None), default=None)
    return [p for p in files if ranks[p] is None], [p for p in files if best is not None and ranks[p] == best]
