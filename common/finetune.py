"""One finetuning run, the recipe's way: evaluate, train with the Trainer, save, reload, evaluate again.

A task script supplies a `Task` (its datasets and metric) and the resolved `RunConfig`; everything
else — strategy, precision, DeepSpeed, checkpoints and resume, evaluation, the outputs — happens here.
The process's place in the run comes from `start_distributed`; the few rank-0 writes are explicit.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoProcessor, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from .collators import Phi3VTrainCollator
from .config import (
    RESUME_LATEST,
    DataConfig,
    EvaluationConfig,
    LoraSettings,
    ModelConfig,
    OutputConfig,
    RunConfig,
)
from .data import SampleDataset, load_conversation_splits
from .distributed import Distributed, start_distributed
from .errors import UserError
from .evaluation import evaluate
from .logging_setup import setup_logging
from .metrics import Metric
from .plotting import plot_training_curves
from .precision import Precision
from .strategy import TrainingStrategy, build_model, load_model
from .training_arguments import training_arguments

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """What a script contributes: a name for messages, its metric and its (train, eval) datasets, loaded from
    the run's `DataConfig` and the task's own flags (an instance of `options`, a frozen dataclass whose fields
    are the flags the script adds; None without). A task whose data only comes in the generic format
    (--data_dir) has no loader of its own."""

    name: str
    metric: Metric
    load_datasets: Callable[[DataConfig, Any], tuple[SampleDataset, SampleDataset]] | None = None
    options: type | None = None


def load_datasets(task: Task, data: DataConfig, options: Any = None) -> tuple[SampleDataset, SampleDataset]:
    # --data_dir (the generic format) works for every task
    if data.data_dir:
        train, evaluation = load_conversation_splits(data.data_dir)
    else:
        train, evaluation = _load_task_datasets(task, data, options)
    if data.max_eval_samples is not None:
        evaluation = evaluation.subset(range(min(data.max_eval_samples, len(evaluation))))
    for split, dataset in (("training", train), ("evaluation", evaluation)):
        if len(dataset) == 0:
            raise UserError(f"the {split} set of {task.name} is empty")
        if problems := dataset.stored_problems():
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise UserError(f"bad {split} data:\n  " + "\n  ".join(problems[:10]) + more)
    return train, evaluation


def _load_task_datasets(task: Task, data: DataConfig, options: Any) -> tuple[SampleDataset, SampleDataset]:
    if data.dataset_path:
        return task.load_datasets(data, options)
    try:
        return task.load_datasets(data, options)
    except ConnectionError as error:  # the datasets library's "Couldn't reach ... on the Hub"
        raise UserError(
            f"{task.name}: cannot download the dataset ({error}); download it where the hub is reachable "
            "(datasets' save_to_disk, or the parquet files) and pass that folder with --dataset_path"
        ) from error


def load_processor_and_model(
    model_config: ModelConfig, strategy: TrainingStrategy, lora: LoraSettings, precision: Precision, device
):
    """The processor with the run's num_crops, and the model built for the strategy on its device."""
    try:
        processor = AutoProcessor.from_pretrained(model_config.name_or_path, num_crops=model_config.num_crops)
    except OSError as error:  # not on the hub, or no hub access: transformers' message says which
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"cannot load --model_name_or_path {model_config.name_or_path} ({first_line}); give the folder of a "
            "downloaded checkpoint, or a hub model id with hub access"
        ) from error
    model = build_model(model_config.name_or_path, strategy, lora, precision, device)
    if not strategy.quantize_4bit:  # bitsandbytes already placed the 4-bit model
        model.to(device)
    return processor, model


def make_trainer(model, processor, train_args: TrainingArguments, dataset, max_length: int | None, callbacks=()):
    return Trainer(
        model=model,
        args=train_args,
        data_collator=Phi3VTrainCollator(processor, max_length),
        train_dataset=dataset,
        processing_class=processor,  # saved with the model and in every checkpoint
        callbacks=list(callbacks),
    )


RUN_FILE = "run.json"


def run_identity(task: Task, config: RunConfig) -> dict:
    """What a checkpoint in output_dir must have been made by for an automatic resume to continue it."""
    data_path = config.data.data_dir or config.data.dataset_path
    return {
        "task": task.name,
        "model": config.model.name_or_path,
        "strategy": config.strategy.name,
        "data": str(Path(data_path).resolve()) if data_path else "hub",
        "num_crops": config.model.num_crops,
    }


