"""The task metric during training, through the real script: --eval_steps / --eval_every_epoch evaluate at the
expected steps (one log line, the log history, the curves, TensorBoard); --keep_best keeps the best checkpoint
through the rotation and makes it the final model, which the evaluation after training scores;
--early_stopping_patience stops; SIGTERM mid-run and resume end as the uninterrupted run.

The rigged run (real training, real scoring): every answer is "red", which full finetuning learns in two steps
while the warm-up's learning rate is still small; the learning rate keeps rising (to 0.3 at step 16) and
destroys it from step 4 on, so the evaluation at step 2 is the best (accuracy 1, then 0).
"""

import json
import os
import signal

import pytest
import torch
from huggingface_hub import ModelCard
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.scripts.e2e import (
    COLOUR_QUESTION,
    SCRIPTS,
    STRATEGIES,
    colour_image,
    colour_task,
    fast_args,
    finish,
    free_port,
    read_eval,
    tensors,
    torchrun,
    write_generic,
)
from tests.scripts.test_resume import command_of, printed_resume_command, wait_for_text

SCRIPT = SCRIPTS["hateful_memes"]  # trains on the generic format with --data_dir; metric: accuracy


def all_red(root, num_train=8, num_val=4):
    splits, images = {}, {}
    for split, count in (("train", num_train), ("val", num_val)):
        splits[split] = []
        for i in range(count):
            images[f"{split}-{i}.png"] = colour_image("red", (32 + 2 * i, 24))
            splits[split].append({"id": f"{split}-{i}", "conversations": [
                {"images": [f"{split}-{i}.png"], "user": COLOUR_QUESTION, "assistant": "red"}]})
    return write_generic(root, splits, images, name="red")


def rigged_args(model_dir, output_dir, data, *extra):
    """Best at step 2, destroyed from step 4 on (see the module's docstring)."""
    return fast_args(model_dir, output_dir, "--data_dir", data, "--skip_eval_before", "--max_steps", "16",
                     "--learning_rate", "0.3", "--warmup_steps", "16", "--eval_steps", "2", "--keep_best",
                     "--early_stopping_patience", "3", *extra)


def history(output_dir, checkpoint=None) -> dict:
    """The Trainer state of the run (its output folder's) or of one of its checkpoints."""
    return json.loads((output_dir / (checkpoint or "") / "trainer_state.json").read_text())


def evaluations(state: dict) -> dict[int, float]:
    return {entry["step"]: entry["eval_accuracy"] for entry in state["log_history"] if "eval_accuracy" in entry}


