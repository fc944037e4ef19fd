"""One finetuning run, the recipe's way: evaluate, train with the Trainer, save, reload, evaluate again.

A task script supplies a `Task` (its datasets and metric) and the parsed flags; everything else —
strategy, precision, DeepSpeed, checkpoints and resume, evaluation, the outputs — happens here.
Distributed concerns stay with the Trainer/accelerate; the few rank-0 writes are explicit.
"""

from __future__ import annotations

import argparse
import gc
import json
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
from .evaluation import evaluate, is_main_process
from .metrics import Metric
from .plotting import plot_training_curves
from .precision import Precision, resolve_precision
from .strategy import TrainingStrategy, build_model, load_model
from .training_arguments import training_arguments

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """What a script contributes: a name for messages, its metric and its (train, eval) datasets. A task whose
    data only comes in the generic format (--data_dir) has no loader of its own."""

    name: str
    metric: Metric
    load_datasets: Callable[[argparse.Namespace], tuple[SampleDataset, SampleDataset]] | None = None


def _setup_logging(training_args: TrainingArguments) -> None:
    level = logging.INFO if training_args.process_index == 0 else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, stream=sys.stdout)
    transformers.utils.logging.set_verbosity(logging.WARNING if level == logging.INFO else level)


def load_datasets(task: Task, args) -> tuple[SampleDataset, SampleDataset]:
    # --data_dir (the generic format) works for every task
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


def load_processor_and_model(args, strategy: TrainingStrategy, precision: Precision, device):
    """The processor with the run's num_crops, and the model built for the strategy on its device."""
    processor = AutoProcessor.from_pretrained(args.model_name_or_path, num_crops=args.num_crops)
    model = build_model(args, strategy, precision)
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


def run_identity(task: Task, args, strategy: TrainingStrategy) -> dict:
    """What a checkpoint in output_dir must have been made by for an automatic resume to continue it."""
    return {
        "task": task.name,
        "model": args.model_name_or_path,
        "strategy": strategy.name,
        "data": str(Path(args.data_dir or args.dataset_path).resolve()) if args.data_dir or args.dataset_path else "hub",
        "num_crops": args.num_crops,
    }


def resolve_checkpoint(args, identity: dict) -> str | None:
    """An explicit path; else the newest checkpoint-* in output_dir if this same run made it (automatic
    resume); else None. A checkpoint of another run (another task, model, strategy or data) is refused."""
    if args.resume_from_checkpoint not in (None, RESUME_LATEST):
        return args.resume_from_checkpoint
    newest = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    if newest is None:
        if args.resume_from_checkpoint == RESUME_LATEST:
            raise SystemExit(f"error: --resume_from_checkpoint: no checkpoint-* folder in {args.output_dir}")
        return None
    run_file = Path(args.output_dir) / RUN_FILE
    recorded = json.loads(run_file.read_text()) if run_file.exists() else None
    if recorded != identity:
        raise SystemExit(
            f"error: {args.output_dir} holds {Path(newest).name} of another run ({recorded or 'unknown'}), not of "
            f"this one ({identity}); choose another --output_dir, or continue it with --resume_from_checkpoint {newest}"
        )
    return newest


def _evaluate_and_report(model, processor, task: Task, dataset, path: Path, when: str, args) -> float:
    score = evaluate(model, processor, dataset, task.metric, path, args)
    logger.info("%s %s finetuning: %.4f (%d samples, %s)", task.metric.name, when, score, len(dataset), path)
    if is_main_process():
        print(f"{task.metric.name.upper()} {when} finetuning: {score:.4f}", flush=True)
    return score


def _write_merged(model, processor, output_dir: Path) -> None:
    merged_dir = output_dir / "merged"
    model.merge_and_unload().save_pretrained(merged_dir)
    processor.save_pretrained(merged_dir)
    logger.info("merged standalone checkpoint written to %s", merged_dir)


def _discard_unresumable_outputs(output_dir: Path, created_output_dir: bool, written: list[str]) -> None:
    """After a data error (a bad sample only the data loader finds), leave a state to resume from (a
    checkpoint) or nothing of this run's: not a lone eval_before.json."""
    if not is_main_process() or not output_dir.is_dir() or get_last_checkpoint(str(output_dir)):
        return
    if created_output_dir:
        shutil.rmtree(output_dir, ignore_errors=True)
    for name in written:
        (output_dir / name).unlink(missing_ok=True)


def _record_run(output_dir: Path, identity: dict) -> None:
    if is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RUN_FILE).write_text(json.dumps(identity, indent=1) + "\n")


def run_finetuning(task: Task, args: argparse.Namespace) -> dict[str, float]:
    """Returns {"before": metric, "after": metric} (before is absent when skipped)."""
    args = validate_args(args)
    strategy = TrainingStrategy.from_args(args)
    precision = resolve_precision(args.bf16, args.use_flash_attention)
    train_dataset, eval_dataset = load_datasets(task, args)
    train_args = training_arguments(args, strategy, precision, train_dataset.has_text_only_samples())
    _setup_logging(train_args)
    logger.info("%s with %s on %d process(es), %s", task.name, strategy.name, world_size(), precision)
    identity = run_identity(task, args, strategy)
    checkpoint = resolve_checkpoint(args, identity)
    processor, model = load_processor_and_model(args, strategy, precision, train_args.device)

    output_dir = Path(args.output_dir)
    created_output_dir = not output_dir.exists()
    results, written = {}, []
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    try:
        if not args.skip_eval_before and not (checkpoint and (output_dir / "eval_before.json").exists()):
            written.append("eval_before.json")
            results["before"] = _evaluate_and_report(
                model, processor, task, eval_dataset, output_dir / "eval_before.json", "before", args
            )
        written.append(RUN_FILE)
        _record_run(output_dir, identity)
        trainer = make_trainer(model, processor, train_args, train_dataset, args.max_length)
        trainer.train(resume_from_checkpoint=checkpoint)
    except ValueError:
        _discard_unresumable_outputs(output_dir, created_output_dir, written)
        raise
    model.config.use_cache = True  # switched off for training only; saved checkpoints generate with a cache
    trainer.save_model()
    if is_main_process():
        plot_training_curves(trainer.state.log_history, output_dir / "training_curves.png")
    trainer.accelerator.wait_for_everyone()

    if strategy.lora:
        # Reload the saved adapter onto a fresh base, as users load it; free the trained copy first.
        trainer.accelerator.free_memory()
        del model, trainer
        gc.collect()
        torch.cuda.empty_cache()
        model = load_model(
            args.model_name_or_path, precision, adapter_path=args.output_dir, dtype=precision.compute_dtype
        ).to(train_args.device)
    else:
        model = trainer.accelerator.unwrap_model(trainer.model)
    results["after"] = _evaluate_and_report(
        model, processor, task, eval_dataset, output_dir / "eval_after.json", "after", args
    )
    if args.merge and is_main_process():
        _write_merged(model, processor, output_dir)
    return results
