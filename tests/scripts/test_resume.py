"""Resuming is exact: a run interrupted after its step-2 checkpoint and started again with the same command
(automatic resume from the newest checkpoint in --output_dir) ends with the weights and the logged loss of
the uninterrupted run; so does a fresh --output_dir with --resume_from_checkpoint PATH. For LoRA (adapter
checkpoints) and full finetuning (DeepSpeed ZeRO-2 checkpoints)."""

import json
import shutil

import pytest
import torch

from tests.scripts.e2e import SCRIPTS, STRATEGIES, fast_args, tensors, write_cauldron

WEIGHTS = {"lora": "adapter_model.safetensors", "full": "model.safetensors"}


@pytest.fixture(scope="module")
def runs(launcher, tiny_model_dir, tmp_path_factory):
    """{strategy: {"uninterrupted" | "interrupted" | "explicit": (output_dir, Result)}}."""
    root = tmp_path_factory.mktemp("resume")
    data = write_cauldron(root / "data", "hateful_memes", 9, "disk")  # 8 training rows: 4 steps of 2, one epoch

    def job(strategy: str, output_dir, *extra: str):
        args = fast_args(tiny_model_dir, output_dir, "--dataset_path", data, "--eval_size", "1", "--max_steps", "4",
                         "--save_steps", "2", "--skip_eval_before", *STRATEGIES[strategy], *extra)
        return SCRIPTS["hateful_memes"], args

    first = launcher.run_many({strategy: job(strategy, root / strategy / "uninterrupted") for strategy in WEIGHTS})
    jobs = {}
    for strategy in WEIGHTS:
        uninterrupted = root / strategy / "uninterrupted"
        if first[strategy].returncode != 0:
            continue
        interrupted = root / strategy / "interrupted"
        # What a run killed during step 3 or 4 leaves: its run record and checkpoint-2 (the same as deleting
        # checkpoint-4 and the final files from a finished copy, without paying for that copy's run).
        shutil.copytree(uninterrupted / "checkpoint-2", interrupted / "checkpoint-2")
        shutil.copy(uninterrupted / "run.json", interrupted / "run.json")
        jobs[(strategy, "interrupted")] = job(strategy, interrupted)
        if strategy == "lora":
            # the same checkpoint, but this command trains another strategy: no automatic resume
            jobs[(strategy, "other run")] = job("full", interrupted)
        if strategy == "lora":
            explicit = root / strategy / "explicit"
            jobs[(strategy, "explicit")] = job(strategy, explicit, "--resume_from_checkpoint", uninterrupted / "checkpoint-2")
    other_runs = {key: jobs.pop(key) for key in [key for key in jobs if key[1] == "other run"]}
    second = launcher.run_many(other_runs)  # first, while the interrupted folder is still untouched
    second.update(launcher.run_many(jobs))
    results = {strategy: {"uninterrupted": (root / strategy / "uninterrupted", first[strategy])} for strategy in WEIGHTS}
    for (strategy, kind), result in second.items():
        results[strategy][kind] = (root / strategy / kind, result)
    return results


def final_loss(output_dir) -> float:
    history = json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    return next(entry["loss"] for entry in history if entry.get("step") == 4 and "loss" in entry)


@pytest.mark.parametrize(
    "strategy, kind", [("lora", "interrupted"), ("lora", "explicit"), ("full", "interrupted")]
)
def test_resumed_run_ends_where_the_uninterrupted_run_ends(runs, strategy, kind):
    reference_dir, reference = runs[strategy]["uninterrupted"]
    reference.check()
    assert (reference_dir / "checkpoint-2").is_dir() and (reference_dir / "checkpoint-4").is_dir()
    output_dir, result = runs[strategy][kind]
    result.check()
    resumed_from = reference_dir / "checkpoint-2" if kind == "explicit" else output_dir / "checkpoint-2"
    assert f"resuming from {resumed_from}" in result.stdout

    expected, actual = tensors(reference_dir / WEIGHTS[strategy]), tensors(output_dir / WEIGHTS[strategy])
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.allclose(expected[key], actual[key], atol=1e-6), key
    assert final_loss(output_dir) == pytest.approx(final_loss(reference_dir), abs=1e-6)
    # only steps 3 and 4 were trained again
    history = json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2, 3, 4]
    assert (output_dir / "eval_after.json").is_file()


def test_a_checkpoint_of_another_run_is_not_resumed(runs):
    _, result = runs["lora"]["other run"]  # full finetuning pointed at the LoRA run's folder
    lora_dir = runs["lora"]["interrupted"][0]
    assert result.returncode != 0
    assert f"{lora_dir} holds checkpoint-2 of another run" in result.stderr
    assert "--resume_from_checkpoint" in result.stderr and "Traceback" not in result.stderr
