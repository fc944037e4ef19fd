"""common/report/run.py: a run's report follows its evaluations (read from the samples files beside the eval
JSONs) and the metric during training; only rank 0 writes; predict.py's report goes beside its answers."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from common import checkpoints
from common.checkpoints import OutOfDiskSpaceError
from common.data import Sample, SampleDataset, Turn
from common.distributed import ONE_PROCESS, Distributed
from common.evaluation import samples_path
from common.inference import Answer
from common.metrics import ACCURACY_BY_ID, ANLS
from common.report import run as report_run
from common.report.run import REPORT_FILE, RunReport, prediction_report_path, write_prediction_report
from tests.common.report.test_page import embedded_data

SECOND_OF_TWO = Distributed(rank=1, local_rank=1, world_size=2, local_world_size=2, device=torch.device("cpu"))
IDENTITY = {"task": "colours", "model": "tiny", "strategy": "LoRA", "data": "/data", "num_crops": 1}


def dataset() -> SampleDataset:
    samples = [Sample(f"val-{i}", [Turn("Which colour?", colour, [Image.new("RGB", (8, 8), (200, 0, 0))])])
               for i, colour in enumerate(["red", "blue", "red", "blue"])]
    return SampleDataset(samples, lambda sample, index, draws: sample)


def write_evaluation(path: Path, predictions: list[str]) -> None:
    """An eval JSON and its samples file, as common/evaluation.py writes them."""
    references = ["red", "blue", "red", "blue"]
    scores = [float(p == r) for p, r in zip(predictions, references, strict=True)]
    path.write_text(json.dumps({"accuracy": sum(scores) / len(scores)}))
    samples_path(path).write_text("".join(json.dumps({"index": i, "id": f"val-{i}", "prediction": p,
                                                      "references": [r], "score": s}) + "\n"
                                          for i, (p, r, s) in enumerate(zip(predictions, references, scores, strict=True))))


def test_a_full_disk_while_writing_the_report_is_one_error_naming_it(tmp_path, monkeypatch):
    def no_space(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report_run, "write_page", no_space)
    monkeypatch.setattr(checkpoints, "_free_bytes", lambda path: 0)
    report = RunReport(tmp_path, IDENTITY, ACCURACY_BY_ID, dataset(), ONE_PROCESS)
    write_evaluation(tmp_path / "eval_before.json", ["blue", "blue", "x", "x"])
    with pytest.raises(OutOfDiskSpaceError, match="the evaluation report"):
        report.evaluated("before", tmp_path / "eval_before.json")


def test_the_report_follows_the_runs_evaluations(tmp_path):
    report = RunReport(tmp_path, IDENTITY, ACCURACY_BY_ID, dataset(), ONE_PROCESS)
    write_evaluation(tmp_path / "eval_before.json", ["blue", "blue", "x", "x"])
    report.evaluated("before", tmp_path / "eval_before.json")
    data = embedded_data(tmp_path / REPORT_FILE)
    assert [e["key"] for e in data["evaluations"]] == ["before"] and data["curve"] is None
    assert [s["answers"]["before"]["score"] for s in data["samples"]] == [0.0, 1.0, 0.0, 0.0]

    callback = report.callback(SimpleNamespace(dataset=["a", "b"]))  # a TaskEvaluation on 2 samples
    history = [{"loss": 1.0, "step": 1}, {"eval_accuracy": 0.5, "step": 2}, {"eval_accuracy": 1.0, "step": 4}]
    callback.on_evaluate(None, type("State", (), {"log_history": history})(), None)
    assert embedded_data(tmp_path / REPORT_FILE)["curve"] == {
        "points": [{"step": 2, "score": 0.5}, {"step": 4, "score": 1.0}], "samples": 2, "final_step": None}

    report.progress(history, final_step=5)
    write_evaluation(tmp_path / "eval_after.json", ["red", "blue", "red", "x"])
    report.evaluated("after", tmp_path / "eval_after.json")
    data = embedded_data(tmp_path / REPORT_FILE)
    assert [(e["key"], e["score"]) for e in data["evaluations"]] == [("before", 0.25), ("after", 0.75)]
    assert data["curve"]["final_step"] == 5 and data["title"] == "colours · LoRA"
    assert data["labels"]["classes"] == ["blue", "red"]  # rows; columns: blue, red, outside
    assert data["labels"]["confusion"] == {"before": [[1, 0, 1], [1, 0, 1]], "after": [[1, 0, 1], [0, 2, 0]]}
    assert not list(tmp_path.glob("*.tmp"))


def test_an_evaluation_without_its_samples_file_is_left_out(tmp_path):
    (tmp_path / "eval_before.json").write_text(json.dumps({"accuracy": 0.5}))  # a run from before the samples files
    RunReport(tmp_path, IDENTITY, ACCURACY_BY_ID, dataset(), ONE_PROCESS).evaluated("before", tmp_path / "eval_before.json")
    data = embedded_data(tmp_path / REPORT_FILE)
    assert data["evaluations"] == [] and len(data["samples"]) == 4 and data["labels"] is None


def test_only_the_main_process_writes(tmp_path):
    write_evaluation(tmp_path / "eval_before.json", ["red"] * 4)
    report = RunReport(tmp_path, IDENTITY, ACCURACY_BY_ID, dataset(), SECOND_OF_TWO)
    report.evaluated("before", tmp_path / "eval_before.json")
    assert not (tmp_path / REPORT_FILE).exists() and report.views is None  # no thumbnails made either


def test_predicts_report_scores_the_answers_that_have_a_reference(tmp_path):
    answers = [Answer("val-0", "Red.", "red"), Answer("val-1", "bleu", "blue"), Answer("val-2", "red", None),
               Answer("val-3", "", "blue")]
    output = tmp_path / "answers.jsonl"
    path = write_prediction_report(output, dataset(), answers, ANLS, 0.6, {"model": "tiny", "data": "/q.jsonl"})
    assert path == tmp_path / "answers.html"
    data = embedded_data(path)
    # ANLS keeps case ("Red" is one edit from "red"); "bleu" is two of four from "blue": not below the threshold
    assert [s["answers"]["answer"]["score"] for s in data["samples"]] == [pytest.approx(2 / 3), 0.0, None, 0.0]
    assert [s["references"] for s in data["samples"]] == [["red"], ["blue"], [], ["blue"]]
    assert data["evaluations"] == [{"key": "answer", "label": "answer", "score": 0.6, "count": 4}]
    assert data["title"] == "predictions · q.jsonl" and data["labels"] is None


def test_predicts_report_never_replaces_the_answers():
    assert prediction_report_path(Path("out/answers.jsonl")) == Path("out/answers.html")
    assert prediction_report_path(Path("out/answers")) == Path("out/answers.html")
    assert prediction_report_path(Path("out/answers.html")) == Path("out/answers.report.html")
