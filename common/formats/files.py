"""A conversation file, `.json` or `.jsonl`, in whichever of the three formats its first record is in."""

from __future__ import annotations

from pathlib import Path

from ..data import Sample
from ..errors import UserError
from . import chat, generic, llava
from .conversation import ConversationFormat, RecordError
from .images import ImagePaths
from .records import read_records

FORMATS = tuple(ConversationFormat(module.NAME, module.SHAPE, module.matches, module.read) for module in (generic, llava, chat))


def detect_format(record: dict) -> ConversationFormat | None:
    return next((candidate for candidate in FORMATS if candidate.matches(record)), None)


def read_conversation_file(path: Path, image_folder: Path | None = None, answered: bool = True) -> list[Sample]:
    """Every record of the file as a Sample, images resolved (`ImagePaths`) and checked to exist; a UserError
    names the file and line of the first bad record. `answered=False`: questions to predict, whose last user
    message may lack its answer."""
    resolve = ImagePaths(path.parent, image_folder)
    samples, found = [], None
    for line, record in read_records(path):
        found = found or detect_format(record)
        if found is None:
            expected = "; ".join(f"{candidate.name}: {candidate.shape}" for candidate in FORMATS)
            raise UserError(f"{path}:{line}: unknown format, a record with keys {sorted(record)}; expected one of "
                            f"{expected}")
        try:
            samples.append(found.read(record, f"{path.stem}-{line}", resolve, answered))
        except RecordError as error:
            raise UserError(f"{path}:{line}: {error} (read as {found.name}, the format of the file's first record)") from error
    if not samples:
        raise UserError(f"{path}: no samples")
    return samples
