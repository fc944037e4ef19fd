"""The command line every finetuning script shares, and what it resolves to.

Flags are declared once here; a script only changes defaults (`num_crops`, say) and adds its own
(`--full_train` for DocVQA). `resolve_run_config` turns the parsed flags into the frozen pieces of
`common.config.RunConfig`, rejecting invalid combinations up front with one `UsageError` that lists
every problem, before any model or data is loaded. `check_flags` runs the checks that need no library before
the libraries load, so that a flag problem answers at once; this module imports none at its top
(CONTRIBUTING.md, Commands).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from .config import (
    AUTO_DTYPE,
    DEFAULT_DURING_TRAINING_SAMPLES,
    DTYPE_NAMES,
    EVALUATION_RULE,
    RESUME_LATEST,
    DataConfig,
    EvaluationConfig,
    LoraSettings,
    ModelConfig,
    OutputConfig,
    RunConfig,
    TrainingConfig,
    TrainingEvaluationConfig,
)
from .errors import UsageError
from .strategy import TrainingStrategy

if TYPE_CHECKING:
    from .distributed import Distributed
    from .task import Task

DEFAULT_DEEPSPEED_CONFIG = Path(__file__).resolve().parent.parent / "ds_configs" / "zero2.json"


def build_parser(description: str, **defaults) -> argparse.ArgumentParser:
    """The shared parser; keyword arguments override defaults (e.g. `num_crops=4`)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model and strategy")
    model.add_argument("--model_name_or_path", default="microsoft/Phi-3.5-vision-instruct",
                       help="hub id or local folder of an official-format Phi-3.5-vision checkpoint")
    model.add_argument("--use_flash_attention", action="store_true",
                       help="flash_attention_2 kernels (needs the flash-attn package and an Ampere+ GPU); default sdpa")
    add_precision_flags(model)
    model.add_argument("--use_lora", action="store_true", help="train LoRA adapters instead of all weights")
    model.add_argument("--use_qlora", action="store_true", help="4-bit nf4 base model with LoRA (implies --use_lora)")
    model.add_argument("--lora_rank", type=int, default=64, help="LoRA rank")
    model.add_argument("--lora_alpha_ratio", type=float, default=2, help="LoRA alpha = round(rank * ratio)")
    model.add_argument("--lora_dropout", type=float, default=0.0, help="LoRA dropout")
    model.add_argument("--freeze_vision_model", action="store_true",
                       help="freeze the CLIP tower and the image projection")
    model.add_argument("--num_crops", type=int, default=16, help="maximum number of 336x336 crops per image (<= 16)")

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default="./output/", help="where the model, checkpoints and evals go")
    train.add_argument("--batch_size", type=int, default=16,
                       help="global batch size: processes x batch_size_per_gpu x gradient accumulation")
    train.add_argument("--batch_size_per_gpu", type=int, default=1,
                       help="micro-batch per device; >1 pads sequences and image crops")
    train.add_argument("--num_train_epochs", type=int, default=1, help="number of training epochs")
    train.add_argument("--max_steps", type=int, default=-1, help="stop after this many optimizer steps (-1: epochs)")
    train.add_argument("--learning_rate", type=float, default=4.0e-5, help="peak learning rate (AdamW)")
    train.add_argument("--wd", type=float, default=0.01, help="weight decay")
    train.add_argument("--warmup_steps", type=int, default=50, help="linear warm-up steps")
    train.add_argument("--max_length", type=int, default=None,
                       help="refuse samples longer than this many tokens (images included) with a clear error")
    train.add_argument("--packing", action="store_true",
                       help="padding-free micro-batches: samples concatenated into rows, each attending only to itself")
    train.add_argument("--max_packed_tokens", type=int, default=None,
                       help="tokens per packed row with --packing (default: as many as the micro-batch's longest "
                            "sample; a longer sample takes a row alone)")
    train.add_argument("--gradient_checkpointing", choices=["on", "off"], default="on",
                       help="recompute activations in the backward pass (on, the recipe's); off is faster where "
                            "memory allows")
    train.add_argument("--seed", type=int, default=42, help="random seed (data order, LoRA init)")
    train.add_argument("--save_steps", type=int, default=0,
                       help="save a resumable checkpoint every N optimizer steps (0: no intermediate checkpoints)")
    train.add_argument("--save_total_limit", type=int, default=None, help="keep at most N checkpoints")
    train.add_argument("--resume_from_checkpoint", nargs="?", const=RESUME_LATEST, default=None,
                       help="resume from PATH, or from the newest checkpoint in output_dir when no PATH is given "
                            "(the newest checkpoint is also picked up automatically)")
    train.add_argument("--deepspeed", default=None,
                       help="DeepSpeed config for full finetuning (default: ds_configs/zero2.json)")
    train.add_argument("--report_to", default="none", help="none, tensorboard, wandb, ... (Trainer report_to)")
    train.add_argument("--dataloader_num_workers", type=int, default=4, help="data loading worker processes")
    train.add_argument("--logging_steps", type=int, default=10, help="log loss and learning rate every N steps")
    train.add_argument("--no-tqdm", dest="tqdm", action="store_false", help="disable progress bars")
    train.add_argument("--verbose", action="store_true",
                       help="also show the libraries' log lines and warnings (default: only this project's lines)")

    data = parser.add_argument_group("data and evaluation")
    data.add_argument("--dataset_path", default=None,
                      help="local copy of the task's dataset (save_to_disk folder, parquet or jsonl) instead of the hub")
    data.add_argument("--data_dir", default=None,
                      help="folder of conversation files (.json/.jsonl: generic, LLaVA/ShareGPT or chat messages, "
                           f"detected per file); {EVALUATION_RULE}")
    data.add_argument("--train_file", default=None,
                      help="one conversation file to train on (generic, LLaVA/ShareGPT or chat messages)")
    data.add_argument("--eval_file", default=None,
                      help="one conversation file to evaluate on (with --train_file; default: --eval_size "
                           "samples of the training file held out)")
    data.add_argument("--image_folder", default=None,
                      help="folder that relative image paths of conversation data point into (default: the "
                           "data file's folder, then its images/)")
    data.add_argument("--metric", choices=("accuracy", "anls"), default=None,
                      help="compare the generated last answer with the reference by accuracy or ANLS "
                           "(default: the task's metric)")
    data.add_argument("--eval_size", type=int, default=500, help="train rows held out for evaluation, where the "
                      "dataset has no evaluation split")
    data.add_argument("--max_eval_samples", type=int, default=None, help="evaluate on at most N samples")
    data.add_argument("--eval_batch_size", type=int, default=None,
                      help="generation batch per device (default: batch_size_per_gpu)")
    data.add_argument("--max_new_tokens", type=int, default=64, help="generation length limit for evaluation")
    data.add_argument("--skip_eval_before", action="store_true", help="skip the evaluation before training")
    data.add_argument("--preview_samples", type=int, default=None, metavar="N",
                      help="write the first N training samples and evaluation prompts as token ids to "
                           "OUTPUT_DIR/data_preview.jsonl, show the first, and exit (no model weights loaded)")
    watch = parser.add_argument_group("evaluation during training (the task metric)")
    watch.add_argument("--eval_steps", type=int, default=0, metavar="N",
                       help="evaluate the task metric every N optimizer steps (0: not by steps)")
    watch.add_argument("--eval_every_epoch", action="store_true", help="evaluate the task metric after every epoch")
    watch.add_argument("--eval_during_training_samples", type=int, default=None, metavar="K",
                       help="evaluate during training on the first K evaluation samples "
                            f"(default: all, at most {DEFAULT_DURING_TRAINING_SAMPLES})")
    watch.add_argument("--keep_best", action="store_true",
                       help="keep the checkpoint with the best task metric; it becomes the final model")
    watch.add_argument("--early_stopping_patience", type=int, default=None, metavar="P",
                       help="stop after P evaluations during training without improvement")
    data.add_argument("--merge", action="store_true",
                      help="after LoRA training, also write a merged standalone checkpoint to output_dir/merged")
    data.add_argument("--push_to_hub", action="store_true",
                      help="push to the Hugging Face Hub as the Trainer does (every save), then the finished "
                           "output_dir with its model card (needs a token: `hf auth login` or HF_TOKEN)")
    data.add_argument("--hub_model_id", default=None,
                      help="the hub repository to push to, NAME or USER/NAME (default: the output folder's name)")
    parser.set_defaults(**defaults)
    return parser


