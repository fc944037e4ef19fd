"""Answers from a finetuned model (predict.py): what a model path holds, loading it, answering prompts.

A model path is a run's `--output_dir` (full weights, or a LoRA/QLoRA adapter whose base model its
adapter_config.json names), one of its `checkpoint-N/` folders, a `merged/` folder, an official checkpoint
folder or a hub id. Answers come from the evaluation's own code path (`common.evaluation.generate_predictions`:
the evaluation collator's prompts, greedy decoding, sharded over the processes and gathered in input order)
with the model loaded as the run's evaluation after training loads it (the adapter on its unmerged base, in
the precision the flags resolve to), so on an evaluation set the answers are the run's eval_after.json.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoProcessor

from . import phi3v  # noqa: F401  (registers phi3_v with the Auto classes used here)
from .checkpoints import MODEL_CONFIG, checkpoint_folders
from .data import Sample, SampleDataset, Turn
from .distributed import Distributed
from .errors import UserError
from .evaluation import generate_predictions
from .formats import read_conversation_file
from .formats.sources import fresh_copy
from .metrics import Metric
from .model_loading import load_model
from .precision import Precision

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


@dataclass(frozen=True)
class ModelSource:
    """Where each part of a model comes from."""

    weights: str  # folder or hub id of the full model, or of the base under an adapter
    adapter: str | None  # LoRA adapter folder loaded on top of `weights`
    processor: str  # folder or hub id of the processor (a run saves its own, with its num_crops)

    def describe(self) -> str:
        return f"LoRA adapter {self.adapter} on {self.weights}" if self.adapter else self.weights


def _has_processor(folder: Path) -> bool:
    return any((folder / name).is_file() for name in PROCESSOR_FILES)


def locate_model(path: str, base_model: str | None = None, flag: str = "--model") -> ModelSource:
    """What `path` holds; a UserError names a folder that holds no model, or an adapter's base that is not here.
    `base_model` replaces the base an adapter's config names; `flag` is the one that gave `path`."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        if folder.exists() or path.startswith((".", "/", "~")) or path.endswith("/") or path.count("/") > 1:
            raise UserError(f"{flag} {path}: no such folder; give a run's output folder, a checkpoint-N folder, "
                            "a merged folder or a hub model id")
        return ModelSource(path, None, path)  # a hub id
    if (folder / ADAPTER_CONFIG).is_file():
        base = base_model or _adapter_base(folder)
        return ModelSource(base, str(folder), str(folder) if _has_processor(folder) else base)
    if (folder / MODEL_CONFIG).is_file():
        return ModelSource(str(folder), None, str(folder))
    checkpoints = checkpoint_folders(folder)
    hint = (f"; it holds checkpoints (the run ended before its final save?): give one, e.g. {checkpoints[-1]}"
            if checkpoints else "")
    raise UserError(f"{flag} {path} holds no model ({MODEL_CONFIG} or {ADAPTER_CONFIG}){hint}")


def _adapter_base(folder: Path) -> str:
    try:
        base = json.loads((folder / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{folder / ADAPTER_CONFIG} names no base model ({error!r}); give it with --base_model") \
            from error
    if not base:
        raise UserError(f"{folder / ADAPTER_CONFIG} names no base model; give it with --base_model")
    return base


def _loading(what: str, name: str, error: OSError) -> UserError:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UserError(f"cannot load the {what} {name} ({first_line})")


def load_for_inference(source: ModelSource, precision: Precision, device: torch.device, num_crops: int | None):
    """(processor, model): the processor with its saved num_crops (or `num_crops`), the model in eval mode."""
    options = {} if num_crops is None else {"num_crops": num_crops}
    try:
        processor = AutoProcessor.from_pretrained(source.processor, **options)
    except OSError as error:
        raise _loading("processor of", source.processor, error) from error
    try:
        model = load_model(source.weights, precision, device)
    except OSError as error:
        hint = "; give the base model's folder with --base_model" if source.adapter else ""
        what = f"base model of the adapter {source.adapter}:" if source.adapter else "model"
        raise UserError(f"{_loading(what, source.weights, error)}{hint}") from error
    if source.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, source.adapter)  # unmerged, as the run evaluates it
    return processor, model.eval()


def prompt_dataset(prompt: str, images: list[str]) -> SampleDataset:
    """One question about `images` (in order: <|image_1|>, <|image_2|>, ...)."""
    missing = [image for image in images if not Path(image).is_file()]
    if missing:
        raise UserError("--image: no such file: " + ", ".join(missing))
    sample = Sample("prompt", [Turn(prompt, "", [str(Path(image).resolve()) for image in images])])
    return SampleDataset([sample], lambda stored, index, draws: stored)  # read once: its images may be opened in place


def file_dataset(path: str, image_folder: str | None = None) -> SampleDataset:
    """The samples of a conversation file in any of the training formats (common/formats), each last question
    with or without its answer. Relative image paths: under `image_folder` if given, else the file's folder,
    else its `images/`, as for training data."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--data_file {path}: no such file")
    samples = read_conversation_file(file, Path(image_folder) if image_folder else None, answered=False)
    return SampleDataset(samples, fresh_copy)


@dataclass(frozen=True)
class Answer:
    id: str
    prediction: str
    reference: str | None  # the sample's last answer, when the file gives one


def answer(model, processor, dataset: SampleDataset, batch_size: int, max_new_tokens: int, show_progress: bool,
           distributed: Distributed, precision: Precision) -> list[Answer]:
    """Every rank answers its shard; every rank gets all answers, in input order."""
    with precision.autocast(distributed.device):
        records = generate_predictions(model, processor, dataset, batch_size, max_new_tokens,
                                       show_progress=show_progress, distributed=distributed)
    return [Answer(r["id"], r["prediction"], r["references"][0] or None) for r in records]


def score(answers: list[Answer], metric: Metric) -> float | None:
    """The metric over the answers that have a reference (None without any), as the run's evaluation scores."""
    scored = [a for a in answers if a.reference is not None]
    if not scored:
        return None
    return metric.report([a.id for a in scored], [a.prediction for a in scored],
                         [[a.reference] for a in scored])[metric.name]


def write_answers(answers: list[Answer], path: Path) -> None:
    """One line per sample, {"id", "prediction", "reference"}, written whole (a temporary file renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        for item in answers:
            record = {"id": item.id, "prediction": item.prediction, "reference": item.reference}
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
    temporary.replace(path)
