"""evaluation.html end to end: a LoRA run (with evaluations during training) and a full run on the colour task
leave a report holding every evaluated sample's image, reference and answers before and after training, the
metric per step, and confusion matrices whose counts are the eval JSON's; predict.py --data_file leaves one
beside its answers; in Chromium, opened from disk, the report's filter shows the right samples."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from PIL import ImageStat

from common.metrics import normalize_answer
from tests.common.report.test_page import decoded, embedded_data, shown_ids
from tests.scripts.e2e import COLOURS, REPO_ROOT, SCRIPTS, STRATEGIES, colour_task, fast_args, read_eval

NUM_EVAL = 6  # three colours twice: a closed label set
SCRIPT = SCRIPTS["ucf101"]  # a script that trains on conversation data; its metric: accuracy by id


@pytest.fixture(scope="module")
def runs(launcher, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data = colour_task(root / "colours", num_train=4, num_val=NUM_EVAL)
    extra = {"lora": ["--eval_steps", "1", "--eval_during_training_samples", "4"], "full": []}
    jobs = {strategy: (SCRIPT, fast_args(tiny_model_dir, root / strategy, "--data_dir", data, *STRATEGIES[strategy],
                                         *extra[strategy]))
            for strategy in ("lora", "full")}
    jobs["predict"] = (REPO_ROOT / "predict.py", ["--model", tiny_model_dir, "--data_file", data / "colour_val.jsonl",
                                                  "--output", root / "predict" / "answers.jsonl", "--max_new_tokens",
                                                  "4", "--num_crops", "1", "--no-tqdm"])
    results = launcher.run_many(jobs)
    for result in results.values():
        result.check()
    return root, results


def closeness(data_uri: str, colour: str) -> float:
    """The largest channel difference between a thumbnail's mean colour and a named colour."""
    mean = ImageStat.Stat(decoded(data_uri)).mean
    return max(abs(a - b) for a, b in zip(mean, COLOURS[colour], strict=True))


def assert_samples_shown(samples: list[dict], ids: list[str], references: list[str]) -> None:
    """Every sample in order, its reference and its one image: a solid square of the reference's colour."""
    assert [sample["id"] for sample in samples] == ids
    assert [normalize_answer(sample["references"][0]) for sample in samples] == references
    assert all(len(sample["images"]) == sample["image_count"] == 1 for sample in samples)
    assert all(closeness(sample["images"][0], reference) < 8 for sample, reference in zip(samples, references, strict=True))
    assert all(sample["question"].startswith("Which colour is this?") for sample in samples)


@pytest.mark.parametrize("strategy", ["lora", "full"])
def test_the_report_holds_every_sample_and_the_eval_jsons_counts(runs, strategy):
    root, _ = runs
    output_dir = root / strategy
    data = embedded_data(output_dir / "evaluation.html")
    evals = {when: read_eval(output_dir, when) for when in ("before", "after")}
    ids = [answer["id"] for answer in evals["after"]["answers_unique"]]
    references = [answer["answer"] for answer in evals["after"]["answers_unique"]]
    assert_samples_shown(data["samples"], ids, references)
    recorded = json.loads((output_dir / "run.json").read_text())  # the run's full identity
    assert data["identity"] == {"task": recorded["task"], "model": recorded["model.name_or_path"],
                                "strategy": {"lora": "LoRA", "full": "full finetuning"}[strategy],
                                "data": recorded["data.data_dir"]}
    assert [(e["key"], e["score"], e["count"]) for e in data["evaluations"]] == [
        (when, evals[when]["accuracy"], NUM_EVAL) for when in ("before", "after")]
    classes = data["labels"]["classes"]
    assert classes == sorted(COLOURS)
    for when, report in evals.items():
        generated = [g["generated_text"] for g in report["generated_texts_unique"]]
        assert [normalize_answer(s["answers"][when]["text"]) for s in data["samples"]] == generated
        assert [s["answers"][when]["score"] for s in data["samples"]] == [
            float(g == r) for g, r in zip(generated, references, strict=True)]
        expected = Counter((reference, answer if answer in classes else None)  # None: outside the label set
                           for reference, answer in zip(references, generated, strict=True))
        columns = [*classes, None]
        matrix = data["labels"]["confusion"][when]
        assert {(classes[row], columns[column]): count for row, counts in enumerate(matrix)
                for column, count in enumerate(counts) if count} == dict(expected)
    if strategy == "lora":  # evaluated after each of its 2 steps, on its first 4 samples
        history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
        assert data["curve"]["points"] == [{"step": e["step"], "score": e["eval_accuracy"]}
                                           for e in history if "eval_accuracy" in e]
        assert [p["step"] for p in data["curve"]["points"]] == [1, 2] and data["curve"]["samples"] == 4
    else:
        assert data["curve"] is None


def test_predict_writes_its_report_beside_its_answers(runs, tiny_model_dir):
    root, results = runs
    answers = [json.loads(line) for line in (root / "predict" / "answers.jsonl").read_text().splitlines()]
    data = embedded_data(root / "predict" / "answers.html")
    assert_samples_shown(data["samples"], [a["id"] for a in answers], [normalize_answer(a["reference"]) for a in answers])
    assert [s["answers"]["answer"]["text"] for s in data["samples"]] == [a["prediction"] for a in answers]
    (evaluation,) = data["evaluations"]
    assert f"ACCURACY: {evaluation['score']:.4f} ({NUM_EVAL} samples with a reference)" in results["predict"].stdout
    assert data["labels"]["classes"] == sorted(COLOURS)
    assert data["identity"] == {"model": str(tiny_model_dir), "data": str(root / "colours" / "colour_val.jsonl")}


def test_the_report_opened_from_disk_filters_the_wrong_answers(runs, browser):
    root, _ = runs
    report = read_eval(root / "lora", "after")
    wrong = [answer["id"] for answer, generated in zip(report["answers_unique"], report["generated_texts_unique"],
                                                       strict=True) if answer["answer"] != generated["generated_text"]]
    page = browser.new_page()
    errors = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        page.goto((root / "lora" / "evaluation.html").as_uri())
        assert len(shown_ids(page)) == NUM_EVAL
        page.select_option("#filter", "wrong")
        assert shown_ids(page) == wrong
        assert page.locator("#count").inner_text() == f"{len(wrong)} of {NUM_EVAL} samples"
        assert page.locator("article.sample img").count() == len(wrong)
        page.select_option("#filter", "all")
        page.fill("#search", "VAL-3")
        page.wait_for_function("document.querySelector('#count').textContent.startsWith('1 of')")
        assert shown_ids(page) == ["val-3"]
        assert not errors, errors
    finally:
        page.close()
