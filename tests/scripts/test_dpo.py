"""finetune_hf_trainer_dpo.py end to end on the tiny model, with colour preference pairs (an image of a solid
colour, "Which colour is this?", the colour chosen over another): every strategy starts at the loss ln 2 with
zero rewards (the policy is its reference), writes the reward metrics before and after training and the
curves with their rewards panel; micro-batches of 1 and of 4 end with the same adapter; the precomputed and
the live reference give the same run; a resumed run ends where the uninterrupted one does and reads the stored
reference log-probabilities back; the same pairs in the three formats give the same preview; a bad record is
one error line; the tiny model learns the preference (slow); two processes (slow)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from common.preference.loss import METRICS
from tests.common.preference.same_pairs import FORMATS
from tests.scripts.e2e import (
    COLOUR_QUESTION,
    COLOURS,
    REPO_ROOT,
    STRATEGIES,
    colour_image,
    fast_args,
    finish,
    free_port,
    read_eval,
    tensors,
    torchrun,
)

SCRIPT = REPO_ROOT / "finetune_hf_trainer_dpo.py"
WEIGHTS = {"full": "model.safetensors", "frozen": "model.safetensors", "lora": "adapter_model.safetensors",
           "qlora": "adapter_model.safetensors"}
LN_2 = torch.tensor(math.log(2)).item()  # as the loss is computed, in float32


def colour_pairs(root: Path, count: int, offset: int = 0, name: str = "pairs") -> Path:
    """RLAIF-V rows: the image's colour chosen over the next colour."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    records = []
    for i in range(count):
        colour, other = names[(offset + i) % 3], names[(offset + i + 1 + (i // 3) % 2) % 3]
        file_name = f"{name}-{i}.png"
        colour_image(colour, (32 + 4 * (i % 3), 24)).save(root / "images" / file_name)
        records.append({"idx": f"{name}-{i}", "question": COLOUR_QUESTION, "image": f"images/{file_name}",
                        "chosen": colour, "rejected": other})
    path = root / f"{name}.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dpo")
    return {"train": colour_pairs(root, 4), "eval": colour_pairs(root, 2, 1, "pairs_val"), "root": root}


def dpo_args(model_dir, output_dir, data, *extra) -> list[str]:
    return fast_args(model_dir, output_dir, "--train_file", data["train"], "--eval_file", data["eval"],
                     "--beta", "0.5", *map(str, extra))


def history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def assert_same_weights(first: Path, second: Path, strategy: str, atol: float = 1e-6) -> None:
    expected, actual = tensors(first / WEIGHTS[strategy]), tensors(second / WEIGHTS[strategy])
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.allclose(expected[key], actual[key], atol=atol), key


@pytest.fixture(scope="module")
def runs(launcher, tiny_model_dir, data, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_runs")
    jobs = {strategy: (SCRIPT, dpo_args(tiny_model_dir, root / strategy, data, *STRATEGIES[strategy], *merge))
            for strategy, merge in (("full", []), ("lora", ["--merge"]))}
    jobs["full_precomputed"] = (SCRIPT, dpo_args(tiny_model_dir, root / "full_precomputed", data,
                                                 "--precompute_ref_log_probs"))
    return root, launcher.run_many(jobs)


@pytest.mark.parametrize("strategy", ["full", "lora", pytest.param("frozen", marks=pytest.mark.slow),
                                      pytest.param("qlora", marks=pytest.mark.slow)])
def test_the_first_step_costs_ln_2_and_the_run_reports_rewards(runs, launcher, tiny_model_dir, data, strategy):
    root, results = runs
    output_dir = root / strategy
    if strategy not in results:
        launcher.run(SCRIPT, dpo_args(tiny_model_dir, output_dir, data, *STRATEGIES[strategy])).check()
    else:
        results[strategy].check()
    first, second = (entry for entry in history(output_dir) if "loss" in entry)
    assert first["loss"] == LN_2  # the policy is its reference: every pair's loss is -log sigmoid(0)
    assert all(first[name] == 0 for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"))
    assert set(METRICS) <= set(second)
    for when in ("before", "after"):
        report = read_eval(output_dir, when)
        assert set(report) == {*METRICS, "loss", "pairs"} and report["pairs"] == 2
    before = read_eval(output_dir, "before")
    assert before["loss"] == LN_2 and before["rewards/accuracies"] == 0.0
    assert read_eval(output_dir, "after")["logps/chosen"] != before["logps/chosen"]  # trained
    assert (output_dir / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (output_dir / WEIGHTS[strategy]).is_file()


def test_precomputed_and_live_reference_give_the_same_run(runs):
    root, results = runs
    results["full_precomputed"].check()
    assert "reference log-probabilities of 6 pairs computed before training" in results["full_precomputed"].stdout
    assert_same_weights(root / "full", root / "full_precomputed", "full", atol=1e-5)
    live, precomputed = history(root / "full"), history(root / "full_precomputed")
    for entry, other in zip(live, precomputed, strict=True):
        for name in ("loss", *METRICS):
            if name in entry:
                assert other[name] == pytest.approx(entry[name], abs=1e-5), name
    stored = json.loads((root / "full_precomputed" / "reference_logps.json").read_text())
    assert sorted(stored["train"]) == [f"pairs-{i}" for i in range(4)] and len(stored["evaluation"]) == 2


def test_predict_answers_with_the_adapter_and_with_the_merged_model(runs, launcher, data):
    root, _ = runs
    image = data["root"] / "images" / "pairs_val-0.png"
    answers = []
    for model in (root / "lora", root / "lora" / "merged"):
        result = launcher.run(REPO_ROOT / "predict.py", ["--model", model, "--image", image, "--prompt", COLOUR_QUESTION,
                                                         "--max_new_tokens", "4", "--no-tqdm"]).check()
        answers.append(result.stdout.strip().splitlines()[-1])
    assert answers[0] == answers[1]
    assert (root / "lora" / "merged" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_run_starts_from_a_merged_model_which_is_its_reference(runs, launcher, data, tmp_path):
    root, _ = runs
    start = root / "lora" / "merged"  # a finetuned model saved whole, as a supervised run's --merge leaves it
    launcher.run(SCRIPT, dpo_args(start, tmp_path / "out", data, "--use_lora")).check()
    first = next(entry for entry in history(tmp_path / "out") if "loss" in entry)
    assert first["loss"] == LN_2
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(start)


@pytest.mark.slow
def test_micro_batches_of_1_and_4_end_with_the_same_adapter(launcher, tiny_model_dir, data, tmp_path):
    jobs = {size: (SCRIPT, dpo_args(tiny_model_dir, tmp_path / str(size), data, "--use_lora", "--batch_size", "4",
                                    "--batch_size_per_gpu", size, "--max_steps", "2", "--skip_eval_before"))
            for size in ("1", "4")}
    for result in launcher.run_many(jobs).values():
        result.check()
    assert_same_weights(tmp_path / "1", tmp_path / "4", "lora", atol=1e-6)


@pytest.mark.slow
def test_resume_is_exact_and_reads_the_stored_reference(launcher, tiny_model_dir, data, tmp_path):
    args = ["--use_lora", "--precompute_ref_log_probs", "--max_steps", "4", "--save_steps", "2", "--skip_eval_before"]
    launcher.run(SCRIPT, dpo_args(tiny_model_dir, tmp_path / "whole", data, *args)).check()
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("run.json", "reference_logps.json"):
        shutil.copy(tmp_path / "whole" / name, resumed / name)
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", resumed / "checkpoint-2")
    result = launcher.run(SCRIPT, dpo_args(tiny_model_dir, resumed, data, *args)).check()
    assert "resuming from" in result.stdout and "read from" in result.stdout and "computed before" not in result.stdout
    assert_same_weights(tmp_path / "whole", resumed, "lora", atol=0)
    whole = [entry["loss"] for entry in history(tmp_path / "whole") if "loss" in entry]
    assert [entry["loss"] for entry in history(resumed) if "loss" in entry] == whole


def test_the_same_pairs_in_the_three_formats_give_the_same_preview(launcher, tiny_model_dir, tmp_path):
    from tests.common.formats.same_conversations import write_images, write_json_list, write_jsonl

    write_images(tmp_path)
    previews = {}
    for name in ("rlaif", "trl_messages", "sharegpt"):
        records = [record for record in FORMATS[name] if record.get("id", record.get("idx")) != "later"]
        path = (write_json_list if name == "sharegpt" else write_jsonl)(tmp_path / f"{name}.json", records)
        output_dir = tmp_path / f"preview-{name}"
        args = ["--model_name_or_path", tiny_model_dir, "--train_file", path, "--eval_size", "1", "--num_crops", "1",
                "--output_dir", output_dir, "--preview_samples", "3"]
        result = launcher.run(SCRIPT, args).check()
        previews[name] = (output_dir / "data_preview.jsonl").read_text()
        assert "sample inline" in result.stdout and "rejected: " in result.stdout
    assert previews["rlaif"] == previews["trl_messages"] == previews["sharegpt"]
    records = [json.loads(line) for line in previews["rlaif"].splitlines()]
    assert [(record["split"], record["id"]) for record in records] == [("train", "inline"), ("train", "text"),
                                                                        ("eval", "single")]


def test_a_bad_record_is_one_error_line(launcher, tiny_model_dir, data, tmp_path):
    bad = data["root"] / "bad.jsonl"  # beside the images
    bad.write_text(data["train"].read_text() + json.dumps({"question": "Which?", "chosen": "red"}) + "\n")
    result = launcher.run(SCRIPT, dpo_args(tiny_model_dir, tmp_path / "out", data) + ["--train_file", str(bad)],
                          cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {bad}:5: 'rejected' must be a non-empty text, got None (read as RLAIF-V, the format of the file's "
        "first record)"
    )
    assert not (tmp_path / "out").exists()


def test_invalid_flags_are_listed_together(launcher, tiny_model_dir, data, tmp_path):
    result = launcher.run(SCRIPT, dpo_args(tiny_model_dir, tmp_path / "out", data, "--beta", "0",
                                           "--loss_type", "hinge", "--label_smoothing", "0.1", "--metric", "accuracy"))
    assert result.returncode == 2
    for problem in ("--beta must be positive", "--label_smoothing applies to --loss_type sigmoid and robust",
                    "--metric does not apply"):
        assert problem in result.stderr


@pytest.mark.slow
def test_the_preference_is_learnt(launcher, tiny_model_dir, tmp_path):
    """Which colour the image shows: held-out pairs (other images) go from no preference to the right one."""
    train, evaluation = colour_pairs(tmp_path, 24), colour_pairs(tmp_path, 12, 1, "held_out_val")
    args = ["--model_name_or_path", tiny_model_dir, "--train_file", train, "--eval_file", evaluation,
            "--output_dir", tmp_path / "out", "--use_lora", "--lora_rank", "8", "--batch_size", "4",
            "--batch_size_per_gpu", "4", "--num_train_epochs", "6", "--learning_rate", "3e-3", "--warmup_steps", "2",
            "--num_crops", "1", "--dataloader_num_workers", "0", "--logging_steps", "6", "--no-tqdm",
            "--eval_steps", "18", "--keep_best", "--report_to", "tensorboard"]
    result = launcher.run(SCRIPT, args).check()
    output_dir = tmp_path / "out"
    before, after = read_eval(output_dir, "before"), read_eval(output_dir, "after")
    assert before["rewards/accuracies"] == 0.0
    assert after["rewards/accuracies"] >= 0.9 and after["rewards/margins"] > 0, after
    evaluated = {entry["step"]: entry["eval_rewards/accuracies"] for entry in history(output_dir)
                 if "eval_rewards/accuracies" in entry}
    assert sorted(evaluated) == [18, 36]
    assert "BEST REWARDS/ACCURACIES during training" in result.stdout  # --keep_best follows the reward accuracy
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with Image.open(output_dir / "training_curves.png") as image:
        assert image.size == (2000, 400)  # loss, learning rate, the reward accuracy, the rewards panel
    events = EventAccumulator(str(next(output_dir.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert [event.step for event in events.Scalars("eval/rewards/accuracies")] == [18, 36]
    assert {"train/rewards/chosen", "train/rewards/margins", "train/logps/rejected"} <= set(events.Tags()["scalars"])


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--use_lora"]], ids=["full-zero2", "lora-ddp"])
def test_two_processes(tiny_model_dir, data, tmp_path, flags):
    output_dir = tmp_path / "out"
    args = dpo_args(tiny_model_dir, output_dir, data, "--batch_size", "4", "--batch_size_per_gpu", "1", *flags)
    result = finish(torchrun(SCRIPT, args, "--nproc_per_node=2", f"--master_port={free_port()}", cwd=tmp_path))
    result.check()
    assert "on 2 process(es)" in result.stdout + result.stderr
    first = next(entry for entry in history(output_dir) if "loss" in entry)
    assert first["loss"] == LN_2
    assert read_eval(output_dir, "after")["pairs"] == 2
