"""A conversation file, `.json` or `.jsonl`, in whichever of the three formats its first record is in (and the
reading of any file of records in one of several formats: common/preference reads preference pairs with it)."""

from __future__ import annotations

from pathlib import Path

from ..data import Sample
from ..errors import UserError
from . import chat, generic, llava
from .conversation import ConversationFormat, RecordError
from .images import ImagePaths
from .records import read_records

FORMATS = tuple(ConversationFormat(module.NAME, module.SHAPE, module.matches, module.read) for module in (generic, llava, chat))


def read_conversation_file(path: Path, image_folder: Path | None = None, answered: bool = True) -> list[Sample]:
    """Every record of the file as a Sample, images resolved (`ImagePaths`) and checked to exist; a UserError
    names the file and line of the first bad record. `answered=False`: questions to predict, whose last user
    message may lack its answer."""
    return read_file(path, FORMATS, image_folder, "samples", answered=answered)


def read_file(path: Path, formats: tuple[ConversationFormat, ...], image_folder: Path | None, items: str,
              **options) -> list:
    """Every record of the file read by whichever of `formats` its first record is in (`options` go to its
    `read`); a UserError names the file and line of the first bad record. `items`: what the records are, for
    the error on an empty file."""
    resolve = ImagePaths(path.parent, image_folder)
    read, found = [], None
    for line, record in read_records(path):
        found = found or next((candidate for candidate in formats if candidate.matches(record)), None)
        if found is None:
            expected = "; ".join(f"{candidate.name}: {candidate.shape}" for candidate in formats)
            raise UserError(f"{path}:{line}: unknown format, a record with keys {sorted(record)}; expected one of "
                            f"{expected}")
        try:
            read.append(found.read(record, f"{path.stem}-{line}", resolve, **options))
        except RecordError as error:
            raise UserError(f"{path}:{line}: {error} (read as {found.name}, the format of the file's first record)") from error
    if not read:
        raise UserError(f"{path}: no {items}")
    return read
