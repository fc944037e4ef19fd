"""The precision configurations of GPU runs, run on the CPU: `--bf16` for every strategy, bf16-loaded weights
(`--dtype bfloat16`), fp16 mixed precision with loss scaling (`--fp16`, LoRA and QLoRA), two-process ZeRO-2, and a
resume from a bf16 checkpoint. Each run ends with both evaluations (and evaluates during training, under its
precision); its training loss differs from the fp32 run's (the precision is really on) and stays close to it; what
it saves is in the dtype the weights loaded in; and predict.py with the same flags answers as its evaluation after
training did.

Fast (about 40 s): full finetuning under ZeRO-2 with --bf16 (DeepSpeed trains a bf16 copy, the fp32 masters are
saved), QLoRA with --bf16 (fp16 4-bit compute under bf16 autocast) and LoRA with --fp16 (loss scaling on the CPU).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.scripts.e2e import (
    SCRIPTS,
    STRATEGIES,
    assert_finished_run,
    colour_task,
    fast_args,
    finish,
    free_port,
    read_eval,
    tensors,
    torchrun,
)
from tests.scripts.test_predict import assert_equals_eval_after, predict

SCRIPT = SCRIPTS["hateful_memes"]  # trains on the generic format (--data_dir); its metric: accuracy
NUM_EVAL = 5
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16}
MODES = {"--bf16": "bf16 autocast", "--fp16": "fp16 mixed precision (loss scaling)"}


def name_of(strategy: str, flags, processes: int) -> str:
    return "-".join([strategy, *(flag.strip("-") for flag in flags), *([f"{processes}-processes"] * (processes > 1))])


def config(strategy: str, *flags: str, fast: bool = False, processes: int = 1):
    marks = () if fast else (pytest.mark.slow,)
    return pytest.param((strategy, list(flags), processes), id=name_of(strategy, flags, processes), marks=marks)


CONFIGS = [
    config("full", "--bf16", fast=True),
    config("frozen", "--bf16"),
    config("lora", "--bf16"),
    config("qlora", "--bf16", fast=True),
    config("full", "--bf16", "--dtype", "bfloat16"),
    config("lora", "--bf16", "--dtype", "bfloat16"),
    config("lora", "--fp16", fast=True),
    config("qlora", "--fp16"),
    # ZeRO-2 over two processes (gloo), one sample per process and step: each sample weighs the same in the loss,
    # so the fp32 run on one process is still the reference
    config("full", "--bf16", processes=2),
]


def load_dtype(flags: list[str]) -> torch.dtype:
    return torch.bfloat16 if "bfloat16" in flags else torch.float32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return colour_task(tmp_path_factory.mktemp("precision") / "colours", num_train=4, num_val=NUM_EVAL)


def run_args(tiny_model_dir, output_dir, data, strategy: str, *flags) -> list[str]:
    """LoRA and QLoRA runs also merge (--merge); full finetuning also saves checkpoint-2 (its last step). Every run
    also evaluates during training, at step 1."""
    saving = ["--merge"] if strategy in ("lora", "qlora") else ["--save_steps", "2"]
    return fast_args(tiny_model_dir, output_dir, "--data_dir", data, "--max_new_tokens", "6", "--eval_steps", "1",
                     "--eval_during_training_samples", "2", *STRATEGIES[strategy], *saving, *flags)


@pytest.fixture(scope="module")
def fp32_root(tmp_path_factory):
    """Where each strategy's fp32 run (the same run without precision flags) goes, run once, when first needed."""
    return tmp_path_factory.mktemp("fp32")


@pytest.fixture(scope="module", params=CONFIGS)
def run(request, launcher, tiny_model_dir, data, fp32_root, tmp_path_factory):
    """One configuration's run (beside its strategy's fp32 run), then predict.py on it with the same flags."""
    strategy, flags, processes = request.param
    root = tmp_path_factory.mktemp(name_of(strategy, flags, processes))
    output_dir, fp32_dir = root / "run", fp32_root / strategy
    args = run_args(tiny_model_dir, output_dir, data, strategy, *flags)
    jobs = {} if fp32_dir.exists() else {
        "fp32": (SCRIPT, run_args(tiny_model_dir, fp32_dir, data, strategy, "--skip_eval_before"))}
    if processes == 1:
        results = launcher.run_many({"run": (SCRIPT, args), **jobs})
    else:
        process = torchrun(SCRIPT, [*args, "--batch_size_per_gpu", "1"], f"--nproc_per_node={processes}",
                           f"--master_port={free_port()}", cwd=root)
        results = {**launcher.run_many(jobs), "run": finish(process)}
    if "fp32" in results:
        results["fp32"].check()
    answers = root / "answers.jsonl"
    predicted = predict(launcher, "--model", output_dir, "--data_file", data / "colour_val.jsonl", "--output",
                        answers, *flags)
    return {"strategy": strategy, "flags": flags, "processes": processes, "output_dir": output_dir,
            "result": results["run"], "predicted": predicted, "answers": answers, "fp32": fp32_dir,
            "base": tiny_model_dir}


