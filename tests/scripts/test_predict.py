"""predict.py answers as the run's own evaluation after training does: on a run's output folder (full weights
and a LoRA adapter), on a checkpoint folder, one prompt and a file, its answers and score equal eval_after.json;
bad input is one clear error."""

import json
import shutil

import pytest

from common.metrics import normalize_answer
from tests.scripts.e2e import (
    COLOUR_QUESTION,
    REPO_ROOT,
    SCRIPTS,
    STRATEGIES,
    colour_task,
    fast_args,
    finish,
    free_port,
    read_eval,
    torchrun,
)

PREDICT = REPO_ROOT / "predict.py"
SCRIPT = SCRIPTS["hateful_memes"]  # any script trains on the generic format (--data_dir); its metric: accuracy


@pytest.fixture(scope="module")
def runs(launcher, tiny_model_dir, tmp_path_factory):
    """A full finetuning and a LoRA run on the colour task, each leaving checkpoint-2 (its last step)."""
    root = tmp_path_factory.mktemp("predict")
    data = colour_task(root / "colours", num_train=4, num_val=5)
    jobs = {
        strategy: (SCRIPT, fast_args(tiny_model_dir, root / strategy, "--data_dir", data, "--skip_eval_before",
                                     "--save_steps", "2", "--max_new_tokens", "6", *STRATEGIES[strategy]))
        for strategy in ("full", "lora")
    }
    for result in launcher.run_many(jobs).values():
        result.check()
    return root, data


def predict(launcher, *args):
    return launcher.run(PREDICT, ["--max_new_tokens", "6", "--batch_size", "2", "--no-tqdm", *map(str, args)])


def answers_of(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_equals_eval_after(result, answers_path, output_dir):
    result.check()
    answers = answers_of(answers_path)
    report = read_eval(output_dir, "after")
    assert [answer["id"] for answer in answers] == [f"val-{i}" for i in range(5)]  # input order
    assert [normalize_answer(answer["prediction"]) for answer in answers] == report["generated_texts_unique"]
    assert [answer["reference"] for answer in answers] == report["answers_unique"]
    assert f"ACCURACY: {report['accuracy']:.4f} (5 samples with a reference)" in result.stdout


@pytest.mark.parametrize("model", ["full", "lora", "lora/checkpoint-2", "full/checkpoint-2"])
def test_a_file_is_answered_as_the_run_evaluated_it(launcher, runs, tmp_path, model):
    root, data = runs
    output = tmp_path / "answers.jsonl"
    result = predict(launcher, "--model", root / model, "--data_file", data / "colour_val.jsonl", "--output", output)
    assert_equals_eval_after(result, output, root / model.split("/")[0])
    if model == "lora":
        assert f"LoRA adapter {root / 'lora'} on " in result.stdout


def test_one_prompt_prints_the_answer_the_run_gave(launcher, runs):
    root, data = runs
    first = json.loads((data / "colour_val.jsonl").read_text().splitlines()[0])
    image = data / "images" / first["conversations"][0]["images"][0]
    result = predict(launcher, "--model", root / "lora", "--image", image, "--prompt", COLOUR_QUESTION).check()
    answer = result.stdout.strip().splitlines()[-1]
    assert normalize_answer(answer) == read_eval(root / "lora", "after")["generated_texts_unique"][0]


def test_questions_without_answers_are_answered_and_not_scored(launcher, runs, tmp_path):
    root, data = runs
    questions = tmp_path / "questions.jsonl"
    records = [json.loads(line) for line in (data / "colour_val.jsonl").read_text().splitlines()]
    for record in records:
        del record["conversations"][-1]["assistant"]
    questions.write_text("".join(json.dumps(record) + "\n" for record in records))
    output = tmp_path / "answers.jsonl"
    result = predict(launcher, "--model", root / "full", "--data_file", questions, "--image_folder", data / "images",
                     "--output", output).check()
    answers = answers_of(output)
    assert [normalize_answer(a["prediction"]) for a in answers] == read_eval(root / "full", "after")["generated_texts_unique"]
    assert all(answer["reference"] is None for answer in answers)
    assert "ACCURACY" not in result.stdout


def bad_inputs(root, data, tmp_path):
    adapter = tmp_path / "moved_adapter"
    shutil.copytree(root / "lora", adapter, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "microsoft/Phi-3.5-vision-instruct"  # not downloadable offline
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "empty").mkdir()
    prompt = ["--prompt", COLOUR_QUESTION]
    return {
        "missing image": (
            ["--model", root / "full", *prompt, "--image", tmp_path / "gone.png"], 1,
            f"error: --image: no such file: {tmp_path / 'gone.png'}"),
        "unknown model folder": (
            ["--model", tmp_path / "empty", *prompt], 1,
            f"error: --model {tmp_path / 'empty'} holds no model (config.json or adapter_config.json)"),
        "no such model folder": (
            ["--model", tmp_path / "nowhere", *prompt], 1,
            f"error: --model {tmp_path / 'nowhere'}: no such folder; give a run's output folder, a checkpoint-N "
            "folder, a merged folder or a hub model id"),
        "base unreachable offline": (
            ["--model", adapter, *prompt], 1,
            f"error: cannot load the base model of the adapter {adapter}: microsoft/Phi-3.5-vision-instruct ("),
        "prompt and file": (
            ["--model", root / "full", *prompt, "--data_file", data / "colour_val.jsonl"], 2,
            "error: invalid arguments:"),
    }


def test_bad_input_is_one_clear_error(launcher, runs, tmp_path):
    root, data = runs
    for name, (args, status, message) in bad_inputs(root, data, tmp_path).items():
        result = predict(launcher, *args)
        assert result.returncode == status, (name, result.tail())
        assert "Traceback" not in result.stderr, (name, result.tail())
        lines = result.stderr.strip().splitlines()
        error_lines = [line for line in lines if line.startswith("error: ")]
        assert len(error_lines) == 1 and error_lines[0].startswith(message), (name, result.tail())
        if name == "base unreachable offline":
            assert error_lines[0].endswith("; give the base model's folder with --base_model"), result.tail()


@pytest.mark.slow
def test_torchrun_shards_and_gathers_in_input_order(runs, tmp_path):
    root, data = runs
    output = tmp_path / "answers.jsonl"
    process = torchrun(PREDICT, ["--model", root / "lora", "--data_file", data / "colour_val.jsonl", "--output", output,
                                 "--max_new_tokens", "6", "--batch_size", "2", "--no-tqdm"],
                       "--nproc_per_node=2", f"--master_port={free_port()}", cwd=tmp_path)
    assert_equals_eval_after(finish(process), output, root / "lora")
