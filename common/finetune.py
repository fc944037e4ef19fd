"""One finetuning run, the recipe's way: evaluate, train with the Trainer, save, reload, evaluate again.

A task script supplies a `Task` (its datasets and metric) and the resolved `RunConfig`; everything
else — strategy, precision, DeepSpeed, checkpoints and resume, evaluation, the outputs — happens here.
The process's place in the run comes from `start_distributed`; the few rank-0 writes are explicit.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoProcessor, TrainingArguments, set_seed

from .arguments import RESUME_LATEST
from .checkpoints import check_complete, newest_complete_checkpoint
from .collators import Phi3VTrainCollator
from .config import DataConfig, EvaluationConfig, LoraSettings, ModelConfig, OutputConfig, RunConfig
from .data import DrawEpochCallback, SampleDataset, load_conversation_splits
from .distributed import Distributed, start_distributed
from .errors import UserError
from .evaluation import evaluate
from .logging_setup import quiet_libraries, setup_logging
from .metrics import Metric
from .plotting import plot_training_curves
from .precision import Precision
from .preemption import Interrupted, PreemptionCallback, StopSignals, report_and_exit, resume_command
from .preview import describe, preview_records, write_preview
from .strategy import TrainingStrategy, build_model, load_model
from .trainer import FinetuningTrainer, release_training_state
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
    try:
        return task.load_datasets(data, options)
    except ConnectionError as error:  # the datasets library's "Couldn't reach ... on the Hub"
        if data.dataset_path:
            raise
        raise UserError(
            f"{task.name}: cannot download the dataset ({error}); download it where the hub is reachable "
            "(datasets' save_to_disk, or the parquet files) and pass that folder with --dataset_path"
        ) from error


def load_processor(model_config: ModelConfig):
    """The checkpoint's processor with the run's num_crops."""
    try:
        return AutoProcessor.from_pretrained(model_config.name_or_path, num_crops=model_config.num_crops)
    except OSError as error:  # not on the hub, or no hub access: transformers' message says which
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"cannot load --model_name_or_path {model_config.name_or_path} ({first_line}); give the folder of a "
            "downloaded checkpoint, or a hub model id with hub access"
        ) from error


def load_processor_and_model(
    model_config: ModelConfig, strategy: TrainingStrategy, lora: LoraSettings, precision: Precision, device
):
    """The processor with the run's num_crops, and the model built for the strategy on its device."""
    return load_processor(model_config), build_model(model_config.name_or_path, strategy, lora, precision, device)


