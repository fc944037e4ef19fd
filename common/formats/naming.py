"""Which files are data, and which of them (or of a dataset's splits) evaluate, by name: the one rule that the code,
--help, the errors and the README state (`EVALUATION_RULE`).

The words of a name are its runs of letters and digits (`docs_val.jsonl`: docs, val, jsonl). A name evaluates when
one of its words is `val`, `valid` or `validation` (digits may follow: `val2`); failing such names, `eval` or
`evaluation`; failing those, `test` or `testing`. Word matches, not substrings: `x_values.jsonl` is not a validation
file. A word that only begins like one (`valset`, `values`, `evalset`, `tests`, `dev`) is reported, as it trains.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ..config import EVALUATION_RULE

logger = logging.getLogger(__name__)

_EVALUATION_WORDS = (r"val|valid|validation", r"eval|evaluation", r"test|testing")  # in order of preference
_PATTERNS = [re.compile(rf"^(?:{words})\d*$") for words in _EVALUATION_WORDS]
_LOOK_ALIKE = re.compile(r"^(?:val|eval|test|dev)")


def data_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The folder's files with these suffixes, sorted; hidden files (a tool's bookkeeping, such as
    convert_ucf101.py's `.convert_ucf101.frames.jsonl`) are not data."""
    return sorted(path for path in folder.iterdir()
                  if path.is_file() and path.suffix in suffixes and not path.name.startswith("."))


def _words(name: str) -> list[str]:
    return [word for word in re.split(r"[^a-z0-9]+", name.lower()) if word]


def evaluation_rank(name: str) -> int | None:
    """0 for a validation name, 1 for an evaluation name, 2 for a test name, None for a training name."""
    return min((rank for rank, pattern in enumerate(_PATTERNS) for word in _words(name) if pattern.match(word)),
               default=None)


def looks_like_evaluation(name: str) -> bool:
    """A training name with a word that begins like an evaluation word (`valset`, `values`, `dev`)."""
    return evaluation_rank(name) is None and any(_LOOK_ALIKE.match(word) for word in _words(name))


def split_by_name(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(training files, evaluation files) by EVALUATION_RULE: the evaluation files are those of the most preferred
    evaluation name present (validation files when there are some: test files then neither train nor evaluate).
    Training files whose name only looks like an evaluation name are reported (a warning naming the rule)."""
    ranks = {path: evaluation_rank(path.stem) for path in files}
    best = min((rank for rank in ranks.values() if rank is not None), default=None)
    train = [p for p in files if ranks[p] is None]
    for path in train:
        if looks_like_evaluation(path.stem):
            logger.warning("%s trains: its name looks like an evaluation file's but is not one (%s); rename it, "
                           "e.g. to %s_val%s, if it should evaluate", path, EVALUATION_RULE, path.stem, path.suffix)
    return train, [p for p in files if best is not None and ranks[p] == best]
