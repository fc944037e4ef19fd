"""The Trainer's arguments: the recipe's hyperparameters, accumulation up to the global batch, checkpoints.

Only LoRA arguments are built here: full finetuning's DeepSpeed path starts a process group, which the
end-to-end tests exercise in their own processes (tests/scripts)."""

import os

import pytest
import torch

from common.arguments import build_parser, resolve_run_config
from common.distributed import Distributed
from common.training_arguments import _prefetch_factor, training_arguments


def lora_arguments(tmp_path, *flags: str, has_text_only_samples: bool = False, world: int = 1):
    args = build_parser("test").parse_args(["--output_dir", str(tmp_path), "--use_lora", *flags])
    distributed = Distributed(rank=0, local_rank=0, world_size=world, local_world_size=world, device=torch.device("cpu"))
    config = resolve_run_config(args, distributed=distributed)
    return training_arguments(
        config.training, config.outputs, config.strategy, config.precision, distributed, has_text_only_samples
    )


def test_the_recipes_hyperparameters(tmp_path):
    train_args = lora_arguments(tmp_path, "--learning_rate", "2e-4", "--wd", "0.1")
    assert (train_args.adam_beta1, train_args.adam_beta2, train_args.adam_epsilon) == (0.9, 0.95, 1e-7)
    assert (train_args.learning_rate, train_args.weight_decay, train_args.max_grad_norm) == (2e-4, 0.1, 1.0)
    assert train_args.lr_scheduler_type == "linear" and train_args.warmup_steps == 50
    assert train_args.activation_checkpointing and train_args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert train_args.deepspeed is None  # adapters train under DDP
    assert train_args.logging_first_step  # every run's curve picture has a point
    assert train_args.logging_nan_inf_filter is False  # a NaN loss stops the run; never logged as the mean


@pytest.mark.parametrize("world, per_gpu, accumulation", [(1, 1, 16), (4, 1, 4), (4, 2, 2), (2, 8, 1)])
def test_accumulation_makes_up_the_global_batch(tmp_path, world, per_gpu, accumulation):
    train_args = lora_arguments(tmp_path, "--batch_size", "16", "--batch_size_per_gpu", str(per_gpu), world=world)
    assert train_args.gradient_accumulation_steps == accumulation
    assert train_args.per_device_train_batch_size == per_gpu


def test_checkpoints_only_when_asked(tmp_path):
    assert lora_arguments(tmp_path).save_strategy == "no"
    saving = lora_arguments(tmp_path, "--save_steps", "7", "--save_total_limit", "2")
    assert (saving.save_strategy, saving.save_steps) == ("steps", 7)
    # the Trainer would delete old checkpoints before the new one is complete: ResumableTrainer keeps them
    assert saving.save_total_limit is None


def test_push_to_hub_reaches_the_trainer(tmp_path, monkeypatch):
    assert lora_arguments(tmp_path).push_to_hub is False
    monkeypatch.setenv("HF_TOKEN", "hf_test")  # the flag's checks need a token and the hub (not contacted here)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    pushing = lora_arguments(tmp_path, "--push_to_hub", "--hub_model_id", "me/phi35v-memes")
    assert (pushing.push_to_hub, pushing.hub_model_id, pushing.hub_strategy) == (True, "me/phi35v-memes", "every_save")


def test_ddp_looks_for_unused_parameters_only_when_batches_may_lack_images(tmp_path):
    assert lora_arguments(tmp_path).ddp_find_unused_parameters is False
    assert lora_arguments(tmp_path, has_text_only_samples=True).ddp_find_unused_parameters is True


@pytest.mark.parametrize("accumulation, workers, factor", [(16, 4, 4), (1, 4, 2), (64, 4, 8), (3, 0, None)])
def test_workers_prefetch_an_optimizer_step(accumulation, workers, factor):
    assert _prefetch_factor(accumulation, workers) == factor


def test_building_them_leaves_the_environment_alone(tmp_path):
    before = dict(os.environ)
    lora_arguments(tmp_path)
    assert dict(os.environ) == before


def test_gradient_checkpointing_off(tmp_path):
    assert not lora_arguments(tmp_path, "--gradient_checkpointing", "off").activation_checkpointing