def resolve_checkpoint(outputs: OutputConfig, identity: dict) -> str | None:
    """An explicit path; else the newest checkpoint-* in output_dir if this same run made it (automatic
    resume); else None. A checkpoint of another run (another task, model, strategy or data) is refused."""
    if outputs.resume_from_checkpoint not in (None, RESUME_LATEST):
        return outputs.resume_from_checkpoint
    newest = get_last_checkpoint(outputs.output_dir) if os.path.isdir(outputs.output_dir) else None
    if newest is None:
        if outputs.resume_from_checkpoint == RESUME_LATEST:
            raise UserError(f"--resume_from_checkpoint: no checkpoint-* folder in {outputs.output_dir}")
        return None
    run_file = Path(outputs.output_dir) / RUN_FILE
    recorded = json.loads(run_file.read_text()) if run_file.exists() else None
    if recorded != identity:
        raise UserError(
            f"{outputs.output_dir} holds {Path(newest).name} of another run ({recorded or 'unknown'}), not of "
            f"this one ({identity}); choose another --output_dir, or continue it with --resume_from_checkpoint {newest}"
        )
    return newest


def _evaluate_and_report(
    model, processor, task: Task, dataset, path: Path, when: str, evaluation: EvaluationConfig,
    distributed: Distributed,
) -> float:
    score = evaluate(model, processor, dataset, task.metric, path, evaluation, distributed)
    logger.info("%s %s finetuning: %.4f (%d samples, %s)", task.metric.name, when, score, len(dataset), path)
    if distributed.is_main:
        print(f"{task.metric.name.upper()} {when} finetuning: {score:.4f}", flush=True)
    return score


def _write_merged(model, processor, output_dir: Path) -> None:
    merged_dir = output_dir / "merged"
    model.merge_and_unload().save_pretrained(merged_dir)
    processor.save_pretrained(merged_dir)
    logger.info("merged standalone checkpoint written to %s", merged_dir)


def _discard_unresumable_outputs(
    output_dir: Path, created_output_dir: bool, written: list[str], distributed: Distributed
) -> None:
    """After a data error (a bad sample only the data loader finds), leave a state to resume from (a
    checkpoint) or nothing of this run's: not a lone eval_before.json."""
    if not distributed.is_main or not output_dir.is_dir() or get_last_checkpoint(str(output_dir)):
        return
    if created_output_dir:
        shutil.rmtree(output_dir, ignore_errors=True)
    for name in written:
        (output_dir / name).unlink(missing_ok=True)


def _record_run(output_dir: Path, identity: dict, distributed: Distributed) -> None:
    if distributed.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RUN_FILE).write_text(json.dumps(identity, indent=1) + "\n")


def run_finetuning(task: Task, config: RunConfig) -> dict[str, float]:
    """Returns {"before": metric, "after": metric} (before is absent when skipped)."""
    strategy, precision, outputs, evaluation = config.strategy, config.precision, config.outputs, config.evaluation
    train_dataset, eval_dataset = load_datasets(task, config.data, config.task_options)
    distributed = start_distributed(strategy.uses_deepspeed)
    train_args = training_arguments(
        config.training, outputs, strategy, precision, distributed, train_dataset.has_text_only_samples()
    )
    setup_logging(distributed)
    logger.info("%s with %s on %d process(es), %s", task.name, strategy.name, distributed.world_size, precision)
    identity = run_identity(task, config)
    checkpoint = resolve_checkpoint(outputs, identity)
    processor, model = load_processor_and_model(config.model, strategy, config.lora, precision, distributed.device)

    output_dir = Path(outputs.output_dir)
    created_output_dir = not output_dir.exists()
    results, written = {}, []
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    try:
        if not evaluation.skip_before and not (checkpoint and (output_dir / "eval_before.json").exists()):
            written.append("eval_before.json")
            results["before"] = _evaluate_and_report(
                model, processor, task, eval_dataset, output_dir / "eval_before.json", "before", evaluation,
                distributed,
            )
        written.append(RUN_FILE)
        _record_run(output_dir, identity, distributed)
        trainer = make_trainer(model, processor, train_args, train_dataset, config.training.max_length)
        trainer.train(resume_from_checkpoint=checkpoint)
    except UserError:
        _discard_unresumable_outputs(output_dir, created_output_dir, written, distributed)
        raise
    model.config.use_cache = True  # switched off for training only; saved checkpoints generate with a cache
    trainer.save_model()
    if distributed.is_main:
        plot_training_curves(trainer.state.log_history, output_dir / "training_curves.png")
    trainer.accelerator.wait_for_everyone()

    if strategy.lora:
        # Reload the saved adapter onto a fresh base, as users load it; free the trained copy first.
        trainer.accelerator.free_memory()
        del model, trainer
        gc.collect()
        torch.cuda.empty_cache()
        model = load_model(
            config.model.name_or_path, precision, adapter_path=outputs.output_dir, dtype=precision.compute_dtype
        ).to(distributed.device)
    else:
        model = trainer.accelerator.unwrap_model(trainer.model)
    results["after"] = _evaluate_and_report(
        model, processor, task, eval_dataset, output_dir / "eval_after.json", "after", evaluation, distributed
    )
    if outputs.merge and distributed.is_main:
        _write_merged(model, processor, output_dir)
    return results
