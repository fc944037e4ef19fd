"""Task-independent samples and where they come from: the hub or a local copy of a task's dataset.

Every task turns its rows into `Sample`s: an id, an optional system message, conversation turns (each with
its own images, the user's text, and the assistant's answer) and the references the metric compares
against. `Sample.user_message` writes a turn's message the recipe's way: the turn's own image tags, numbered
from 1 and concatenated, a newline, the text — or, for a turn whose text already holds its tags in place
(`Turn.tags_in_text`, an image placeholder inside the text of a custom dataset), the text as it is. Images
stay unopened (paths, bytes or PIL images) until a data-loader worker reads them with `open_image`, which
names the sample and the file when one cannot be read. Custom conversation files and datasets (generic,
LLaVA, chat messages) are read by `common/formats/`.

Where the recipe draws at random (DocVQA's accepted answer, the_cauldron's question/answer pair), the draw
is a function of (seed, epoch, row index): a fresh draw every epoch, the same after a resume. The Trainer
tells the dataset the epoch through `common.trainer.DrawEpochCallback`.

The task scripts import this module before their flags are parsed, so it loads no library when imported:
`datasets` and PIL are imported where rows are read and images opened (CONTRIBUTING.md, Commands).
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    import datasets
    from PIL import Image


def image_tags(count: int) -> str:
    """`<|image_1|><|image_2|>...`: a turn's tags, numbered from 1 and concatenated, as the recipe writes them."""
    return "".join(f"<|image_{number}|>" for number in range(1, count + 1))


@dataclass
class Turn:
    user: str
    assistant: str
    images: list[Any] = field(default_factory=list)  # PIL images, paths, or {"bytes"/"path"} dicts
    tags_in_text: bool = False  # `user` holds this turn's <|image_k|> tags where its images go


@dataclass
class Sample:
    """`bare_text_turns`: a turn without images is its text alone (the recipe's the_cauldron scripts) rather
    than the newline-then-text of `phi3v_dataset.py` (the generic format). `system`: Phi-3.5's system
    message, before the first user turn and never learnt (None: none)."""

    id: str
    turns: list[Turn]
    references: list[str] = field(default_factory=list)  # defaults to the last answer
    bare_text_turns: bool = False
    system: str | None = None

    def __post_init__(self):
        if not self.turns:
            raise UserError(f"sample {self.id}: no conversation turns")
        if not self.references:
            self.references = [self.turns[-1].assistant]

    @property
    def images(self) -> list[Any]:
        return [image for turn in self.turns for image in turn.images]

    def user_message(self, turn: Turn) -> str:
        if turn.tags_in_text or (not turn.images and self.bare_text_turns):
            return turn.user
        return f"{image_tags(len(turn.images))}\n{turn.user}"


def open_image(source: Any, sample_id: str, base_dir: Path | None = None) -> Image.Image:
    """A fully decoded PIL image from any stored form; a UserError names the sample and file otherwise."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source
    path = None
    try:
        if isinstance(source, dict) and source.get("bytes") is not None:
            image = Image.open(io.BytesIO(source["bytes"]))
        else:
            path = Path(source["path"] if isinstance(source, dict) else source)
            if base_dir is not None and not path.is_absolute():
                path = base_dir / path
            image = Image.open(path)
        image.load()
        return image
    except (OSError, TypeError, KeyError) as error:
        raise UserError(f"sample {sample_id}: cannot read image {path or '<embedded bytes>'}: {error}") from error


# to_sample(row, row index, draws): the row's Sample; `draws` is the row's random source for this epoch.
ToSample = Callable[[Any, int, random.Random], Sample]


class SampleDataset:
    """Rows of any indexable source turned into `Sample`s with fully loaded images, lazily per item: a map-style
    dataset (`__getitem__`, `__len__`) for torch's DataLoader and the Trainer.

    `seed` and the epoch (`set_epoch`) make each row's random draws: `random.Random` seeded with
    (seed, epoch, row index), so they depend on nothing else (data-loader workers, order, resumes).
    `text_only_rows`: whether some row has no image, where the loader knows it of rows kept on disk (in-memory
    `Sample` rows are looked at; hub task rows all have images).
    """

    def __init__(self, rows: Sequence, to_sample: ToSample, base_dir: Path | None = None, seed: int = 0,
                 row_indices: Sequence[int] | None = None, text_only_rows: bool = False):
        self.rows = rows
        self.to_sample = to_sample
        self.base_dir = base_dir
        self.seed = seed
        self.epoch = 0
        self.row_indices = list(row_indices) if row_indices is not None else None
        self.text_only_rows = text_only_rows

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        """Called by accelerate's data loader and by `common.trainer.DrawEpochCallback` before each epoch's workers start."""
        self.epoch = epoch

    def draws(self, row_index: int) -> random.Random:
        return random.Random(f"{self.seed}-{self.epoch}-{row_index}")

    def __getitem__(self, index: int) -> Sample:
        row_index = self.row_indices[index] if self.row_indices is not None else index
        sample = self.to_sample(self.rows[index], row_index, self.draws(row_index))
        for turn in sample.turns:
            turn.images = [open_image(image, sample.id, self.base_dir) for image in turn.images]
        return sample

    def has_text_only_samples(self) -> bool:
        """Whether some sample has no image (custom conversations); the recipe's hub tasks all have images."""
        if isinstance(self.rows, list) and all(isinstance(row, Sample) for row in self.rows):
            return any(not sample.images for sample in self.rows)
        return self.text_only_rows

    def subset(self, indices: Sequence[int]) -> SampleDataset:
        """The rows at `indices`; samples keep the ids (and draws) of their original positions."""
        import datasets

        indices = list(indices)
        rows = self.rows.select(indices) if isinstance(self.rows, datasets.Dataset) else [self.rows[i] for i in indices]
        original = [self.row_indices[i] for i in indices] if self.row_indices is not None else indices
        subset = SampleDataset(rows, self.to_sample, self.base_dir, self.seed, original, self.text_only_rows)
        subset.epoch = self.epoch
        return subset