def make_trainer(model, processor, train_args: TrainingArguments, dataset, max_length: int | None,
                 keep_checkpoints: int | None = None, callbacks=()) -> FinetuningTrainer:
    return FinetuningTrainer(
        model=model,
        args=train_args,
        data_collator=Phi3VTrainCollator(processor, max_length),
        train_dataset=dataset,
        processing_class=processor,  # saved with the model and in every checkpoint
        callbacks=[DrawEpochCallback(dataset), *callbacks],
        keep_checkpoints=keep_checkpoints,
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


def resolve_checkpoint(outputs: OutputConfig, identity: dict, distributed: Distributed) -> Path | None:
    """An explicit path, if it is a complete checkpoint; else the newest complete checkpoint-* in output_dir
    if this same run made it (automatic resume), passing over (and naming) incomplete ones; else None. A
    checkpoint of another run (another task, model, strategy or data) is refused."""
    if outputs.resume_from_checkpoint not in (None, RESUME_LATEST):
        return check_complete(Path(outputs.resume_from_checkpoint))
    output_dir = Path(outputs.output_dir)
    newest, skipped = newest_complete_checkpoint(output_dir)
    if distributed.is_main:
        for folder, reason in skipped:
            logger.warning("skipping %s: incomplete checkpoint (%s)", folder, reason)
    if newest is None:
        if outputs.resume_from_checkpoint == RESUME_LATEST:
            raise UserError(f"--resume_from_checkpoint: no complete checkpoint-* folder in {output_dir}")
        return None
    recorded = _recorded_identity(output_dir)
    if recorded != identity:
        raise UserError(
            f"{output_dir} holds {newest.name} of another run ({recorded or 'unknown'}), not of this one "
            f"({identity}); choose another --output_dir, or continue it with --resume_from_checkpoint {newest}"
        )
    return newest


def _recorded_identity(output_dir: Path) -> dict | None:
    run_file = output_dir / RUN_FILE
    return json.loads(run_file.read_text()) if run_file.exists() else None


def _completed_evaluation(path: Path, identity: dict, metric: Metric, num_samples: int) -> float | None:
    """The score in `path` if this same run already wrote it (for the same number of samples), else None."""
    if not path.is_file() or _recorded_identity(path.parent) != identity:
        return None
    report = json.loads(path.read_text())
    if metric.name not in report or len(report.get("answers_unique", ())) != num_samples:
        return None
    return report[metric.name]


def _evaluate_and_report(
    model, processor, task: Task, dataset, path: Path, when: str, evaluation: EvaluationConfig,
    distributed: Distributed,
) -> float:
    report = evaluate(model, processor, dataset, task.metric, path, evaluation, distributed)
    score = report[task.metric.name]
    logger.info("%s %s finetuning: %.4f (%d samples, %s)", task.metric.name, when, score, len(dataset), path)
    if distributed.is_main:
        print(f"{task.metric.name.upper()} {when} finetuning: {score:.4f}", flush=True)
        if "anls_case_insensitive" in report:
            print(f"ANLS (case-insensitive, as the DocVQA challenge) {when} finetuning: "
                  f"{report['anls_case_insensitive']:.4f}", flush=True)
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
    if not distributed.is_main or not output_dir.is_dir() or newest_complete_checkpoint(output_dir)[0]:
        return
    if created_output_dir:
        shutil.rmtree(output_dir, ignore_errors=True)
    for name in written:
        (output_dir / name).unlink(missing_ok=True)


def _record_run(output_dir: Path, identity: dict, distributed: Distributed) -> None:
    if distributed.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RUN_FILE).write_text(json.dumps(identity, indent=1) + "\n")


def _preview(config: RunConfig, train_dataset: SampleDataset, eval_dataset: SampleDataset) -> None:
    """--preview_samples: the samples as training and evaluation would build them; no weights, no training."""
    distributed = start_distributed(uses_deepspeed=False)
    processor = load_processor(config.model)
    records = preview_records(processor, train_dataset, eval_dataset, config.preview_samples)
    if distributed.is_main:
        path = write_preview(records, Path(config.outputs.output_dir))
        print(describe(processor.tokenizer, records[0]), flush=True)
        print(f"{len(records)} preview records written to {path}", flush=True)


def run_finetuning(task: Task, config: RunConfig) -> dict[str, float]:
    """Returns {"before": metric, "after": metric} (before is absent when skipped; {} for --preview_samples).
    SIGTERM/SIGINT stop the run cleanly (common/preemption.py): the process exits with 128 + the signal number."""
    with StopSignals() as signals:
        try:
            return _finetune(task, config, signals)
        except Interrupted:
            _report_interruption(config.outputs, signals)
        except torch.distributed.DistError:
            if signals.signum is None:
                raise
            _report_interruption(config.outputs, signals)  # a rank whose peers went away on the signal


def _report_interruption(outputs: OutputConfig, signals: StopSignals) -> None:
    newest, _ = newest_complete_checkpoint(Path(outputs.output_dir))
    saved = f"the newest complete checkpoint is {newest}" if newest else "no checkpoint to resume from"
    report_and_exit(
        f"interrupted by {signals.name} during {signals.activity}; {saved}; to continue: "
        f"{resume_command(sys.argv, newest, signals.distributed)}",
        signals.signum, signals.is_main, synchronize=False,
    )


