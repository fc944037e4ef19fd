"""One finetuning run, the recipe's way: evaluate, train with the Trainer, save, reload, evaluate again.

A task script hands its `Task` (common/task.py) and parsed flags to `run_script`; the run's processes are
known first (common/distributed.py), the flags are resolved against them (common/arguments.py), and
`run_finetuning` runs the phases below, logging set up first. Everything else — the run directory and resume
(common/run_directory.py), model loading (common/model_loading.py), the Trainer (common/trainer.py),
evaluation, stopping on a signal — lives in its own module; this one only orders the phases.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from pathlib import Path

import torch
from transformers import set_seed

from .arguments import resolve_run_config
from .checkpoints import export_checkpoint_model, newest_complete_checkpoint, why_incomplete, writing
from .config import EvaluationConfig, OutputConfig, RunConfig
from .distributed import Distributed
from .errors import UserError
from .logging_setup import setup_logging
from .metrics import Metric
from .model_card import publish_run
from .model_loading import load_model, load_processor_and_model
from .objective import SUPERVISED
from .plotting import plot_training_curves
from .preemption import Interrupted, PreemptionCallback, StopSignals, report_and_exit, resume_command
from .run_directory import (
    completed_evaluation,
    discard_half_written_outputs,
    record_run,
    resolve_checkpoint,
    run_identity,
    run_summary,
)
from .task import Task, load_datasets
from .trainer import FinetuningTrainer, release_training_state
from .training_arguments import training_arguments
from .training_evaluation import BestCheckpointCallback, during_training_subset

logger = logging.getLogger(__name__)


def run_script(task: Task, args: argparse.Namespace) -> dict[str, float]:
    """A task script's main: the run's processes as launched, the flags resolved against them, the run."""
    distributed = Distributed.launched()
    return run_finetuning(task, resolve_run_config(args, task, distributed), distributed)


def run_finetuning(task: Task, config: RunConfig, distributed: Distributed) -> dict[str, float]:
    """Returns {"before": metric, "after": metric} (before is absent when skipped; {} for --preview_samples).
    SIGTERM/SIGINT stop the run cleanly (common/preemption.py): the process exits with 128 + the signal number."""
    task = task.scored_by(config.evaluation.metric)
    with StopSignals(distributed) as signals:
        try:
            results = _finetune(task, config, signals)
            distributed.finished()
            return results
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
        signals.signum, signals.distributed, synchronize=False,
    )


def _finetune(task: Task, config: RunConfig, signals: StopSignals) -> dict[str, float]:
    strategy, precision, outputs, evaluation = config.strategy, config.precision, config.outputs, config.evaluation
    setup_logging(signals.distributed, config.verbose)  # before the libraries load anything
    train_dataset, eval_dataset = load_datasets(task, config.data, config.task_options)
    objective = task.objective or SUPERVISED
    if config.preview_samples:
        objective.preview(config, train_dataset, eval_dataset, signals.distributed)
        return {}
    distributed = signals.distributed.started(strategy.uses_deepspeed)
    train_args = training_arguments(
        config.training, outputs, strategy, precision, distributed, train_dataset.has_text_only_samples()
    )
    logger.info(
        "%s with %s on %d process(es), %s", task.name, strategy.name, distributed.world_size, precision.describe()
    )
    logger.info("training samples: %d, evaluation samples: %d", len(train_dataset), len(eval_dataset))
    identity = run_identity(task.name, config)
    checkpoint = resolve_checkpoint(outputs, identity, distributed)
    # --seed also fixes what is drawn before the Trainer seeds itself (the LoRA initialisation): a run started
    # again from scratch (stopped before its first checkpoint) is the run it replaces
    set_seed(config.training.seed)
    processor, model = load_processor_and_model(config.model, strategy, config.lora, precision, distributed.device)

    output_dir = Path(outputs.output_dir)
    created_output_dir = not output_dir.exists()
    results = {}
    report = objective.run_report(output_dir, run_summary(task.name, config), task.metric, eval_dataset, distributed)
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    preemption = PreemptionCallback(signals)
    try:
        objective = objective.start(config, processor, model, train_dataset, eval_dataset, distributed)
        if not evaluation.skip_before:
            signals.activity = "the evaluation before training"
            with precision.autocast(distributed.device):
                results["before"] = _evaluation_before(
                    objective, model, processor, task, eval_dataset, identity, output_dir, evaluation, distributed
                )
            report.evaluated("before", output_dir / "eval_before.json")
        record_run(output_dir, identity, distributed)
        signals.activity = "the set-up of training"
        watch, task_evaluation = _evaluation_during_training(
            objective, config, task, processor, eval_dataset, distributed
        )
        rewrite_report = report.callback(task_evaluation)
        trainer = objective.make_trainer(
            model, processor, train_args, train_dataset, config.training, keep_checkpoints=outputs.save_total_limit,
            callbacks=[preemption, *watch, rewrite_report], distributed=distributed, task_evaluation=task_evaluation,
        )
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except UserError:
        discard_half_written_outputs(output_dir, created_output_dir, distributed)
        raise
    if preemption.stopped_at is not None:
        stopped_at = output_dir / f"checkpoint-{preemption.stopped_at}"
        report_and_exit(
            f"stopped by {signals.name} at step {preemption.stopped_at} of {trainer.state.max_steps}: {stopped_at} "
            f"is complete; resume with: {resume_command(sys.argv, stopped_at, distributed)}",
            signals.signum, distributed, synchronize=True,
        )
    signals.activity = "the final save"
    model.config.use_cache = True  # switched off for training only; saved checkpoints generate with a cache
    best = _best_checkpoint(trainer, config, task.metric)
    with writing("the final model", output_dir, output_dir):
        if best is None:
            trainer.save_model()
        elif distributed.is_main:
            export_checkpoint_model(best, output_dir)
        logger.info("%s saved to %s%s", "LoRA adapter" if strategy.lora else "model", output_dir,
                    f" (the best, {best.name})" if best else "")
        trainer.save_state()  # trainer_state.json: the run's log history (loss, learning rate, eval_<metric>) and best
        report.progress(trainer.state.log_history, trainer.state.global_step)
        if distributed.is_main:
            plot_training_curves(trainer.state.log_history, output_dir / "training_curves.png")
            logger.info("training curves: %s", output_dir / "training_curves.png")
    trainer.accelerator.wait_for_everyone()

    # DeepSpeed trained a half-precision copy of the weights: the saved model is the master weights in the load dtype
    saved_differs = best is not None or trainer.deepspeed_casts_weights
    model = release_training_state(trainer)
    del trainer
    if strategy.lora or saved_differs:
        # Reload the saved model (the adapter onto a fresh base), as users load it; free the trained copy first.
        del model
        gc.collect()
        torch.cuda.empty_cache()
        model = (load_model(config.model.name_or_path, precision, distributed.device, adapter_path=outputs.output_dir)
                 if strategy.lora else load_model(outputs.output_dir, precision, distributed.device))
    signals.activity = "the evaluation after training"
    with precision.autocast(distributed.device):
        results["after"] = _evaluate_and_report(
            objective, model, processor, task, eval_dataset, output_dir / "eval_after.json", "after", evaluation,
            distributed,
        )
    report.evaluated("after", output_dir / "eval_after.json")
    if distributed.is_main:
        if outputs.merge:
            _write_merged(model, processor, output_dir)
        publish_run(task, config, distributed, len(train_dataset), len(eval_dataset))
    return results


def _evaluation_during_training(objective, config: RunConfig, task: Task, processor, eval_dataset,
                                 distributed: Distributed):
    """(callbacks, task_evaluation) of --eval_steps / --eval_every_epoch; none without them."""
    during = config.during_training
    if not during.enabled:
        return [], None
    subset = during_training_subset(eval_dataset, during)
    logger.info("evaluating %s during training on %d samples%s%s", task.metric.name, len(subset),
                f", every {during.eval_steps} steps" if during.eval_steps else "",
                ", after every epoch" if during.every_epoch else "")
    evaluation = objective.during_training(processor, subset, task.metric, config.evaluation, config.precision,
                                           distributed)
    return [BestCheckpointCallback(during, task.metric, len(subset))], evaluation


def _best_checkpoint(trainer: FinetuningTrainer, config: RunConfig, metric: Metric) -> Path | None:
    """--keep_best: the checkpoint with the best score during training, which becomes the final model (None
    without --keep_best, or when nothing was evaluated: the final model is then the last step's)."""
    if not config.during_training.keep_best:
        return None
    state = trainer.state
    if state.best_global_step is None:
        logger.warning("--keep_best: no evaluation during training ran; the final model is the last step's")
        return None
    best = Path(config.outputs.output_dir) / f"checkpoint-{state.best_global_step}"
    if (reason := why_incomplete(best)) is not None:
        raise UserError(f"--keep_best: the best checkpoint {best} cannot be exported ({reason}): it was deleted "
                        "or damaged after training wrote it")
    logger.info("best %s during training: %.4f at step %d of %d; the final model is %s", metric.name,
                state.best_metric, state.best_global_step, state.global_step, best)
    if trainer.args.should_save:
        print(f"BEST {metric.name.upper()} during training: {state.best_metric:.4f} at step {state.best_global_step}",
              flush=True)
    return best


def _evaluation_before(
    objective, model, processor, task: Task, eval_dataset, identity: dict, output_dir: Path,
    evaluation: EvaluationConfig, distributed: Distributed,
) -> float:
    """The score before training: evaluated, or read back when this same run already evaluated it (a rerun
    after an interruption, with or without a checkpoint)."""
    path = output_dir / "eval_before.json"
    score = completed_evaluation(path, identity, task.metric, len(eval_dataset))
    if score is None:
        return _evaluate_and_report(objective, model, processor, task, eval_dataset, path, "before", evaluation,
                                    distributed)
    logger.info("%s before finetuning: %.4f, from %s (already evaluated by this run)", task.metric.name, score, path)
    if distributed.is_main:
        print(f"{task.metric.name.upper()} before finetuning: {score:.4f}", flush=True)
    return score


def _evaluate_and_report(
    objective, model, processor, task: Task, dataset, path: Path, when: str, evaluation: EvaluationConfig,
    distributed: Distributed,
) -> float:
    with writing(f"the evaluation {path.name}", path, path.parent):
        report = objective.evaluate(model, processor, dataset, task.metric, path, evaluation, distributed)
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
    with writing("the merged model", merged_dir, output_dir):
        model.merge_and_unload().save_pretrained(merged_dir)
        processor.save_pretrained(merged_dir)
    logger.info("merged standalone checkpoint written to %s", merged_dir)