def add_precision_flags(group) -> None:
    """--bf16, --fp16 and --dtype, which the finetuning scripts and predict.py share (common/precision.py)."""
    group.add_argument("--bf16", action="store_true",
                       help="bf16 autocast (on a GPU: Ampere or newer); without --bf16 or --fp16 a GPU runs "
                            "fp16 mixed precision, the CPU in fp32")
    group.add_argument("--fp16", action="store_true",
                       help="fp16 mixed precision with loss scaling (the default on a GPU; on the CPU, LoRA and QLoRA "
                            "train with it: DeepSpeed has no fp16 there)")
    group.add_argument("--dtype", choices=(AUTO_DTYPE, *DTYPE_NAMES), default=AUTO_DTYPE,
                       help="dtype the weights load in; auto: bfloat16 with --use_flash_attention, float32 otherwise "
                            "(--bf16 --dtype bfloat16: the flash configuration's weights with SDPA)")


def resolve_run_config(
    args: argparse.Namespace, task: Task | None = None, distributed: Distributed | None = None
) -> RunConfig:
    """The run's configuration from parsed flags; one UsageError lists every problem.

    `task`: the script's `Task`, with its own flags (`options`) and flag rules.
    `distributed`: the run's processes (default: as launched).
    """
    # torch: the launched processes and the GPU are checked here, after check_flags
    from .distributed import Distributed
    from .precision import resolve_precision

    distributed = Distributed.launched() if distributed is None else distributed
    problems = _problems(args, distributed.world_size) + _task_problems(args, task)
    implied_bf16 = bool(task and task.flash_attention_implies_bf16 and args.use_flash_attention and not args.fp16)
    bf16 = args.bf16 or implied_bf16
    try:
        precision = resolve_precision(
            bf16, args.use_flash_attention, local_rank=distributed.local_rank, fp16=args.fp16, dtype=args.dtype,
            uses_deepspeed=not (args.use_lora or args.use_qlora),
        )
    except UsageError as error:
        problems.append(str(error))
    if problems:
        raise UsageError("invalid arguments:\n  " + "\n  ".join(problems))
    strategy = TrainingStrategy.from_flags(args.use_lora, args.use_qlora, args.freeze_vision_model)
    deepspeed = (args.deepspeed or str(DEFAULT_DEEPSPEED_CONFIG)) if strategy.uses_deepspeed else None
    return RunConfig(
        model=ModelConfig(args.model_name_or_path, args.num_crops),
        precision=precision,
        strategy=strategy,
        lora=LoraSettings(args.lora_rank, args.lora_alpha_ratio, args.lora_dropout),
        data=_from_flags(DataConfig, args),
        training=_from_flags(
            TrainingConfig, args, weight_decay=args.wd, deepspeed_config=deepspeed, show_progress=args.tqdm,
            gradient_checkpointing=args.gradient_checkpointing == "on",
        ),
        evaluation=_from_flags(
            EvaluationConfig,
            args,
            batch_size=args.batch_size_per_gpu if args.eval_batch_size is None else args.eval_batch_size,
            skip_before=args.skip_eval_before,
            show_progress=args.tqdm,
        ),
        outputs=_from_flags(OutputConfig, args),
        task_options=_from_flags(task.options, args) if task and task.options else None,
        verbose=args.verbose,
        preview_samples=args.preview_samples,
        during_training=TrainingEvaluationConfig(
            args.eval_steps, args.eval_every_epoch, args.eval_during_training_samples, args.keep_best,
            args.early_stopping_patience,
        ),
    )


