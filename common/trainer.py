"""The Trainer of every run: the resumable Trainer (common/checkpoints.py), stopped by a non-finite loss, and
its training state released before the final evaluation.

A NaN/inf loss never recovers: fp16 overflow in the forward pass or a too-high learning rate. The Trainer
would log it as the running mean (0.0 when the first steps overflow) and carry on; here the run stops at
that step with the advice. After training, full finetuning would otherwise keep DeepSpeed's engine, its
fp32 master weights, Adam moments and gradient buffers (~50 GB on one GPU for Phi-3.5-vision) allocated
through the evaluation that follows.

Two gaps of the libraries are closed here. accelerate ignores fp16 mixed precision on the CPU (it trains in fp32
without a word): the run gets torch's CPU autocast and loss scaling instead, as on a GPU. DeepSpeed trains a
bf16/fp16 copy of the weights (the fp32 masters live in its optimizer), which the Trainer would save: every save
writes the master weights in the dtype the model was loaded in, frozen weights as they were loaded.
"""

from __future__ import annotations

import gc
import itertools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from .checkpoints import ResumableTrainer
from .data import SampleDataset
from .distributed import ONE_PROCESS, Distributed
from .errors import UserError
from .phi3v.loss import samples_in_batch

DEEPSPEED_MODULE_HOOKS = ("module_forward_pre_hook", "module_forward_post_hook", "first_dataloader_check")


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite: the run stops with the message (exit 1)."""


class FinetuningTrainer(ResumableTrainer):
    """`task_evaluation`: model -> {"eval_<metric>": score}, what `evaluate` runs when a callback asks for an
    evaluation during training (common/training_evaluation.py); the Trainer's loss evaluation is never used."""

    def __init__(self, *args, task_evaluation: Callable[[torch.nn.Module], dict[str, float]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.task_evaluation = task_evaluation
        self.load_dtype = next(self.model.parameters()).dtype  # before DeepSpeed casts them to its training dtype
        half = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        self.deepspeed_casts_weights = self.is_deepspeed_enabled and half not in (None, self.load_dtype)
        # DeepSpeed keeps no fp32 copy of the weights that do not train (frozen vision): the saving rank keeps them
        # here, on the host
        self.frozen_weights = {
            name: parameter.detach().to("cpu", copy=True)
            for name, parameter in self.model.named_parameters() if not parameter.requires_grad
        } if self.deepspeed_casts_weights and self.args.should_save else {}
        if self.args.fp16 and self.accelerator.device.type == "cpu" and not self.accelerator.native_amp:
            enable_cpu_fp16(self.accelerator)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Every rank calls it (final save and checkpoints); the weights are saved in the dtype they loaded in."""
        with self.weights_in_load_dtype():
            super().save_model(output_dir, _internal_call)

    @contextmanager
    def weights_in_load_dtype(self) -> Iterator[None]:
        """Within: on the saving rank, DeepSpeed's half-precision training weights replaced by the master weights
        (the frozen ones as loaded) in the load dtype, on the host; afterwards the training copy is back. Every rank
        must enter it: each master is gathered from the ranks' ZeRO partitions."""
        if not self.deepspeed_casts_weights or self.model_wrapped is self.model:  # not (yet) under DeepSpeed
            yield
            return
        from deepspeed.utils import safe_get_full_fp32_param

        training_copy = {}
        for name, parameter in self.model.named_parameters():
            master = safe_get_full_fp32_param(parameter) if parameter.requires_grad else self.frozen_weights.get(name)
            if self.args.should_save:
                training_copy[parameter] = parameter.data
                parameter.data = master.to("cpu", self.load_dtype)
        try:
            yield
        finally:
            for parameter, data in training_copy.items():
                parameter.data = data

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        if self.task_evaluation is None:
            raise RuntimeError("evaluation during training needs FinetuningTrainer(task_evaluation=...)")
        metrics = self.task_evaluation(self.model)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        self.check_finite(model, result[0] if return_outputs else result)
        return result

    def check_finite(self, model, loss: torch.Tensor) -> None:
        """Stop the run at a NaN or infinite training loss (NonFiniteLossError, with the advice)."""
        if model.training and not torch.isfinite(loss.detach()).all():
            raise NonFiniteLossError(self._non_finite_message(loss.detach().float().sum().item()))

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The optimizer step's micro-batches, and the divisor of the model's loss: the step's samples on all
        processes (transformers counts label tokens instead). Each sample then weighs the same in the step (its
        mean token loss), as in the recipe's one-sample micro-batches, whatever the micro-batch size, gradient
        accumulation, packing or number of processes."""
        batches = list(itertools.islice(epoch_iterator, num_batches))
        if not batches or "labels" not in batches[0]:
            return batches, None
        count = sum(samples_in_batch(batch["labels"], batch.get("position_ids")) for batch in batches)
        return batches, torch.tensor(sum(self.distributed.gather(count)), device=device)

    def _non_finite_message(self, value: float) -> str:
        step = self.state.global_step + 1
        total = f" of {self.state.max_steps}" if self.state.max_steps > 0 else ""
        mode = "fp16 mixed precision" if self.args.fp16 else "bf16" if self.args.bf16 else "fp32"
        advice = "train with --bf16 (Ampere or newer GPUs) or a lower --learning_rate" if self.args.fp16 else (
            "train with a lower --learning_rate"
        )
        kind = "NaN" if math.isnan(value) else "infinite"
        return (
            f"the training loss became {kind} at optimizer step {step}{total} ({mode}, learning rate "
            f"{self.args.learning_rate:g}): the numbers overflowed or diverged and the run cannot recover; {advice}"
        )


class DrawEpochCallback(TrainerCallback):
    """Tells the training dataset the epoch before the epoch's data-loader workers start (they copy the
    dataset when an epoch's iteration begins; persistent workers would keep a stale copy, so the training
    arguments leave them off). accelerate forwards `set_epoch` to the dataset only when the sampler has none,
    which is not so in multi-process runs, hence this callback. The Trainer's `state.epoch` is the whole
    number of finished epochs when an epoch begins, also after resuming mid-epoch."""

    def __init__(self, dataset: SampleDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(math.floor(state.epoch or 0))


def enable_cpu_fp16(accelerator) -> None:
    """fp16 autocast and loss scaling on the CPU, which accelerate leaves off (it only sets them up on accelerators):
    the Trainer's forward passes run under `accelerator.autocast`, and its backward, gradient clipping,
    optimizer step and checkpoints (scaler.pt) use `accelerator.scaler`, as on a GPU."""
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu")


def make_trainer(model, processor, train_args: TrainingArguments, dataset, collator,
                 keep_checkpoints: int | None = None, callbacks=(), distributed: Distributed = ONE_PROCESS,
                 task_evaluation: Callable[[torch.nn.Module], dict[str, float]] | None = None,
                 trainer_class: type[FinetuningTrainer] = FinetuningTrainer, **trainer_options) -> FinetuningTrainer:
    """The Trainer of a run and of the benchmark's workers, with the run's collator (`train_collator`); the
    dataset draws anew every epoch. `trainer_class` and its own `trainer_options`: another objective's Trainer
    (common/preference/trainer.py)."""
    return trainer_class(
        model=model,
        args=train_args,
        data_collator=collator,
        train_dataset=dataset,
        processing_class=processor,  # saved with the model and in every checkpoint
        callbacks=[DrawEpochCallback(dataset), *callbacks],
        keep_checkpoints=keep_checkpoints,
        distributed=distributed,
        task_evaluation=task_evaluation,
        **trainer_options,
    )


def release_training_state(trainer: Trainer) -> torch.nn.Module:
    """Free what only training needs — the DeepSpeed engine (its hooks, fp32 master weights, optimizer state
    and gradient buffers), the optimizer, the scheduler and the gradients — and return the bare model.
    The trainer must not be used for training afterwards."""
    wrapper = trainer.model_wrapped
    model = trainer.accelerator.unwrap_model(wrapper, keep_fp32_wrapper=False)
    trainer.accelerator.free_memory()  # destroys the DeepSpeed engine, drops accelerate's references
    # DeepSpeed's destroy() leaves the engine's hooks on the module, which keep the engine (and through it
    # the ZeRO optimizer) alive as long as the model.
    for hook in DEEPSPEED_MODULE_HOOKS:
        if (handle := getattr(wrapper, hook, None)) is not None:
            handle.remove()
    del wrapper
    trainer.optimizer = trainer.lr_scheduler = None
    trainer.callback_handler.optimizer = trainer.callback_handler.lr_scheduler = None
    trainer.model_wrapped = trainer.model = trainer.callback_handler.model = model
    if hasattr(trainer, "deepspeed"):
        trainer.deepspeed = None
    model.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return model
