"""Where the image paths of a conversation file or dataset point."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .conversation import RecordError


@dataclass(frozen=True)
class ImagePaths:
    """Relative paths are relative to `image_folder` (--image_folder) if given, else to the data's own folder,
    else to that folder's `images/`; the first that exists is used. Entries other than paths (a dataset's
    embedded images) pass as they are."""

    folder: Path  # the file's folder, or the dataset's
    image_folder: Path | None = None

    def __call__(self, entry: Any) -> Any:
        if not isinstance(entry, str):
            return entry
        path = Path(entry)
        if path.is_absolute():
            candidates = [path]
        elif self.image_folder is not None:
            candidates = [self.image_folder / path]
        else:
            candidates = [self.folder / path, self.folder / "images" / path]
        for candidate in candidates:
            if candidate.is_file():
                return str(candidate)
        raise RecordError(f"image {entry} does not exist (looked for {' and '.join(map(str, candidates))})")