def _from_flags(piece: type, args: argparse.Namespace, **resolved):
    """A configuration piece: each field is the flag of the same name, unless `resolved` gives its value."""
    return piece(**{f.name: resolved[f.name] if f.name in resolved else getattr(args, f.name) for f in fields(piece)})


def deepspeed_config_problems(path: str) -> list[str]:
    """What makes a --deepspeed config unusable here. ZeRO-3 is refused: it shards the weights themselves, so
    evaluation by generation would need synced generation across ranks (which hangs when shards differ in
    length) and saving would need the stage-3 gather; the recipe trains with ZeRO-2."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return [f"--deepspeed {path} is not a readable JSON file: {error}"]
    stage = config.get("zero_optimization", {}).get("stage", 0) if isinstance(config, dict) else None
    if stage == 3:
        return [
            f"--deepspeed {path} asks for ZeRO stage 3, which is not supported: ZeRO-3 shards the weights, so "
            "evaluation would need synced generation (it hangs when ranks hold different numbers of samples) and "
            "saving a stage-3 gather; use ZeRO-2 (ds_configs/zero2.json, the recipe's) or stage 0/1"
        ]
    return []


def check_flags(args: argparse.Namespace, flag_problems: Callable[[argparse.Namespace], list[str]] | None = None) -> None:
    """The checks that need no library (values, combinations, files; the task's own rules), before any loads: one
    UsageError lists every problem they find. `resolve_run_config` repeats them with the ones that need torch (the
    batch size against the launched processes, the precision flags against the GPU)."""
    if problems := _problems(args, processes=None) + (flag_problems(args) if flag_problems else []):
        raise UsageError("invalid arguments:\n  " + "\n  ".join(problems))


def _task_problems(args: argparse.Namespace, task: Task | None) -> list[str]:
    return task.flag_problems(args) if task and task.flag_problems else []


def _problems(args: argparse.Namespace, processes: int | None) -> list[str]:
    """Every problem of the flags; `processes` None: not known yet (the batch size is checked with them)."""
    problems = []
    if not 1 <= args.num_crops <= 16:
        problems.append(f"--num_crops must be between 1 and 16, got {args.num_crops}")
    counts = (
        "batch_size", "batch_size_per_gpu", "num_train_epochs", "lora_rank", "logging_steps", "max_new_tokens",
        "eval_size",
    )
    if args.preview_samples is not None and args.preview_samples < 1:
        problems.append(f"--preview_samples must be at least 1, got {args.preview_samples}")
    for flag in counts:
        if getattr(args, flag) < 1:
            problems.append(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if (
        processes is not None and args.batch_size >= 1 and args.batch_size_per_gpu >= 1
        and args.batch_size % (processes * args.batch_size_per_gpu)
    ):
        problems.append(
            f"--batch_size {args.batch_size} must be divisible by processes ({processes}) x "
            f"--batch_size_per_gpu ({args.batch_size_per_gpu})"
        )
    if not 0 <= args.lora_dropout < 1:
        problems.append(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if args.lora_alpha_ratio <= 0:
        problems.append(f"--lora_alpha_ratio must be positive, got {args.lora_alpha_ratio}")
    if args.learning_rate <= 0:
        problems.append(f"--learning_rate must be positive, got {args.learning_rate}")
    for flag in ("save_steps", "warmup_steps"):
        if getattr(args, flag) < 0:
            problems.append(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if args.save_total_limit is not None and args.save_total_limit < 1:
        problems.append(f"--save_total_limit must be at least 1 (leave it out to keep every checkpoint), "
                        f"got {args.save_total_limit}")
    if args.dataloader_num_workers < 0:
        problems.append(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}")
    if args.max_packed_tokens is not None and not args.packing:
        problems.append("--max_packed_tokens only applies with --packing")
    for flag in ("max_length", "max_eval_samples", "max_packed_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            problems.append(f"--{flag} must be positive, got {getattr(args, flag)}")
    if args.eval_batch_size is not None and args.eval_batch_size < 1:
        problems.append(f"--eval_batch_size must be at least 1, got {args.eval_batch_size}")
    problems += _training_evaluation_problems(args)
    use_lora = args.use_lora or args.use_qlora
    if use_lora and args.deepspeed:
        problems.append("--deepspeed is for full finetuning; LoRA/QLoRA train with DDP")
    if args.merge and not use_lora:
        problems.append("--merge only applies to LoRA/QLoRA runs (full finetuning already saves a full model)")
    problems.extend(_data_source_problems(args))
    problems.extend(_hub_problems(args))
    for flag in ("dataset_path", "data_dir", "deepspeed"):
        path = getattr(args, flag)
        if path and not os.path.exists(path):
            problems.append(f"--{flag} {path} does not exist")
    if args.deepspeed and os.path.isfile(args.deepspeed):
        problems.extend(deepspeed_config_problems(args.deepspeed))
    if (
        args.resume_from_checkpoint not in (None, RESUME_LATEST)
        and not os.path.isdir(args.resume_from_checkpoint)
    ):
        problems.append(f"--resume_from_checkpoint {args.resume_from_checkpoint} is not a folder")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        problems.append(f"--output_dir {args.output_dir} is a file, not a folder: give a folder path")
    if problem := _model_path_problem(args.model_name_or_path):
        problems.append(problem)
    return problems


def _hub_problems(args: argparse.Namespace) -> list[str]:
    """--push_to_hub needs the hub and a token, found before training rather than at the first push."""
    if not args.push_to_hub:
        return ["--hub_model_id only applies with --push_to_hub"] if args.hub_model_id else []
    from huggingface_hub import constants, get_token  # imported only here: --help stays light

    problems = []
    if constants.HF_HUB_OFFLINE:
        problems.append("--push_to_hub needs the hub, but HF_HUB_OFFLINE is set")
    if get_token() is None:
        problems.append("--push_to_hub needs a Hugging Face token: log in with `hf auth login` or set HF_TOKEN")
    return problems


def _data_source_problems(args: argparse.Namespace) -> list[str]:
    """At most one data source; --eval_file goes with --train_file, --image_folder with custom data."""
    problems = []
    given = [flag for flag in ("dataset_path", "data_dir", "train_file") if getattr(args, flag)]
    if len(given) > 1:
        problems.append(f"give one data source, not {' and '.join('--' + flag for flag in given)}: --dataset_path "
                        "(a copy of the task's dataset, or a chat-messages dataset), --data_dir (a folder of "
                        "conversation files) or --train_file (one conversation file)")
    if args.eval_file and not args.train_file:
        problems.append(f"--eval_file needs --train_file (in a --data_dir, {EVALUATION_RULE})")
    if args.image_folder and not given:
        problems.append("--image_folder applies to custom data: give --data_dir, --train_file or --dataset_path")
    for flag in ("train_file", "eval_file"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            problems.append(f"--{flag} {path} is not a file")
    if args.image_folder and not os.path.isdir(args.image_folder):
        problems.append(f"--image_folder {args.image_folder} is not a folder")
    return problems


def _training_evaluation_problems(args: argparse.Namespace) -> list[str]:
    problems = []
    if args.eval_steps < 0:
        problems.append(f"--eval_steps must be >= 0, got {args.eval_steps}")
    for flag in ("eval_during_training_samples", "early_stopping_patience"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            problems.append(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    evaluates = args.eval_steps > 0 or args.eval_every_epoch
    for flag, given in (("keep_best", args.keep_best), ("early_stopping_patience", args.early_stopping_patience),
                        ("eval_during_training_samples", args.eval_during_training_samples)):
        if given is not None and given is not False and not evaluates:
            problems.append(f"--{flag} needs evaluations during training: add --eval_steps N or --eval_every_epoch")
    return problems


# A hub model id: `name` or `namespace/name`, letters, digits and - _ . only (huggingface_hub's rule).
_HUB_ID = re.compile(r"^(?:[\w\-.]+/)?[\w\-.]+$")


def _model_path_problem(path: str) -> str | None:
    """A local folder must hold a checkpoint; anything else must at least look like a hub id."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            return f"--model_name_or_path {path} is a folder without config.json: give a checkpoint folder"
        return None
    looks_like_a_path = path.startswith((".", "/", "~")) or path.endswith("/") or os.path.exists(path)
    if looks_like_a_path or not _HUB_ID.match(path) or ".." in path:
        return (
            f"--model_name_or_path {path} is not a folder (check the path) nor a hub model id such as "
            "microsoft/Phi-3.5-vision-instruct"
        )
    return None
