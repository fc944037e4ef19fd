"""Where a preference run's pairs come from, each file (or dataset) in whichever of the three formats its first
record is in, as conversations are read (common/formats):

- `--train_file FILE` (and `--eval_file FILE`), or `--data_dir DIR` (config.EVALUATION_RULE says which files evaluate);
- `--dataset_path`: a save_to_disk folder or parquet files whose rows are in one of the formats, images as
  paths or embedded (they are checked when the data loads without being decoded).
Without evaluation pairs the first `--eval_size` training pairs are held out to evaluate.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import datasets

from ..config import DataConfig
from ..data import SampleDataset
from ..errors import UserError
from ..formats.conversation import ConversationFormat, RecordError
from ..formats.files import read_file
from ..formats.images import ImagePaths
from ..formats.sources import data_files_of, fresh_copy, hold_out
from ..formats.tables import dataset_parts
from . import rlaif, sharegpt, trl
from .pairs import PreferencePair

FORMATS = tuple(ConversationFormat(module.NAME, module.SHAPE, module.matches, module.read)
                for module in (trl, sharegpt, rlaif))


def load_preference_pairs(data: DataConfig) -> tuple[SampleDataset, SampleDataset]:
    """(train, evaluation) datasets of `PreferencePair`s."""
    image_folder = Path(data.image_folder) if data.image_folder else None
    if files := data_files_of(data):
        source, train_files, eval_files = files
    elif data.dataset_path:
        source = f"--dataset_path {data.dataset_path}"
        train, evaluation = _dataset(Path(data.dataset_path), image_folder)
        return (train, evaluation) if evaluation is not None else hold_out(train, data.eval_size, source)
    else:
        raise UserError("preference tuning trains on preference pairs: give --train_file, --data_dir or --dataset_path")
    train = _in_memory(train_files, image_folder)
    return (train, _in_memory(eval_files, image_folder)) if eval_files else hold_out(train, data.eval_size, source)


def read_preference_file(path: Path, image_folder: Path | None = None) -> list[PreferencePair]:
    """Every record of the file as a PreferencePair; a UserError names the file and line of a bad record."""
    return read_file(path, FORMATS, image_folder, "preference pairs")


def _in_memory(files: list[Path], image_folder: Path | None) -> SampleDataset:
    return SampleDataset([pair for path in files for pair in read_preference_file(path, image_folder)], fresh_copy)


@dataclass(frozen=True)
class PairRows:
    """A dataset row -> its PreferencePair (the `to_sample` of a SampleDataset; picklable for data-loader workers)."""

    source: str  # names the dataset and part in errors
    part: str  # "train" or "evaluation": ids of rows without one are `{part}-{row}`
    found: ConversationFormat
    resolve: ImagePaths

    def __call__(self, row: dict, index: int, draws: random.Random) -> PreferencePair:
        try:
            return self.found.read(dict(row), f"{self.part}-{index}", self.resolve)
        except RecordError as error:
            raise UserError(f"{self.source} row {index}: {error} (read as {self.found.name}, the format of its first "
                            "row)") from error


def _dataset(path: Path, image_folder: Path | None) -> tuple[SampleDataset, SampleDataset | None]:
    resolve = ImagePaths(path if path.is_dir() else path.parent, image_folder)
    parts = {}
    for part, rows in dataset_parts(path).items():
        if rows is None:
            parts[part] = None
            continue
        rows = rows.cast(_undecoded(rows.features))  # images stay encoded: a data-loader worker opens them
        if len(rows) == 0:
            raise UserError(f"--dataset_path {path} ({part}): no rows")
        found = next((candidate for candidate in FORMATS if candidate.matches(rows[0])), None)
        if found is None:
            raise UserError(f"--dataset_path {path} ({part}): unknown format, columns {sorted(rows.column_names)}; "
                            f"expected one of {'; '.join(f'{c.name}: {c.shape}' for c in FORMATS)}")
        reader = PairRows(f"--dataset_path {path} ({part})", part, found, resolve)
        pairs = [reader(row, index, random.Random()) for index, row in enumerate(rows)]  # every row checked now
        parts[part] = SampleDataset(rows, reader, text_only_rows=any(not pair.images for pair in pairs))
    return parts["train"], parts["evaluation"]


def _undecoded(features: datasets.Features) -> datasets.Features:
    """The features with every image column (or list of images) read as its stored bytes or path."""
    undecoded = {}
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            feature = datasets.Image(decode=False)
        elif isinstance(getattr(feature, "feature", None), datasets.Image):
            feature = datasets.List(datasets.Image(decode=False))
        undecoded[name] = feature
    return datasets.Features(undecoded)
