"""Evaluation by greedy generation, sharded across ranks, as the recipe does.

Every rank generates for its shard (samples rank, rank + world, ...) in left-padded batches; the
predictions are gathered on every rank, put back in dataset order and scored there (every rank gets the
report); rank 0 writes the JSON report in the recipe's layout and, beside it, what the recipe's lists leave out:
`<report>.samples.jsonl`, one line per sample in dataset order, {"index", "id", "prediction" (as generated),
"references", "score" (the metric of that sample alone)}, which the evaluation report (common/report/) shows.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .collators import Phi3VEvalCollator
from .config import EvaluationConfig
from .data import SampleDataset
from .distributed import ONE_PROCESS, Distributed
from .metrics import Metric

logger = logging.getLogger(__name__)


def answer_generation_options(tokenizer) -> dict:
    """`generate` options of every answer (evaluation, predict.py, the server): greedy, with the KV cache, ending
    at Phi-3's `<|end|>` or at the end of text."""
    return {
        "do_sample": False, "use_cache": True, "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": [tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.eos_token_id],
    }


def decode_answers(tokenizer, answer_ids) -> list[str]:
    """The text of generated token ids (the prompt cut off), special tokens dropped."""
    return tokenizer.batch_decode(answer_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@torch.no_grad()
def generate_predictions(
    model, processor, dataset: SampleDataset, batch_size: int, max_new_tokens: int, num_workers: int = 0,
    show_progress: bool = True, distributed: Distributed = ONE_PROCESS,
) -> list[dict]:
    """All ranks call this; every rank gets [{"index", "id", "prediction", "references"}] in dataset order."""
    shard = list(range(distributed.rank, len(dataset), distributed.world_size))
    loader = DataLoader(
        dataset.subset(shard), batch_size=batch_size, collate_fn=Phi3VEvalCollator(processor),
        num_workers=num_workers, shuffle=False,
    )
    options = answer_generation_options(processor.tokenizer)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    records, position = [], 0
    for batch in tqdm(loader, desc="generating", disable=not distributed.is_main or not show_progress):
        ids, references = batch.pop("ids"), batch.pop("references")
        inputs = {key: value.to(device) for key, value in batch.items()}
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, **options)
        texts = decode_answers(processor.tokenizer, output[:, inputs["input_ids"].shape[1]:])
        for sample_id, text, refs in zip(ids, texts, references, strict=True):
            records.append({"index": shard[position], "id": sample_id, "prediction": text, "references": refs})
            position += 1
    model.train(was_training)
    gathered = [record for part in distributed.gather(records) for record in part]
    return sorted(gathered, key=lambda record: record["index"])


def evaluation_report(
    model, processor, dataset: SampleDataset, metric: Metric, evaluation: EvaluationConfig, distributed: Distributed,
    show_progress: bool | None = None,
) -> dict:
    """Generate and score, on every rank: the metric's report (the headline score is `report[metric.name]`)."""
    return _scored(metric, _generate(model, processor, dataset, evaluation, distributed, show_progress))


def _generate(model, processor, dataset, evaluation: EvaluationConfig, distributed: Distributed,
              show_progress: bool | None = None) -> list[dict]:
    return generate_predictions(
        model, processor, dataset, evaluation.batch_size, evaluation.max_new_tokens, evaluation.dataloader_num_workers,
        evaluation.show_progress if show_progress is None else show_progress, distributed,
    )


def _scored(metric: Metric, records: list[dict]) -> dict:
    return metric.report(
        [record["id"] for record in records],
        [record["prediction"] for record in records],
        [record["references"] for record in records],
    )


def evaluate(
    model, processor, dataset: SampleDataset, metric: Metric, save_path: Path, evaluation: EvaluationConfig,
    distributed: Distributed,
) -> dict:
    """Generate, score and (rank 0) write `save_path` in the recipe's layout for the metric, and its samples
    file (`samples_path`); every rank gets the report (the headline score is `report[metric.name]`)."""
    records = _generate(model, processor, dataset, evaluation, distributed)
    report = _scored(metric, records)
    if distributed.is_main:
        save_path.parent.mkdir(parents=True, exist_ok=True)
        _write_whole(save_path, json.dumps(report, ensure_ascii=False))
        _write_whole(samples_path(save_path), "".join(
            json.dumps({**record, "score": sample_score(metric, record)}, ensure_ascii=False) + "\n"
            for record in records))
    return report


def sample_score(metric: Metric, record: dict) -> float:
    """The metric of one sample alone (its headline score is their mean: both metrics average over samples)."""
    return _scored(metric, [record])[metric.name]


def samples_path(report_path: Path) -> Path:
    """eval_after.json -> eval_after.samples.jsonl: the per-sample records of that evaluation."""
    return report_path.with_name(f"{report_path.stem}.samples.jsonl")


def read_samples(report_path: Path) -> list[dict] | None:
    """The per-sample records written with `report_path` (None when there are none, e.g. an older run's)."""
    path = samples_path(report_path)
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_whole(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)