@pytest.fixture(scope="module")
def runs(launcher, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("watch")
    colours, red = colour_task(root / "colours", num_train=8, num_val=4), all_red(root / "red")
    def colour_run(name, *extra):
        return SCRIPT, fast_args(tiny_model_dir, root / name, "--data_dir", colours, "--skip_eval_before",
                                 "--max_steps", "8", *extra)

    jobs = {
        # 8 samples in steps of 2: epochs end at steps 4 and 8; by steps: 3 and 6
        "schedule": colour_run("schedule", "--eval_steps", "3", "--eval_every_epoch",
                               "--eval_during_training_samples", "3", "--report_to", "tensorboard"),
        "unwatched": colour_run("unwatched"),
        "best": (SCRIPT, rigged_args(tiny_model_dir, root / "best", red, "--save_steps", "2", "--save_total_limit", "1")),
        "lora": (SCRIPT, fast_args(tiny_model_dir, root / "lora", "--data_dir", red, "--skip_eval_before",
                                   "--max_steps", "4", "--eval_steps", "2", "--keep_best", *STRATEGIES["lora"])),
    }
    return root, red, launcher.run_many(jobs)


def test_the_metric_is_evaluated_at_the_expected_steps(runs):
    root, _, results = runs
    result = results["schedule"].check()
    output_dir = root / "schedule"
    steps = [3, 4, 6, 8]  # every 3 steps and at each epoch's end, once each
    state = history(output_dir)
    assert list(evaluations(state)) == steps
    lines = [line for line in result.stdout.splitlines() if "common.training_evaluation: step " in line]
    assert [int(line.split(" step ")[1].split(":")[0]) for line in lines] == steps
    assert all(" on 3 evaluation samples (best " in line for line in lines), lines
    assert "evaluating accuracy during training on 3 samples, every 3 steps, after every epoch" in result.stdout
    # the curves picture gets the metric's panel (three panels of 500 px)
    from PIL import Image

    with Image.open(output_dir / "training_curves.png") as image:
        assert image.size == (1500, 400)
    events = EventAccumulator(str(next(output_dir.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    scalars = events.Scalars("eval/accuracy")
    assert [event.step for event in scalars] == steps
    assert [event.value for event in scalars] == pytest.approx(list(evaluations(state).values()))
    # evaluating changes nothing in training
    results["unwatched"].check()
    watched, unwatched = tensors(output_dir / "model.safetensors"), tensors(root / "unwatched" / "model.safetensors")
    assert all(torch.equal(watched[key], unwatched[key]) for key in unwatched)


def test_keep_best_keeps_and_exports_the_best_checkpoint_and_early_stopping_stops(runs):
    root, _, results = runs
    result, output_dir = results["best"].check(), root / "best"
    state = history(output_dir)
    assert evaluations(state) == {2: 1.0, 4: 0.0, 6: 0.0, 8: 0.0}  # the rig held: best early, destroyed later
    assert state["global_step"] == 8  # three evaluations without improvement: stopped at 8 of 16
    assert "early stopping at step 8: accuracy has not improved since step 2 (--early_stopping_patience 3)" in result.stdout
    assert state["best_global_step"] == 2 and state["best_metric"] == 1.0
    # --save_total_limit 1 keeps the newest checkpoint, and the best one beyond the count
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-8"]
    assert "BEST ACCURACY during training: 1.0000 at step 2" in result.stdout
    final, best = tensors(output_dir / "model.safetensors"), tensors(output_dir / "checkpoint-2" / "model.safetensors")
    last = tensors(output_dir / "checkpoint-8" / "model.safetensors")
    assert all(torch.equal(final[key], best[key]) for key in best)
    assert any(not torch.equal(final[key], last[key]) for key in last)
    assert read_eval(output_dir, "after")["accuracy"] == 1.0  # the evaluation after training scores the best
    assert not (output_dir / "optimizer.pt").exists() and (output_dir / "preprocessor_config.json").is_file()
    assert json.loads((output_dir / "config.json").read_text())["use_cache"]  # the saved model generates with a cache
    card = ModelCard.load(output_dir / "README.md")
    assert "Best accuracy during training: 1.0000 at step 2; the final model is that step's" in card.text
    assert card.data.eval_results[0].metric_value == 1.0 and "| accuracy | not evaluated | 1.0000 |" in card.text


def test_keep_best_exports_the_best_adapter(runs):
    root, _, results = runs
    result, output_dir = results["lora"].check(), root / "lora"
    state = history(output_dir)
    best = f"checkpoint-{state['best_global_step']}"
    assert f"the final model is {output_dir / best}" in result.stdout
    final, kept = tensors(output_dir / "adapter_model.safetensors"), tensors(output_dir / best / "adapter_model.safetensors")
    assert final.keys() == kept.keys() and all(torch.equal(final[key], kept[key]) for key in kept)
    assert (output_dir / "eval_after.json").is_file()


@pytest.fixture(scope="module")
def resumed(launcher, tiny_model_dir, runs):
    """The rigged run stopped by SIGTERM after its best evaluation, then resumed with the printed command."""
    root, red, _ = runs
    output_dir = root / "stopped"
    stopped = launcher.start(SCRIPT, rigged_args(tiny_model_dir, output_dir, red, "--save_steps", "2",
                                                 "--save_total_limit", "1"))
    wait_for_text(stopped.stdout, "common.training_evaluation: step 2: ")
    os.kill(stopped.pid, signal.SIGTERM)
    interrupted = launcher.wait(stopped)
    return root, interrupted, launcher.run(*command_of(printed_resume_command(interrupted.stderr)))


def test_sigterm_and_resume_end_as_the_uninterrupted_run(resumed):
    root, interrupted, result = resumed
    assert interrupted.returncode == 128 + signal.SIGTERM, interrupted.tail()
    stopped_at = int(interrupted.stderr.split("stopped by SIGTERM at step ")[1].split()[0])
    assert 2 <= stopped_at < 8
    result.check()
    assert "Traceback" not in result.stdout + result.stderr
    uninterrupted, continued = history(root / "best", "checkpoint-8"), history(root / "stopped", "checkpoint-8")
    assert len(continued["log_history"]) == len(uninterrupted["log_history"])  # continuous: nothing lost or repeated
    for entry, expected in zip(continued["log_history"], uninterrupted["log_history"], strict=True):
        assert entry == pytest.approx(expected, rel=1e-5)
    for key in ("global_step", "best_global_step", "best_metric"):
        assert continued[key] == uninterrupted[key], key
    assert "BEST ACCURACY during training: 1.0000 at step 2" in result.stdout
    expected, actual = tensors(root / "best" / "model.safetensors"), tensors(root / "stopped" / "model.safetensors")
    assert all(torch.allclose(expected[key], actual[key], atol=1e-6) for key in expected)
    assert read_eval(root / "stopped", "after") == read_eval(root / "best", "after")


@pytest.mark.slow
def test_under_torchrun_every_rank_evaluates_its_shard_and_the_best_adapter_is_kept(tiny_model_dir, runs, tmp_path):
    _, red, _ = runs
    output_dir = tmp_path / "out"
    args = fast_args(tiny_model_dir, output_dir, "--data_dir", red, "--skip_eval_before", "--max_steps", "4",
                     "--batch_size_per_gpu", "1", "--eval_steps", "2", "--keep_best", *STRATEGIES["lora"])
    result = finish(torchrun(SCRIPT, args, "--nproc_per_node=2", f"--master_port={free_port()}", cwd=tmp_path)).check()
    state = history(output_dir)
    assert list(evaluations(state)) == [2, 4]
    assert len([line for line in result.stdout.splitlines() if line.startswith("BEST ACCURACY")]) == 1  # rank 0
    best = output_dir / f"checkpoint-{state['best_global_step']}"
    final, kept = tensors(output_dir / "adapter_model.safetensors"), tensors(best / "adapter_model.safetensors")
    assert all(torch.equal(final[key], kept[key]) for key in kept)
