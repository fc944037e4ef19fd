"""common/trainer.py: a non-finite loss stops the run at its step with the advice; the training state is freed
before the final evaluation. On the tiny model, one process on CPU; the DeepSpeed release in its own process."""

import gc
import subprocess
import sys
import weakref

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from common.arguments import build_parser, resolve_run_config
from common.collators import Phi3VTrainCollator
from common.data import Sample, SampleDataset, Turn
from common.distributed import ONE_PROCESS, Distributed
from common.model_loading import build_model
from common.trainer import FinetuningTrainer, NonFiniteLossError, release_training_state
from common.training_arguments import training_arguments


def samples(count: int) -> SampleDataset:
    colours = ["red", "green", "blue"]
    rows = [
        Sample(str(i), [Turn("Which colour?", colours[i % 3], [Image.new("RGB", (64, 48), colours[i % 3])])])
        for i in range(count)
    ]
    return SampleDataset(rows, lambda sample, index, draws: sample)


def make(tiny_model_dir, tmp_path, *flags: str, distributed: Distributed | None = None) -> FinetuningTrainer:
    """A LoRA trainer on 6 samples (full finetuning with --full), on CPU; `distributed` defaults to one process."""
    full = "--full" in flags
    config = resolve_run_config(build_parser("test").parse_args([
        "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path), *([] if full else ["--use_lora"]),
        "--lora_rank", "4", "--batch_size", "2", "--batch_size_per_gpu", "2", "--num_crops", "1",
        "--warmup_steps", "0", "--dataloader_num_workers", "0", "--logging_steps", "1", "--no-tqdm",
        *(flag for flag in flags if flag != "--full"),
    ]), distributed=ONE_PROCESS)
    distributed = distributed or ONE_PROCESS
    processor = AutoProcessor.from_pretrained(tiny_model_dir, num_crops=1)
    model = build_model(config.model.name_or_path, config.strategy, config.lora, config.precision, distributed.device)
    train_args = training_arguments(config.training, config.outputs, config.strategy, config.precision, distributed)
    return FinetuningTrainer(
        model=model, args=train_args, train_dataset=samples(6), data_collator=Phi3VTrainCollator(processor)
    )


def test_a_nan_loss_stops_the_run_naming_the_step_and_the_advice(tiny_model_dir, tmp_path):
    trainer = make(tiny_model_dir, tmp_path, "--max_steps", "3")
    assert trainer.args.logging_nan_inf_filter is False  # never logged as the running mean
    base = trainer.model.get_base_model()
    calls = []

    def poison_second_step(module, args, output):
        calls.append(1)
        return output * float("nan") if len(calls) == 2 else output

    base.lm_head.register_forward_hook(poison_second_step)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    message = str(info.value)
    assert "NaN" in message and "optimizer step 2 of 3" in message
    assert "--learning_rate" in message
    assert trainer.state.global_step == 1  # stopped before an update with the NaN


def test_fp16_advice_names_bf16(tiny_model_dir, tmp_path):
    trainer = make(tiny_model_dir, tmp_path, "--max_steps", "1")
    trainer.args.fp16 = True  # what a GPU without --bf16 runs; only the message is under test
    message = trainer._non_finite_message(float("inf"))
    assert "infinite" in message and "--bf16" in message and "fp16 mixed precision" in message


def test_release_frees_optimizer_scheduler_and_gradients(tiny_model_dir, tmp_path):
    trainer = make(tiny_model_dir, tmp_path, "--max_steps", "1")
    trainer.train()
    optimizer = weakref.ref(trainer.optimizer)
    model = trainer.model
    for parameter in model.parameters():  # as if the last backward had left gradients behind
        if parameter.requires_grad:
            parameter.grad = torch.ones_like(parameter)

    released = release_training_state(trainer)
    gc.collect()
    assert released is model
    assert optimizer() is None, "the optimizer (and its Adam moments) is still referenced"
    assert trainer.optimizer is None and trainer.lr_scheduler is None
    assert all(parameter.grad is None for parameter in released.parameters())
    assert not trainer.accelerator._optimizers and not trainer.accelerator._models


DEEPSPEED_RELEASE = """
import gc, sys, tempfile, weakref
from pathlib import Path
from tests.common.test_trainer import make
from common.distributed import start_distributed
from common.trainer import release_training_state

trainer = make(Path(sys.argv[1]), Path(tempfile.mkdtemp()), "--max_steps", "1", "--full",
               distributed=start_distributed(uses_deepspeed=True))
trainer.train()
engine, zero = weakref.ref(trainer.model_wrapped), weakref.ref(trainer.model_wrapped.optimizer)
assert type(engine()).__name__ == "DeepSpeedEngine", type(engine())
model = release_training_state(trainer)
gc.collect()
assert engine() is None, "the DeepSpeed engine is still referenced"
assert zero() is None, "the ZeRO optimizer (fp32 master weights, Adam moments) is still referenced"
assert all(p.grad is None for p in model.parameters())
print("released")
"""


def test_release_frees_the_deepspeed_engine_and_zero_optimizer(tiny_model_dir):
    """Full finetuning under ZeRO-2 (own process: DeepSpeed starts a process group)."""
    from tests.scripts.e2e import REPO_ROOT, script_env

    run = subprocess.run(
        [sys.executable, "-c", DEEPSPEED_RELEASE, str(tiny_model_dir)], cwd=REPO_ROOT, env=script_env(),
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0 and "released" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
