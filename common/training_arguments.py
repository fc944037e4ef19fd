"""The Trainer's arguments for a run: the recipe's hyperparameters on the run's processes.

Gradient accumulation makes up the global batch; full finetuning (all weights or a frozen vision tower)
runs under DeepSpeed ZeRO-2 with the config the run resolved (`ds_configs/zero2.json` by default).
Building them has no side effects beyond what accelerate does: the environment was prepared by
`Distributed.started` (common/distributed.py).
"""

from __future__ import annotations

import math

from transformers import TrainingArguments

from .config import OutputConfig, TrainingConfig
from .distributed import Distributed
from .precision import Precision
from .strategy import TrainingStrategy


def _prefetch_factor(accumulation: int, workers: int) -> int | None:
    """The Trainer fetches all micro-batches of an optimizer step before computing any, so the workers must
    hold a whole step ready or the GPU waits for data at every step (capped: each batch can be ~25 MB)."""
    return min(8, max(2, math.ceil(accumulation / workers))) if workers else None


def training_arguments(
    training: TrainingConfig,
    outputs: OutputConfig,
    strategy: TrainingStrategy,
    precision: Precision,
    distributed: Distributed,
    has_text_only_samples: bool = False,
    prefetch_factor: int | None = None,
) -> TrainingArguments:
    """The recipe's hyperparameters; gradient accumulation makes up the global batch size.

    `has_text_only_samples`: a micro-batch without images leaves the vision adapters without gradients, which
    DDP must then look for (LoRA); DeepSpeed handles such parameters itself. `prefetch_factor` overrides the
    default of an optimizer step ahead (the benchmark's experiments).
    """
    accumulation = training.batch_size // (distributed.world_size * training.batch_size_per_gpu)
    workers = training.dataloader_num_workers
    saving = (
        {"save_strategy": "steps", "save_steps": outputs.save_steps} if outputs.save_steps else {"save_strategy": "no"}
    )
    return TrainingArguments(
        output_dir=outputs.output_dir,
        num_train_epochs=training.num_train_epochs,
        max_steps=training.max_steps,
        per_device_train_batch_size=training.batch_size_per_gpu,
        gradient_accumulation_steps=accumulation,
        activation_checkpointing=training.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if training.gradient_checkpointing else None,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-7,
        learning_rate=training.learning_rate,
        weight_decay=training.weight_decay,
        max_grad_norm=1.0,
        lr_scheduler_type="linear",
        warmup_steps=training.warmup_steps,
        logging_steps=training.logging_steps,
        logging_first_step=True,  # so every run's training-curve picture has a point
        **saving,  # --save_total_limit is kept by ResumableTrainer, once the newest checkpoint is complete
        bf16=precision.bf16,
        fp16=precision.fp16,
        use_cpu=distributed.device.type == "cpu",  # else the Trainer refuses bf16 without a GPU
        remove_unused_columns=False,
        report_to=training.report_to,
        deepspeed=training.deepspeed_config,
        disable_tqdm=not training.show_progress,
        dataloader_num_workers=workers,
        dataloader_prefetch_factor=(prefetch_factor if workers else None) or _prefetch_factor(accumulation, workers),
        ddp_find_unused_parameters=strategy.lora and has_text_only_samples,
        seed=training.seed,
        logging_nan_inf_filter=False,  # a NaN/inf loss stops the run (FinetuningTrainer); never log it as the mean
        accelerator_config={"use_configured_state": True} if distributed.accelerate_state_configured else None,
        push_to_hub=outputs.push_to_hub,
        hub_model_id=outputs.hub_model_id,
    )
