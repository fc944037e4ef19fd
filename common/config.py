"""A run's configuration: frozen pieces, each handed only to the code that uses it.

`common.arguments.resolve_run_config` builds them from the command line, validated, with every implied
value resolved (QLoRA implies LoRA, the evaluation batch defaults to the training micro-batch, the
DeepSpeed config to ds_configs/zero2.json for full finetuning). Nothing changes them afterwards. Plain data:
this module imports no library and no other module of the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: this module imports nothing at run time
    from .precision import Precision
    from .strategy import TrainingStrategy

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # --dtype's names of the weights' load dtype (torch's names)
AUTO_DTYPE = "auto"  # --dtype auto: bf16 with flash attention, fp32 otherwise (the recipe's rule)
RESUME_LATEST = "latest"  # --resume_from_checkpoint without a path: the newest checkpoint in output_dir
# Which files of a --data_dir (or parquet files, or dataset splits) evaluate: the rule common/formats/naming.py
# applies, stated here once for --help and the errors.
EVALUATION_RULE = ("files evaluate when a word of their name (its runs of letters and digits) is val, valid or "
                   "validation (else eval or evaluation, else test or testing; digits may follow: val2); the "
                   "others train")
DEFAULT_DURING_TRAINING_SAMPLES = 200  # evaluations during training stay a small share of the run's time


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str  # hub id or local folder of an official-format checkpoint
    num_crops: int  # processor: maximum 336x336 crops per image


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha_ratio: float  # lora_alpha = round(rank * alpha_ratio)
    dropout: float


@dataclass(frozen=True)
class DataConfig:
    dataset_path: str | None  # the task's hub schema from disk, or a chat-messages dataset
    data_dir: str | None  # conversation files (generic, LLaVA, chat messages): common/formats
    eval_size: int  # train rows held out where a dataset has no evaluation split
    max_eval_samples: int | None
    seed: int  # data choices (DocVQA's answer pick), the same --seed as training
    train_file: str | None = None  # one conversation file to train on
    eval_file: str | None = None  # one conversation file to evaluate on (with train_file)
    image_folder: str | None = None  # where relative image paths of conversation data point

    @property
    def local_source(self) -> str | None:
        """The local data the run reads (--data_dir, --train_file or --dataset_path; one at most), None: the hub."""
        return self.data_dir or self.train_file or self.dataset_path


@dataclass(frozen=True)
class TrainingConfig:
    batch_size: int  # global: processes x batch_size_per_gpu x gradient accumulation
    batch_size_per_gpu: int
    num_train_epochs: int
    max_steps: int  # -1: train for num_train_epochs
    learning_rate: float
    weight_decay: float
    warmup_steps: int
    max_length: int | None  # longest sample accepted, in tokens
    packing: bool  # micro-batches as rows of whole samples concatenated, no padding (common/packing.py)
    max_packed_tokens: int | None  # tokens per packed row (None: the micro-batch's longest sample)
    gradient_checkpointing: bool  # recompute activations in the backward pass (the recipe's); off: faster, more memory
    seed: int
    logging_steps: int
    deepspeed_config: str | None  # None: plain DDP (LoRA / QLoRA)
    report_to: str
    dataloader_num_workers: int
    show_progress: bool


@dataclass(frozen=True)
class EvaluationConfig:
    batch_size: int  # generation batch per process
    max_new_tokens: int
    skip_before: bool  # no evaluation before training
    dataloader_num_workers: int
    show_progress: bool
    metric: str | None = None  # "accuracy" or "anls" instead of the task's metric; None: the task's


@dataclass(frozen=True)
class TrainingEvaluationConfig:
    """The task metric while training runs (common/training_evaluation.py)."""

    eval_steps: int = 0  # evaluate every N optimizer steps (0: not by steps)
    every_epoch: bool = False  # evaluate at the end of every epoch
    samples: int | None = None  # the first K evaluation samples (None: all, capped)
    keep_best: bool = False  # the best-scoring checkpoint is kept and becomes the final model
    early_stopping_patience: int | None = None  # stop after P evaluations without improvement

    @property
    def enabled(self) -> bool:
        return self.eval_steps > 0 or self.every_epoch


@dataclass(frozen=True)
class OutputConfig:
    output_dir: str
    save_steps: int  # 0: no intermediate checkpoints
    save_total_limit: int | None
    resume_from_checkpoint: str | None  # a checkpoint folder, RESUME_LATEST, or None (automatic resume)
    merge: bool  # also write output_dir/merged after LoRA training
    push_to_hub: bool = False  # the Trainer's pushes, then the finished output_dir with its model card
    hub_model_id: str | None = None  # the repository pushed to (default: the output folder's name)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    precision: Precision
    strategy: TrainingStrategy
    lora: LoraSettings
    data: DataConfig
    training: TrainingConfig
    evaluation: EvaluationConfig
    outputs: OutputConfig
    task_options: object | None = None  # the task's own flags, as the frozen dataclass its Task declares
    verbose: bool = False  # show the libraries' log lines and warnings too
    preview_samples: int | None = None  # --preview_samples N: write the first N samples' tokens, then stop
    during_training: TrainingEvaluationConfig = TrainingEvaluationConfig()  # --eval_steps, --keep_best, ...
