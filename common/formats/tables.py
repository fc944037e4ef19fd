"""Chat-messages datasets: a `save_to_disk` folder or parquet files with a `messages` column and, for
images, an `images` column (paths, or embedded images: an `Image` feature).

Rows stay on disk and become `Sample`s when read; every row is checked when the dataset is loaded (its
messages, and its image paths or the number of its embedded images, which are not decoded for that).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..data import Sample, SampleDataset
from ..errors import UserError
from . import chat
from .conversation import RecordError
from .images import ImagePaths
from .naming import EVALUATION_RULE, data_files, evaluation_rank, split_by_name


def is_messages_dataset(path: Path) -> bool:
    """Whether a --dataset_path copy has a `messages` column (read from its metadata, nothing loaded)."""
    try:
        if (path / "dataset_dict.json").is_file():
            first = json.loads((path / "dataset_dict.json").read_text())["splits"][0]
            columns = json.loads((path / first / "dataset_info.json").read_text())["features"]
        elif (path / "state.json").is_file():
            columns = json.loads((path / "dataset_info.json").read_text())["features"]
        else:
            files = [path] if path.is_file() else data_files(path, (".parquet",))
            columns = pq.read_schema(files[0]).names if files and files[0].suffix == ".parquet" else []
    except (OSError, KeyError, IndexError, json.JSONDecodeError, pa.ArrowInvalid):
        return False  # not a readable copy of this kind: the task's own loader says what is wrong
    return "messages" in columns


def load_messages_dataset(path: Path, image_folder: Path | None) -> tuple[SampleDataset, SampleDataset | None]:
    """(train, evaluation or None) of a chat-messages dataset, split as `dataset_parts` says."""
    resolve = ImagePaths(path if path.is_dir() else path.parent, image_folder)
    return tuple(
        None if rows is None else _checked(rows, ChatRows(f"{path} ({part})", part, resolve))
        for part, rows in dataset_parts(path).items()
    )


def dataset_parts(path: Path) -> dict[str, datasets.Dataset | None]:
    """{"train": rows, "evaluation": rows or None} of a --dataset_path copy: a DatasetDict's `train` split and its
    evaluation split (named as by naming.EVALUATION_RULE); a folder's parquet files split by name as --data_dir's;
    a single Dataset or file trains, whatever its name."""
    if (path / "dataset_dict.json").is_file():
        splits = datasets.load_from_disk(str(path))
        if "train" not in splits:
            raise UserError(f"--dataset_path {path} has splits {sorted(splits)}; a 'train' split is needed")
        ranked = sorted((rank, name) for name in splits if (rank := evaluation_rank(name)) is not None)
        parts = {"train": splits["train"], "evaluation": splits[ranked[0][1]] if ranked else None}
    elif (path / "state.json").is_file():
        parts = {"train": datasets.load_from_disk(str(path)), "evaluation": None}
    else:
        # a file given by itself trains, whatever its name (evaluation is then held out: --eval_size)
        train_files, eval_files = ([path], []) if path.is_file() else split_by_name(data_files(path, (".parquet",)))
        if not train_files:
            raise UserError(f"--dataset_path {path}: no training parquet file among "
                            f"{[f.name for f in eval_files]} ({EVALUATION_RULE})")
        parts = {"train": _parquet(train_files), "evaluation": _parquet(eval_files) if eval_files else None}
    return parts


def _parquet(files: list[Path]) -> datasets.Dataset:
    return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")


@dataclass(frozen=True)
class ChatRows:
    """A dataset row -> its Sample (the `to_sample` of a SampleDataset; picklable for data-loader workers)."""

    source: str  # names the dataset and part in errors
    part: str  # "train" or "evaluation": ids of rows without an `id` are `{part}-{row}`
    resolve: ImagePaths

    def __call__(self, row: dict, index: int, draws: random.Random) -> Sample:
        try:
            return chat.read(dict(row), f"{self.part}-{index}", self.resolve)
        except RecordError as error:
            raise UserError(f"{self.source} row {index}: {error}") from error


def _checked(rows: datasets.Dataset, reader: ChatRows) -> SampleDataset:
    """The rows as a SampleDataset, once every row has been read without decoding its images."""
    images = _stored_images(rows)
    texts = rows.select_columns([column for column in ("id", "messages") if column in rows.column_names])
    for index, row in enumerate(texts):
        reader({**row, "images": images[index]}, index, random.Random())
    return SampleDataset(rows, reader, text_only_rows=any(not entries for entries in images))


def _stored_images(rows: datasets.Dataset) -> list[list]:
    """Per row: its image paths, or a None per embedded image (counted from the column, not decoded)."""
    if "images" not in rows.column_names:
        return [[] for _ in range(len(rows))]
    column = rows.with_format("arrow")["images"]
    if pa.types.is_list(column.type) and pa.types.is_struct(column.type.value_type):
        return [[None] * count for count in pc.list_value_length(column).fill_null(0).to_pylist()]
    return [list(entries or []) for entries in column.to_pylist()]