def _finetune(task: Task, config: RunConfig, signals: StopSignals) -> dict[str, float]:
    strategy, precision, outputs, evaluation = config.strategy, config.precision, config.outputs, config.evaluation
    quiet_libraries(config.verbose)  # before they load anything or probe the hardware
    train_dataset, eval_dataset = load_datasets(task, config.data, config.task_options)
    if config.preview_samples:
        _preview(config, train_dataset, eval_dataset)
        return {}
    distributed = start_distributed(strategy.uses_deepspeed)
    signals.distributed = distributed
    train_args = training_arguments(
        config.training, outputs, strategy, precision, distributed, train_dataset.has_text_only_samples()
    )
    setup_logging(distributed, config.verbose)
    logger.info(
        "%s with %s on %d process(es), %s", task.name, strategy.name, distributed.world_size, precision.describe()
    )
    logger.info("training samples: %d, evaluation samples: %d", len(train_dataset), len(eval_dataset))
    identity = run_identity(task, config)
    checkpoint = resolve_checkpoint(outputs, identity, distributed)
    # --seed also fixes what is drawn before the Trainer seeds itself (the LoRA initialisation): a run started
    # again from scratch (stopped before its first checkpoint) is the run it replaces
    set_seed(config.training.seed)
    processor, model = load_processor_and_model(config.model, strategy, config.lora, precision, distributed.device)

    output_dir = Path(outputs.output_dir)
    created_output_dir = not output_dir.exists()
    results, written = {}, []
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    preemption = PreemptionCallback(signals)
    try:
        if not evaluation.skip_before:
            signals.activity = "the evaluation before training"
            with precision.autocast(distributed.device):
                results["before"] = _evaluation_before(
                    model, processor, task, eval_dataset, identity, output_dir, evaluation, distributed, written
                )
        written.append(RUN_FILE)
        _record_run(output_dir, identity, distributed)
        signals.activity = "the set-up of training"
        trainer = make_trainer(model, processor, train_args, train_dataset, config.training.max_length,
                               keep_checkpoints=outputs.save_total_limit, callbacks=[preemption])
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except UserError:
        _discard_unresumable_outputs(output_dir, created_output_dir, written, distributed)
        raise
    if preemption.stopped_at is not None:
        stopped_at = output_dir / f"checkpoint-{preemption.stopped_at}"
        report_and_exit(
            f"stopped by {signals.name} at step {preemption.stopped_at} of {trainer.state.max_steps}: {stopped_at} "
            f"is complete; resume with: {resume_command(sys.argv, stopped_at, distributed)}",
            signals.signum, distributed.is_main, synchronize=True,
        )
    signals.activity = "the final save"
    model.config.use_cache = True  # switched off for training only; saved checkpoints generate with a cache
    trainer.save_model()
    logger.info("%s saved to %s", "LoRA adapter" if strategy.lora else "model", output_dir)
    if distributed.is_main:
        plot_training_curves(trainer.state.log_history, output_dir / "training_curves.png")
        logger.info("training curves: %s", output_dir / "training_curves.png")
    trainer.accelerator.wait_for_everyone()

    model = release_training_state(trainer)
    del trainer
    if strategy.lora:
        # Reload the saved adapter onto a fresh base, as users load it; free the trained copy first.
        del model
        gc.collect()
        torch.cuda.empty_cache()
        model = load_model(config.model.name_or_path, precision, distributed.device, adapter_path=outputs.output_dir)
    signals.activity = "the evaluation after training"
    with precision.autocast(distributed.device):
        results["after"] = _evaluate_and_report(
            model, processor, task, eval_dataset, output_dir / "eval_after.json", "after", evaluation, distributed
        )
    if outputs.merge and distributed.is_main:
        _write_merged(model, processor, output_dir)
    return results


def _evaluation_before(
    model, processor, task: Task, eval_dataset, identity: dict, output_dir: Path, evaluation: EvaluationConfig,
    distributed: Distributed, written: list[str],
) -> float:
    """The score before training: evaluated, or read back when this same run already evaluated it (a rerun
    after an interruption, with or without a checkpoint)."""
    path = output_dir / "eval_before.json"
    score = _completed_evaluation(path, identity, task.metric, len(eval_dataset))
    if score is None:
        written.append(path.name)
        return _evaluate_and_report(model, processor, task, eval_dataset, path, "before", evaluation, distributed)
    logger.info("%s before finetuning: %.4f, from %s (already evaluated by this run)", task.metric.name, score, path)
    if distributed.is_main:
        print(f"{task.metric.name.upper()} before finetuning: {score:.4f}", flush=True)
    return score
