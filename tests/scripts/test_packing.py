"""One result whatever the batching: runs over the same samples end with the same weights whether their
micro-batches hold 1, 2 or 8 samples, packed (--packing) or padded, in one or two processes, under LoRA (DDP)
and full finetuning (DeepSpeed ZeRO-2); a resumed packed run ends where the uninterrupted one ends.

The data mixes text-only, one-image, two-image and multi-turn samples of very different lengths, on both sides
of the tiny model's `original_max_position_embeddings` (512 here, so that the su rope switch is crossed):
batch-mates would otherwise change a sample's rotary scaling and its weight in the loss."""

import shutil

import pytest
import torch

from common.tiny_model import write_tiny_phi3v
from tests.scripts.e2e import (
    COLOUR_QUESTION,
    SCRIPTS,
    STRATEGIES,
    colour_image,
    fast_args,
    finish,
    free_port,
    tensors,
    torchrun,
    write_generic,
)

SCRIPT = SCRIPTS["ucf101"]  # the generic format, any conversation
WEIGHTS = {"full": "model.safetensors", "lora": "adapter_model.safetensors"}
TOLERANCE = 1e-4  # relative norm of the difference of the trained weights (float rounding)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_phi3v(tmp_path_factory.mktemp("short_rope") / "model", original_max_position_embeddings=512)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 training samples of 20 to ~700 tokens at 1 crop (an image is 313 tokens), one evaluation sample."""
    images = {f"{colour}-{index}.png": colour_image(colour, (40 + 30 * index, 40))
              for index, colour in enumerate(["red", "green", "blue", "red", "green", "blue"])}
    names = sorted(images)
    one = lambda image, answer: {"images": [image], "user": COLOUR_QUESTION, "assistant": answer}  # noqa: E731
    text = lambda user, answer: {"user": user, "assistant": answer}  # noqa: E731
    conversations = [
        [text("Name a colour.", "blue")],
        [one(names[0], "blue")],
        [{"images": names[1:3], "user": "Which colours are these, left to right?", "assistant": "green and green"}],
        [one(names[3], "green"), text("Are you sure? Answer yes or no.", "yes, quite sure")],
        [text("What is two plus two? Answer with a word.", "four")],
        [{"images": names[3:6], "user": "Name the three colours.", "assistant": "green, red and red"}],
        [one(names[4], "red"), text("And the next one?", "blue"), text("Thank you.", "You are welcome.")],
        [one(names[5], "red")],
    ]
    splits = {
        "train": [{"id": f"train-{i}", "conversations": turns} for i, turns in enumerate(conversations)],
        "val": [{"id": "val-0", "conversations": [one(names[0], "blue")]}],
    }
    return write_generic(tmp_path_factory.mktemp("mixed") / "data", splits, images)


def args_for(model_dir, output_dir, data, strategy: str, per_gpu: int, *extra):
    # 2 optimizer steps of all 8 samples
    return fast_args(model_dir, output_dir, "--data_dir", data, "--batch_size", "8", "--batch_size_per_gpu",
                     str(per_gpu), "--skip_eval_before", "--max_eval_samples", "1", *STRATEGIES[strategy],
                     *map(str, extra))


def assert_same_weights(output_dirs: dict, strategy: str) -> None:
    (reference_name, reference_dir), *others = output_dirs.items()
    expected = tensors(reference_dir / WEIGHTS[strategy])
    base = tensors(model_dir_of(reference_dir) / "model.safetensors") if strategy == "full" else None
    for name, output_dir in others:
        actual = tensors(output_dir / WEIGHTS[strategy])
        assert actual.keys() == expected.keys()
        change = difference = 0.0
        for key, value in expected.items():
            difference += float((actual[key].double() - value.double()).norm() ** 2)
            moved = value.double() - (base[key].double() if base is not None else 0)
            change += float(moved.norm() ** 2)
        assert change > 0, "nothing was trained"
        relative = (difference / change) ** 0.5
        assert relative < TOLERANCE, f"{name} vs {reference_name}: relative difference {relative:.2e}"


def model_dir_of(output_dir):
    return output_dir.parent / "base"


def run(launcher, root, name, model_dir, data, strategy, per_gpu, *extra):
    output_dir = root / name
    launcher.run(SCRIPT, args_for(model_dir, output_dir, data, strategy, per_gpu, *extra)).check()
    return output_dir


def test_lora_micro_batches_of_1_2_and_8_padded_and_packed_end_with_the_same_weights(launcher, model_dir, data,
                                                                                       tmp_path):
    runs = {
        "1 padded": (1,),
        "8 padded": (8,),
        "8 packed in rows of 1000 tokens": (8, "--packing", "--max_packed_tokens", "1000"),
        "2 packed": (2, "--packing"),
    }
    jobs = {name: (SCRIPT, args_for(model_dir, tmp_path / str(i), data, "lora", *flags))
            for i, (name, (*flags,)) in enumerate(runs.items())}
    results = launcher.run_many(jobs)
    for result in results.values():
        result.check()
    assert_same_weights({name: tmp_path / str(i) for i, name in enumerate(runs)}, "lora")


def test_zero2_in_two_processes_packed_ends_as_one_process_one_sample_at_a_time(launcher, model_dir, data, tmp_path):
    shutil.copytree(model_dir, tmp_path / "base")
    one = run(launcher, tmp_path, "one", model_dir, data, "full", 1)
    two = tmp_path / "two"
    args = args_for(model_dir, two, data, "full", 2, "--packing")
    finish(torchrun(SCRIPT, args, "--nproc_per_node=2", f"--master_port={free_port()}", cwd=tmp_path)).check()
    assert_same_weights({"1 process, 1 sample per micro-batch": one, "2 processes, 2 packed": two}, "full")


@pytest.mark.slow
@pytest.mark.parametrize("per_gpu", [2, 8])
def test_zero2_padded_and_packed_micro_batches_end_with_the_same_weights(launcher, model_dir, data, tmp_path, per_gpu):
    shutil.copytree(model_dir, tmp_path / "base")
    runs = {"1 padded": (1,), f"{per_gpu} padded": (per_gpu,), f"{per_gpu} packed": (per_gpu, "--packing")}
    dirs = {name: run(launcher, tmp_path, str(i), model_dir, data, "full", *flags)
            for i, (name, flags) in enumerate(runs.items())}
    assert_same_weights(dirs, "full")


@pytest.mark.slow
def test_lora_in_two_processes_packed_ends_as_one_process_padded(launcher, model_dir, data, tmp_path):
    one = run(launcher, tmp_path, "one", model_dir, data, "lora", 8)
    two = tmp_path / "two"
    args = args_for(model_dir, two, data, "lora", 1, "--packing")
    finish(torchrun(SCRIPT, args, "--nproc_per_node=2", f"--master_port={free_port()}", cwd=tmp_path)).check()
    assert_same_weights({"1 process, 8 padded": one, "2 processes, 1 packed": two}, "lora")


def test_resumed_packed_run_equals_the_uninterrupted_one(launcher, model_dir, data, tmp_path):
    whole = run(launcher, tmp_path, "whole", model_dir, data, "lora", 2, "--packing", "--save_steps", "1")
    resumed = run(launcher, tmp_path, "resumed", model_dir, data, "lora", 2, "--packing",
                  "--resume_from_checkpoint", whole / "checkpoint-1")
    expected, actual = tensors(whole / WEIGHTS["lora"]), tensors(resumed / WEIGHTS["lora"])
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-6, msg=key)
