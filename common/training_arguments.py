"""The Trainer's arguments for a run: the recipe's hyperparameters, and the process group DeepSpeed needs.

Gradient accumulation makes up the global batch; full finetuning (all weights or a frozen vision tower)
runs under DeepSpeed ZeRO-2 with `ds_configs/zero2.json` unless `--deepspeed` names another config.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import TrainingArguments

from .arguments import world_size
from .precision import Precision
from .strategy import TrainingStrategy

DEFAULT_DEEPSPEED_CONFIG = Path(__file__).resolve().parent.parent / "ds_configs" / "zero2.json"


def _single_process_rendezvous() -> None:
    """`python SCRIPT` (no torchrun) is a world of one process on a free local port: DeepSpeed needs a process
    group even then (it would look for MPI), and on a machine with several GPUs the Trainer would otherwise
    wrap the model in nn.DataParallel, which splits pixel_values apart from their prompts."""
    if "RANK" in os.environ:
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _prefetch_factor(accumulation: int, workers: int) -> int | None:
    """The Trainer fetches all micro-batches of an optimizer step before computing any, so the workers must
    hold a whole step ready or the GPU waits for data at every step (capped: each batch can be ~25 MB)."""
    return min(8, max(2, math.ceil(accumulation / workers))) if workers else None


def _cpu_deepspeed_state() -> dict:
    """Without a GPU, accelerate starts DeepSpeed's process group with no backend of its own and counts one
    process, so under torchrun every rank would train alone (and DeepSpeed rejects the batch size). Set the
    state up on gloo first and have TrainingArguments use it; GPU runs never come here."""
    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what TrainingArguments sets while it builds the state
    try:
        PartialState(backend="gloo")
    finally:
        if previous is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous
    return {"use_configured_state": True}


def training_arguments(
    args, strategy: TrainingStrategy, precision: Precision, has_text_only_samples: bool = False
) -> TrainingArguments:
    """The recipe's hyperparameters; gradient accumulation makes up the global batch size.

    `has_text_only_samples`: a micro-batch without images leaves the vision adapters without gradients, which
    DDP must then look for (LoRA); DeepSpeed handles such parameters itself.
    """
    accumulation = args.batch_size // (world_size() * args.batch_size_per_gpu)
    deepspeed = (args.deepspeed or str(DEFAULT_DEEPSPEED_CONFIG)) if strategy.uses_deepspeed else None
    accelerator_config = None
    if deepspeed or torch.cuda.is_available():
        _single_process_rendezvous()
    if deepspeed and not torch.cuda.is_available():
        accelerator_config = _cpu_deepspeed_state()
    saving = {"save_strategy": "steps", "save_steps": args.save_steps} if args.save_steps else {"save_strategy": "no"}
    return TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size_per_gpu,
        gradient_accumulation_steps=accumulation,
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": False},
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-7,
        learning_rate=args.learning_rate,
        weight_decay=args.wd,
        max_grad_norm=1.0,
        lr_scheduler_type="linear",
        warmup_steps=args.warmup_steps,
        logging_steps=args.logging_steps,
        logging_first_step=True,  # so every run's training-curve picture has a point
        **saving,
        save_total_limit=args.save_total_limit,
        bf16=precision.bf16,
        fp16=precision.fp16,
        remove_unused_columns=False,
        report_to=args.report_to,
        deepspeed=deepspeed,
        disable_tqdm=not args.tqdm,
        dataloader_num_workers=args.dataloader_num_workers,
        dataloader_prefetch_factor=_prefetch_factor(accumulation, args.dataloader_num_workers),
        ddp_find_unused_parameters=strategy.lora and has_text_only_samples,
        seed=args.seed,
        accelerator_config=accelerator_config,
    )
