"""The task metric while training runs: when to evaluate, the best checkpoint, early stopping.

`--eval_steps N` and `--eval_every_epoch` ask the Trainer for an evaluation (its `should_evaluate`); the
Trainer's `evaluate` (common/trainer.py) then calls `TaskEvaluation`: the same generation and scoring as the
evaluations before and after training, sharded over all ranks, on the first K evaluation samples, with the
random state set aside so that evaluating never changes what training draws. The score goes through the
Trainer's `log` (log history `eval_<metric>` at its step, --report_to, the curves picture) and to
`BestCheckpointCallback.on_evaluate`, which keeps the best score in the Trainer's state (`best_metric`,
`best_global_step`), has the best step saved (`--keep_best`: the rotation never deletes it) and stops after
`--early_stopping_patience` evaluations without improvement.

Everything it needs to continue lives in the Trainer state that every checkpoint saves: the best score and
step, and the log history (the patience count is the number of evaluations after the best). A checkpoint at
an evaluated step is written after that evaluation, so a resumed run neither repeats nor misses one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import DEFAULT_DURING_TRAINING_SAMPLES, EvaluationConfig, TrainingEvaluationConfig
from .data import SampleDataset
from .distributed import Distributed
from .evaluation import evaluation_report
from .metrics import Metric
from .precision import Precision

logger = logging.getLogger(__name__)


def metric_key(metric: Metric) -> str:
    """The log-history key of the task metric, as the Trainer names evaluation results."""
    return f"eval_{metric.name}"


def evaluated_steps(log_history: list[dict], key: str) -> list[int]:
    return [entry["step"] for entry in log_history if key in entry]


def during_training_subset(dataset: SampleDataset, config: TrainingEvaluationConfig) -> SampleDataset:
    """The first K samples in dataset order: the same ones at every evaluation."""
    count = config.samples if config.samples is not None else DEFAULT_DURING_TRAINING_SAMPLES
    return dataset.subset(range(min(count, len(dataset))))


@dataclass
class TaskEvaluation:
    """model -> {"eval_<metric>": score}; every rank calls it, every rank gets the score."""

    processor: object
    dataset: SampleDataset
    metric: Metric
    evaluation: EvaluationConfig
    precision: Precision
    distributed: Distributed

    def __call__(self, model) -> dict[str, float]:
        device = self.distributed.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), self.precision.autocast(device):
            report = evaluation_report(model, self.processor, self.dataset, self.metric, self.evaluation,
                                       self.distributed, show_progress=False)
        return {metric_key(self.metric): report[self.metric.name]}


class BestCheckpointCallback(TrainerCallback):
    """Schedules the evaluations and acts on their scores: the best so far, --keep_best, early stopping."""

    def __init__(self, config: TrainingEvaluationConfig, metric: Metric, num_samples: int):
        self.config = config
        self.key = metric_key(metric)
        self.metric_name = metric.name
        self.num_samples = num_samples

    def on_step_end(self, args, state, control, **kwargs):
        if self.config.eval_steps and state.global_step % self.config.eval_steps == 0:
            control.should_evaluate = True

    def on_epoch_end(self, args, state, control, **kwargs):
        already = evaluated_steps(state.log_history, self.key)[-1:] == [state.global_step]
        if self.config.every_epoch and not already:
            control.should_evaluate = True

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        score, step = metrics[self.key], state.global_step
        if state.best_metric is None or score > state.best_metric:
            state.best_metric, state.best_global_step = score, step
            if self.config.keep_best:
                control.should_save = True  # the best step must have a checkpoint to become the final model
                state.best_model_checkpoint = str(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}")
        logger.info("step %d: %s %.4f on %d evaluation samples (best %.4f at step %d)", step, self.metric_name,
                    score, self.num_samples, state.best_metric, state.best_global_step)
        patience = self.config.early_stopping_patience
        since_best = [s for s in evaluated_steps(state.log_history, self.key) if s > state.best_global_step]
        if patience is not None and len(since_best) >= patience:
            logger.info("early stopping at step %d: %s has not improved since step %d (--early_stopping_patience %d)",
                        step, self.metric_name, state.best_global_step, patience)
            control.should_training_stop = True
