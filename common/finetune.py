"""One finetuning run, the recipe's way: evaluate, train with the Trainer, save, reload, evaluate again.

A task script supplies a `Task` (its datasets and metric) and the parsed flags; everything else —
strategy, precision, DeepSpeed, checkpoints and resume, evaluation, the outputs — happens here.
Distributed concerns stay with the Trainer/accelerate; the few rank-0 writes are explicit.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoProcessor, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from .arguments import RESUME_LATEST, validate_args, world_size
from .collators import Phi3VTrainCollator
from .data import SampleDataset, load_conversation_splits
from .evaluation import evaluate
from .metrics import Metric
from .plotting import plot_training_curves
from .precision import resolve_precision
from .strategy import TrainingStrategy, build_model, load_model
from .training_arguments import training_arguments

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class Task:
    """What a script contributes: a name for messages, its metric and its (train, eval) datasets."""

    name: str
    metric: Metric
    load_datasets: Callable[[argparse.Namespace], tuple[SampleDataset, SampleDataset]]


def _setup_logging(training_args: TrainingArguments) -> None:
    level = logging.INFO if training_args.process_index == 0 else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, stream=sys.stdout)
    transformers.utils.logging.set_verbosity(logging.WARNING if level == logging.INFO else level)


def load_datasets(task: Task, args) -> tuple[SampleDataset, SampleDataset]:
    train, evaluation = load_conversation_splits(args.data_dir) if args.data_dir else task.load_datasets(args)
    if args.max_eval_samples is not None:
        evaluation = evaluation.subset(range(min(args.max_eval_samples, len(evaluation))))
    for split, dataset in (("training", train), ("evaluation", evaluation)):
        if len(dataset) == 0:
            raise SystemExit(f"error: the {split} set of {task.name} is empty")
        if problems := dataset.stored_problems():
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise SystemExit(f"error: bad {split} data:\n  " + "\n  ".join(problems[:10]) + more)
    return train, evaluation


def resolve_checkpoint(args) -> str | None:
    """An explicit path, else the newest checkpoint-* in output_dir (automatic resume), else None."""
    if args.resume_from_checkpoint not in (None, RESUME_LATEST):
        return args.resume_from_checkpoint
    newest = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    if args.resume_from_checkpoint == RESUME_LATEST and newest is None:
        raise SystemExit(f"error: --resume_from_checkpoint: no checkpoint-* folder in {args.output_dir}")
    return newest


def _evaluate_and_report(model, processor, task: Task, dataset, path: Path, when: str, args) -> float:
    score = evaluate(model, processor, dataset, task.metric, path, args)
    logger.info("%s %s finetuning: %.4f (%d samples, %s)", task.metric.name, when, score, len(dataset), path)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{task.metric.name.upper()} {when} finetuning: {score:.4f}", flush=True)
    return score


def _write_merged(model, processor, output_dir: Path) -> None:
    merged_dir = output_dir / "merged"
    model.merge_and_unload().save_pretrained(merged_dir)
    processor.save_pretrained(merged_dir)
    logger.info("merged standalone checkpoint written to %s", merged_dir)


def _discard_unresumable_outputs(output_dir: Path, created_output_dir: bool, wrote_eval_before: bool) -> None:
    """A run that fails before training is done leaves a state to resume from (a checkpoint) or nothing: a
    bad training sample that only the data loader finds must not leave eval_before.json behind."""
    if int(os.environ.get("RANK", "0")) != 0 or not output_dir.is_dir() or get_last_checkpoint(str(output_dir)):
        return
    if created_output_dir:
        shutil.rmtree(output_dir, ignore_errors=True)
    elif wrote_eval_before:
        (output_dir / "eval_before.json").unlink(missing_ok=True)


def run_finetuning(task: Task, args: argparse.Namespace) -> dict[str, float]:
    """Returns {"before": metric, "after": metric} (before is absent when skipped)."""
    args = validate_args(args)
    strategy = TrainingStrategy.from_args(args)
    precision = resolve_precision(args.bf16, args.use_flash_attention)
    train_args = training_arguments(args, strategy, precision)
    _setup_logging(train_args)
    logger.info("%s with %s on %d process(es), %s", task.name, strategy.name, world_size(), precision)
    train_dataset, eval_dataset = load_datasets(task, args)
    checkpoint = resolve_checkpoint(args)
    processor = AutoProcessor.from_pretrained(args.model_name_or_path, num_crops=args.num_crops)
    model = build_model(args, strategy, precision)
    if not strategy.quantize_4bit:
        model.to(train_args.device)

    output_dir = Path(args.output_dir)
    created_output_dir = not output_dir.exists()
    results = {}
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    try:
        if not args.skip_eval_before and not (checkpoint and (output_dir / "eval_before.json").exists()):
            results["before"] = _evaluate_and_report(
                model, processor, task, eval_dataset, output_dir / "eval_before.json", "before", args
            )
        trainer = Trainer(
            model=model,
            args=train_args,
            data_collator=Phi3VTrainCollator(processor, args.max_length),
            train_dataset=train_dataset,
        )
        trainer.train(resume_from_checkpoint=checkpoint)
    except BaseException:
        _discard_unresumable_outputs(output_dir, created_output_dir, wrote_eval_before="before" in results)
        raise
    model.config.use_cache = True  # switched off for training only; saved checkpoints generate with a cache
    trainer.save_model()
    if trainer.is_world_process_zero():
        processor.save_pretrained(output_dir)
        plot_training_curves(trainer.state.log_history, output_dir / "training_curves.png")
    trainer.accelerator.wait_for_everyone()

    if strategy.lora:
        # Reload the saved adapter onto a fresh base, as users load it; free the trained copy first.
        trainer.accelerator.free_memory()
        del model, trainer
        gc.collect()
        torch.cuda.empty_cache()
        model = load_model(args.model_name_or_path, precision, adapter_path=args.output_dir).to(train_args.device)
    else:
        model = trainer.accelerator.unwrap_model(trainer.model)
    results["after"] = _evaluate_and_report(
        model, processor, task, eval_dataset, output_dir / "eval_after.json", "after", args
    )
    if args.merge and int(os.environ.get("RANK", "0")) == 0:
        _write_merged(model, processor, output_dir)
    return results


def _user_message(error: ValueError) -> str:
    """The error's message; a DataLoader worker re-raises its error with the worker's traceback folded into
    the message, of which the user needs the original message only."""
    message = str(error)
    marker = f"{type(error).__name__}: "
    if "Original Traceback (most recent call last)" in message and marker in message:
        message = message[message.rfind(marker) + len(marker):].strip()
    return message


def main_guard(run: Callable[[], object]) -> None:
    """Run a script's main; a user error (bad data, bad flags) ends with one clear message and exit code 1."""
    try:
        run()
    except ValueError as error:
        print(f"error: {_user_message(error)}", file=sys.stderr)
        sys.exit(1)