def losses(output_dir) -> list[float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def floating_dtypes(path) -> set[torch.dtype]:
    return {tensor.dtype for tensor in tensors(path).values() if tensor.is_floating_point()}


def test_it_runs_end_to_end_with_both_evaluations_in_its_precision(run):
    result, flags = run["result"], run["flags"]
    mode = MODES[flags[0]]
    dtype = str(load_dtype(flags)).removeprefix("torch.")
    assert f"on {run['processes']} process(es), {mode}, weights loaded in {dtype}, attention sdpa" in result.stdout, \
        result.tail()
    if run["strategy"] != "full" or "bfloat16" not in flags:  # bf16 weights all change from the fp32 base's
        assert_finished_run(result, run["output_dir"], run["strategy"], run["base"], NUM_EVAL)
    else:
        result.check()
        assert all(len(read_eval(run["output_dir"], when)["answers_unique"]) == NUM_EVAL for when in ("before", "after"))


def test_it_evaluates_during_training(run):
    history = json.loads((run["output_dir"] / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "eval_accuracy" in entry] == [1, 2]


def test_the_training_loss_differs_from_fp32_and_stays_close(run):
    mixed, fp32 = losses(run["output_dir"]), losses(run["fp32"])
    assert len(mixed) == len(fp32) == 2
    assert mixed != fp32, "the precision flag changed nothing: the run trained in fp32"
    for low, full in zip(mixed, fp32, strict=True):
        assert math.isclose(low, full, rel_tol=0.03), (mixed, fp32)


def test_what_it_saves_is_in_the_load_dtype(run):
    output_dir, dtype = run["output_dir"], load_dtype(run["flags"])
    name = str(dtype).removeprefix("torch.")
    if run["strategy"] in ("full", "frozen"):
        saved = [output_dir, output_dir / "checkpoint-2"]  # the final save and a checkpoint's
    else:
        adapter = tensors(output_dir / "adapter_model.safetensors")
        assert {t.dtype for key, t in adapter.items() if "lora_" in key} == {torch.float32}  # adapters train in fp32
        saved = [output_dir / "merged"]  # --merge: the adapter merged into the base as the evaluation loaded it
    for folder in saved:
        assert floating_dtypes(folder / "model.safetensors") == {dtype}, folder
        assert json.loads((folder / "config.json").read_text())["dtype"] == name
        if dtype == torch.float32 and run["strategy"] in ("full", "frozen"):  # DeepSpeed's masters, not its bf16 copy
            weights = tensors(folder / "model.safetensors")
            assert any(not torch.equal(weight, weight.bfloat16().float()) for weight in weights.values())


def test_predict_with_the_same_flags_answers_as_the_evaluation_after_training(run):
    assert_equals_eval_after(run["predicted"], run["answers"], run["output_dir"])


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_resumed_from_a_bf16_checkpoint_it_ends_as_the_uninterrupted_run(strategy, launcher, tiny_model_dir, data,
                                                                         tmp_path):
    """4 steps with checkpoints every 2; a fresh output folder resumed from checkpoint-2 trains steps 3 and 4 to
    the same weights, losses and evaluation (DeepSpeed restores its bf16 copy of the weights and the fp32 masters)."""
    def args(name: str, *extra):
        return run_args(tiny_model_dir, tmp_path / name, data, strategy, "--bf16", "--max_steps", "4",
                        "--save_steps", "2", "--skip_eval_before", *extra)

    launcher.run(SCRIPT, args("uninterrupted")).check()
    resumed = launcher.run(SCRIPT, args("resumed", "--resume_from_checkpoint", tmp_path / "uninterrupted" /
                                        "checkpoint-2")).check()
    assert "resuming from" in resumed.stdout and "bf16 autocast" in resumed.stdout
    weights = "model.safetensors" if strategy == "full" else "adapter_model.safetensors"
    expected, actual = (tensors(tmp_path / name / weights) for name in ("uninterrupted", "resumed"))
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype and torch.allclose(actual[key], value, atol=1e-6), key
    assert losses(tmp_path / "resumed")[-2:] == pytest.approx(losses(tmp_path / "uninterrupted")[-2:], abs=1e-6)
    assert read_eval(tmp_path / "resumed", "after") == read_eval(tmp_path / "uninterrupted", "after")
