"""What a task script declares — its name, metric, datasets, own flags and flag rules — and loading its data.

A script builds one `Task` and hands it, with its parsed flags, to `run_task`: the flag checks that need no
library run first, then the libraries load and `common.finetune.run_script` runs it; the run itself never
knows which task it trains. The scripts import this module before their flags are parsed: it loads no
library when imported (CONTRIBUTING.md, Commands).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .arguments import check_flags
from .config import DataConfig
from .errors import UserError
from .metrics import METRICS, Metric

if TYPE_CHECKING:
    import argparse

    from .data import SampleDataset


@dataclass(frozen=True)
class Task:
    """A name for messages, the metric and the (train, eval) datasets, loaded from the run's `DataConfig` and
    the task's own flags (an instance of `options`, a frozen dataclass whose fields are the flags the script
    adds; None without). A task whose data only comes as conversations (common/formats: --data_dir,
    --train_file) has no loader of its own, and no `hub_datasets`. `flash_attention_implies_bf16`: --use_flash_attention turns --bf16
    on, as the recipe's NLVR2 and UCF-101 scripts do (the others refuse flash attention without --bf16)."""

    name: str
    metric: Metric
    load_datasets: Callable[[DataConfig, Any], tuple[SampleDataset, SampleDataset]] | None = None
    options: type | None = None
    flash_attention_implies_bf16: bool = False
    # the hub datasets the loader reads given the task's options, the evaluation's last (the model card's `datasets`)
    hub_datasets: Callable[[Any], tuple[str, ...]] = lambda options: ()
    reads_conversations: bool = True  # --data_dir/--train_file/messages datasets are conversations (common/formats)
    # What the run trains for and how it is scored (common/objective.py); None: the recipe's supervised finetuning
    objective: Any = None
    # The task's own flag rules: parsed flags -> problems, listed with the shared ones (common/arguments.py)
    flag_problems: Callable[[Any], list[str]] | None = None

    def scored_by(self, metric: str | None) -> Task:
        """The task with --metric's metric instead of its own (None, or its own metric's name: unchanged)."""
        if metric is None or metric == self.metric.name:
            return self
        return dataclasses.replace(self, metric=METRICS[metric])


def run_task(task: Task, args: argparse.Namespace) -> dict[str, float]:
    """A task script's main, once its flags are parsed: the checks that need no library, then the run."""
    check_flags(args, task.flag_problems)
    from .finetune import run_script  # torch, transformers, peft, DeepSpeed: only once the flags are good

    return run_script(task, args)


def load_datasets(task: Task, data: DataConfig, options: Any = None) -> tuple[SampleDataset, SampleDataset]:
    """Custom conversations (every task reads them: common/formats, checked in full here) or the task's own."""
    from .formats import load_conversations  # datasets, pyarrow and the processor's constants

    conversations = load_conversations(data) if task.reads_conversations else None
    if conversations is not None:
        train, evaluation = conversations
    elif task.load_datasets is None:
        raise UserError(f"{task.name} trains on conversation data: give --data_dir, --train_file, or a --dataset_path "
                        "with messages and images columns")
    else:
        train, evaluation = _load_task_datasets(task, data, options)
    if data.max_eval_samples is not None:
        evaluation = evaluation.subset(range(min(data.max_eval_samples, len(evaluation))))
    for split, dataset in (("training", train), ("evaluation", evaluation)):
        if len(dataset) == 0:
            raise UserError(f"the {split} set of {task.name} is empty")
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
