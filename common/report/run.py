"""Who writes evaluation.html, and when: a finetuning run after each of its evaluations, predict.py after
answering a question file.

A run's report (`RunReport`) is rewritten by rank 0 after the evaluation before training, after every
evaluation during training (the metric per step: `ReportCallback`) and after the evaluation after training;
its sample answers come from the `.samples.jsonl` files that common/evaluation.py writes beside
eval_before.json and eval_after.json, so a resumed run that reads its evaluation before training back still
shows it. The thumbnails are made once per process, on the first write.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers import TrainerCallback

from ..checkpoints import writing
from ..data import SampleDataset
from ..distributed import Distributed
from ..evaluation import read_samples, sample_score
from ..metrics import Metric
from ..training_evaluation import TaskEvaluation, metric_key
from .page import Evaluation, page_data, sample_view, write_page

logger = logging.getLogger(__name__)

REPORT_FILE = "evaluation.html"
WHEN = {"before": "before training", "after": "after training"}


class RunReport:
    """output_dir/evaluation.html of a finetuning run; every rank may call it, rank 0 writes."""

    def __init__(self, output_dir: Path, identity: dict, metric: Metric, dataset: SampleDataset,
                 distributed: Distributed):
        self.path = Path(output_dir) / REPORT_FILE
        self.identity = identity
        self.metric = metric
        self.dataset = dataset
        self.distributed = distributed
        self.evaluations: dict[str, Path] = {}  # "before" / "after" -> its eval_*.json
        self.curve: dict | None = None
        self.during_samples = 0  # how many samples the evaluations during training score
        self.views: list[dict] | None = None

    def evaluated(self, when: str, report_path: Path) -> None:
        """The evaluation `when` ("before", "after") is in `report_path` (with its samples file): rewrite."""
        self.evaluations[when] = report_path
        self.write()
        if self.distributed.is_main:
            logger.info("evaluation report: %s", self.path)

    def progress(self, log_history: list[dict], final_step: int | None = None) -> None:
        """The metric during training, from the Trainer's log history (`final_step`: where training ended)."""
        key = metric_key(self.metric)
        points = [{"step": entry["step"], "score": entry[key]} for entry in log_history if key in entry]
        self.curve = {"points": points, "samples": self.during_samples, "final_step": final_step} if points else None

    def write(self) -> None:
        if not self.distributed.is_main:
            return
        if self.views is None:
            self.views = [sample_view(self.dataset[index]) for index in range(len(self.dataset))]
        evaluations = []
        for when, report_path in self.evaluations.items():
            records = read_samples(report_path)
            if records is not None:
                score = json.loads(report_path.read_text()).get(self.metric.name)
                evaluations.append(Evaluation(when, WHEN[when], score, records))
        title = f"{self.identity['task']} · {self.identity['strategy']}"
        data = page_data(title, self.identity, self.metric.name, self.views, evaluations, self.curve)
        with writing("the evaluation report", self.path, self.path.parent):  # a full disk: one error, as for evaluations
            write_page(self.path, data)

    def callback(self, during_training: TaskEvaluation | None) -> TrainerCallback:
        """The Trainer callback that rewrites the report after each evaluation during training (None: there are
        none)."""
        self.during_samples = len(during_training.dataset) if during_training else 0
        return ReportCallback(self)


class ReportCallback(TrainerCallback):
    """Rewrites the run's report after every evaluation during training, with the metric at each step so far."""

    def __init__(self, report: RunReport):
        self.report = report

    def on_evaluate(self, args, state, control, **kwargs):
        self.report.progress(state.log_history)
        self.report.write()


class NoReport:
    """The report of a run whose evaluations generate no answers to show (preference tuning, scored by its
    rewards): it writes nothing, so such a run has no evaluation.html."""

    def evaluated(self, when: str, report_path: Path) -> None:
        pass

    def progress(self, log_history: list[dict], final_step: int | None = None) -> None:
        pass

    def callback(self, during_training) -> TrainerCallback:
        return TrainerCallback()


def prediction_report_path(output: Path) -> Path:
    """predict.py's report beside its answers: answers.jsonl -> answers.html."""
    path = output.with_suffix(".html")
    return path if path != output else output.with_name(f"{output.stem}.report.html")


def write_prediction_report(output: Path, dataset: SampleDataset, answers: list, metric: Metric,
                            score: float | None, identity: dict) -> Path:
    """predict.py --data_file's report: each question's answer (`common.inference.Answer`), scored by `metric`
    where the file gives a reference; `score`: the metric over those."""
    records = []
    for index, answer in enumerate(answers):
        record = {"index": index, "id": answer.id, "prediction": answer.prediction,
                  "references": [answer.reference] if answer.reference is not None else []}
        record["score"] = sample_score(metric, record) if answer.reference is not None else None
        records.append(record)
    evaluation = Evaluation("answer", "answer", score, records)
    views = [sample_view(dataset[index]) for index in range(len(dataset))]
    title = f"predictions · {Path(identity['data']).name}"
    return write_page(prediction_report_path(output), page_data(title, identity, metric.name, views, [evaluation]))