# ---- hub datasets and their local copies -------------------------------------------------------------

_FILE_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
THE_CAULDRON = "HuggingFaceM4/the_cauldron"  # hateful memes, NLVR2 and DocVQA --full_train


def load_split(hub_id: str, subset: str | None, split: str, dataset_path: str | None = None) -> datasets.Dataset:
    """One split of a dataset: from the hub by name, or with `dataset_path` from local disk in the same schema.

    Local forms: a `save_to_disk` folder (DatasetDict or Dataset), a parquet/jsonl file (the train split), or
    a folder of `{split}*.parquet|jsonl` files.
    """
    import datasets

    if dataset_path is None:
        return datasets.load_dataset(hub_id, subset, split=split)
    path = Path(dataset_path)
    if (path / "dataset_dict.json").exists():
        splits = datasets.load_from_disk(str(path))
        if split not in splits:
            raise UserError(f"{path} has splits {sorted(splits)}, not {split!r}")
        return splits[split]
    if (path / "state.json").exists():
        return _only_train(datasets.load_from_disk(str(path)), path, split)
    if path.is_file():
        return _only_train(_load_files([path]), path, split)
    files = sorted(f for f in path.iterdir() if f.name.startswith(split) and f.suffix in _FILE_FORMATS)
    if not files:
        raise UserError(f"{path}: no {split}*.parquet or {split}*.jsonl files (and not a save_to_disk folder)")
    return _load_files(files)


def _only_train(dataset: datasets.Dataset, path: Path, split: str) -> datasets.Dataset:
    if split != "train":
        raise UserError(f"{path} holds a single split, used as 'train'; the task also needs {split!r}")
    return dataset


def _load_files(files: list[Path]) -> datasets.Dataset:
    import datasets

    formats = {_FILE_FORMATS.get(f.suffix) for f in files}
    if len(formats) != 1 or None in formats:
        raise UserError(f"expected parquet or jsonl files of one kind, got {[f.name for f in files]}")
    return datasets.load_dataset(formats.pop(), data_files=[str(f) for f in files], split="train")


def base_dir_of(dataset_path: str | None) -> Path | None:
    """Relative image paths in local jsonl/parquet files are relative to the file's folder."""
    if dataset_path is None:
        return None
    path = Path(dataset_path)
    return path.parent if path.is_file() else path


# ---- the_cauldron subsets (hateful memes, NLVR2, DocVQA --full_train) ------------------------------------


def load_cauldron_splits(subset: str, dataset_path: str | None, eval_size: int, train_sample: ToSample,
                         eval_sample: ToSample) -> tuple[SampleDataset, SampleDataset]:
    """(train, eval) of a HuggingFaceM4/the_cauldron subset, which has only a train split: its first
    `eval_size` rows are held out for evaluation (`train[:eval_size]`), the rest train, as the recipe.
    Rows: `images` (list) and `texts` ([{"user", "assistant"}, ...]). Its samples draw nothing at random
    (the recipe's hateful memes and NLVR2 scripts take every row as it is)."""
    rows = load_split(THE_CAULDRON, subset, "train", dataset_path)
    held_out = min(eval_size, len(rows))
    base_dir = base_dir_of(dataset_path)
    # lists, not ranges: datasets rejects an empty range that starts at the end
    train_indices = list(range(held_out, len(rows)))
    return (
        SampleDataset(rows.select(train_indices), train_sample, base_dir, row_indices=train_indices),
        SampleDataset(rows.select(list(range(held_out))), eval_sample, base_dir),
    )


def first_images(row, sample_id: str, count: int, exact: bool = False) -> list[Any]:
    """The row's first `count` images (`exact`: the row must hold exactly `count`, as NLVR2's pair); a
    UserError names the sample otherwise."""
    images = list(row["images"])
    if len(images) < count or (exact and len(images) != count):
        raise UserError(f"sample {sample_id}: expected {'exactly ' if exact else ''}{count} image(s), found {len(images)}")
    return images[:count]
