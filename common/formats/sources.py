"""Where a run's custom conversations come from, and which of them evaluate.

- `--data_dir DIR`: every `.json` / `.jsonl` file directly in DIR, each in its own format; which of them evaluate
  is naming.py's EVALUATION_RULE (`docs_val.jsonl`, `docs-validation2.json`; not `docs_valset.jsonl`).
- `--train_file FILE` (and `--eval_file FILE`): single files, any format.
- `--dataset_path` of a chat-messages dataset (tables.py).
Without evaluation data the first `--eval_size` training samples are held out to evaluate (as the
the_cauldron tasks do).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from ..config import DataConfig
from ..data import Sample, SampleDataset
from ..errors import UserError
from .files import read_conversation_file
from .naming import EVALUATION_RULE, data_files, split_by_name
from .tables import is_messages_dataset, load_messages_dataset

CONVERSATION_SUFFIXES = (".json", ".jsonl")


def load_conversations(data: DataConfig) -> tuple[SampleDataset, SampleDataset] | None:
    """(train, evaluation) of custom conversations; None when the data is a task's own (the hub, or a
    --dataset_path copy in the task's schema)."""
    image_folder = Path(data.image_folder) if data.image_folder else None
    if files := data_files_of(data):
        source, train_files, eval_files = files
    elif data.dataset_path and is_messages_dataset(Path(data.dataset_path)):
        source = f"--dataset_path {data.dataset_path}"
        train, evaluation = load_messages_dataset(Path(data.dataset_path), image_folder)
        return (train, evaluation) if evaluation is not None else hold_out(train, data.eval_size, source)
    else:
        return None
    train = _in_memory(train_files, image_folder)
    if eval_files:
        return train, _in_memory(eval_files, image_folder)
    return hold_out(train, data.eval_size, source)


def data_files_of(data: DataConfig) -> tuple[str, list[Path], list[Path]] | None:
    """(the flag that named them, training files, evaluation files) of --train_file/--eval_file or --data_dir;
    None for other data."""
    if data.train_file:
        return f"--train_file {data.train_file}", [Path(data.train_file)], [Path(data.eval_file)] if data.eval_file else []
    if data.data_dir:
        return f"--data_dir {data.data_dir}", *data_dir_files(Path(data.data_dir))
    return None


def data_dir_files(root: Path) -> tuple[list[Path], list[Path]]:
    files = data_files(root, CONVERSATION_SUFFIXES)
    if not files:
        raise UserError(f"--data_dir {root}: no .json or .jsonl files")
    train, evaluation = split_by_name(files)
    if not train:
        raise UserError(f"--data_dir {root}: only evaluation files ({', '.join(f.name for f in evaluation)}); "
                        f"{EVALUATION_RULE}")
    return train, evaluation


def hold_out(train: SampleDataset, eval_size: int, source: str) -> tuple[SampleDataset, SampleDataset]:
    """The first `eval_size` samples evaluate, the others train."""
    if eval_size >= len(train):
        raise UserError(
            f"{source} has no evaluation file or split, and --eval_size {eval_size} would hold out all "
            f"{len(train)} samples for evaluation; lower --eval_size or add an evaluation file, e.g. NAME_val.jsonl "
            f"({EVALUATION_RULE})"
        )
    return train.subset(range(eval_size, len(train))), train.subset(range(eval_size))


def _in_memory(files: list[Path], image_folder: Path | None) -> SampleDataset:
    return SampleDataset([sample for path in files for sample in read_conversation_file(path, image_folder)],
                         fresh_copy)


def fresh_copy(sample: Sample, index: int, draws: random.Random) -> Sample:
    """A stored sample as a dataset item (`SampleDataset`'s to_sample for samples read from files)."""
    # New turn objects: opening the images must leave the stored (path-holding) sample as it is.
    turns = [dataclasses.replace(turn, images=list(turn.images)) for turn in sample.turns]
    return dataclasses.replace(sample, turns=turns, references=list(sample.references))
