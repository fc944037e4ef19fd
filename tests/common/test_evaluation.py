"""common/evaluation.py: batched greedy generation in dataset order and the JSON report."""

import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

import common.evaluation as evaluation_module
from common.config import EvaluationConfig
from common.data import Sample, SampleDataset, Turn
from common.distributed import ONE_PROCESS, Distributed
from common.evaluation import evaluate, generate_predictions, read_samples
from common.metrics import ACCURACY, Metric, normalize_answer

MAX_NEW_TOKENS = 6

SECOND_OF_TWO = Distributed(rank=1, local_rank=1, world_size=2, local_world_size=2, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def samples() -> list[Sample]:
    """Three prompts of different lengths (so batches need left padding), with 1, 0 and 2 images."""
    return [
        Sample("first", [Turn("Is this meme hateful? Answer yes or no.", "no",
                              [Image.new("RGB", (500, 200), (200, 40, 40))])], references=["no", "No."]),
        Sample("second", [Turn("What colour?", "red")]),
        Sample("third", [Turn("The left image contains exactly two dogs. True or False?", "True",
                              [Image.new("RGB", (672, 336), (10, 90, 10)), Image.new("RGB", (200, 500))])]),
    ]


def dataset() -> SampleDataset:
    return SampleDataset(samples(), lambda sample, index, draws: sample)


def greedy_alone(model, processor, sample: Sample) -> str:
    """The recipe's per-sample generation: one prompt, no padding."""
    tags = "".join(f"<|image_{n}|>" for n in range(1, len(sample.images) + 1))
    prompt = f"<|user|>\n{tags}\n{sample.turns[0].user}<|end|>\n<|assistant|>\n"
    inputs = processor(prompt, images=sample.images or None)
    tokenizer = processor.tokenizer
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
            eos_token_id=[tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.eos_token_id],
            pad_token_id=tokenizer.pad_token_id,
        )
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]


@pytest.fixture(scope="module")
def unbatched(model, processor) -> list[str]:
    return [greedy_alone(model, processor, sample) for sample in samples()]


@pytest.mark.parametrize("batch_size", [3, 2])
def test_batched_generation_equals_per_sample_generation(model, processor, unbatched, batch_size):
    model.train()
    records = generate_predictions(model, processor, dataset(), batch_size, MAX_NEW_TOKENS, show_progress=False)
    assert [r["index"] for r in records] == [0, 1, 2]
    assert [r["id"] for r in records] == ["first", "second", "third"]
    assert [r["references"] for r in records] == [["no", "No."], ["red"], ["True"]]
    assert [r["prediction"] for r in records] == unbatched
    assert any(unbatched)  # the comparison is not between empty strings
    assert model.training  # the mode is restored


def test_generation_leaves_an_eval_model_in_eval_mode(model, processor):
    model.eval()
    generate_predictions(model, processor, dataset().subset([1]), 1, 2, show_progress=False)
    assert not model.training


def test_a_ranks_shard_keeps_dataset_ids(model, processor, monkeypatch):
    rows = samples()
    indexed = SampleDataset(rows, lambda sample, index, draws: Sample(f"validation-{index}", sample.turns, sample.references))
    monkeypatch.setattr(Distributed, "gather", lambda self, value: [value])  # this rank's part alone
    records = generate_predictions(model, processor, indexed, 2, 1, show_progress=False, distributed=SECOND_OF_TWO)
    assert [r["index"] for r in records] == [1]
    assert [r["id"] for r in records] == ["validation-1"]


def test_a_ranks_shard_is_every_world_th_sample(model, processor, monkeypatch):
    monkeypatch.setattr(Distributed, "gather", lambda self, value: [value])  # this rank's part alone
    records = generate_predictions(model, processor, dataset(), 2, 1, show_progress=False, distributed=SECOND_OF_TWO)
    assert [(r["index"], r["id"]) for r in records] == [(1, "second")]


# ---- evaluate: the report -----------------------------------------------------------------------------


def eval_config(**overrides) -> EvaluationConfig:
    values = dict(batch_size=3, max_new_tokens=MAX_NEW_TOKENS, skip_before=False, dataloader_num_workers=0,
                  show_progress=False)
    return EvaluationConfig(**{**values, **overrides})


def test_evaluate_writes_the_report_atomically(model, processor, unbatched, tmp_path):
    path = tmp_path / "out" / "eval_before.json"  # the folder does not exist yet
    report = evaluate(model, processor, dataset(), ACCURACY, path, eval_config(), ONE_PROCESS)
    references = [["no", "No."], ["red"], ["True"]]
    assert json.loads(path.read_text()) == report == ACCURACY.report(["first", "second", "third"], unbatched, references)
    assert report["answers_unique"] == ["no", "red", "true"]  # the first reference, normalised
    assert report["generated_texts_unique"] == [normalize_answer(p) for p in unbatched]
    assert sorted(p.name for p in path.parent.iterdir()) == ["eval_before.json", "eval_before.samples.jsonl"]  # no .tmp
    samples = read_samples(path)  # beside the recipe's lists: each sample's answer as generated, and its score
    assert [s["index"] for s in samples] == [0, 1, 2]
    assert [s["id"] for s in samples] == ["first", "second", "third"]
    assert [s["prediction"] for s in samples] == unbatched and [s["references"] for s in samples] == references
    assert [s["score"] for s in samples] == [float(g == a) for g, a in zip(report["generated_texts_unique"],
                                                                            report["answers_unique"], strict=True)]
    assert sum(s["score"] for s in samples) / len(samples) == report["accuracy"]


def test_evaluate_writes_the_metrics_report(monkeypatch, tmp_path):
    records = [
        {"index": 0, "id": "a", "prediction": " Yes.", "references": ["yes"]},
        {"index": 1, "id": "b", "prediction": "No", "references": ["yes", "YES."]},
    ]
    seen = {}

    def fake_generate(model, processor, data, batch_size, max_new_tokens, num_workers, show_progress, distributed):
        seen.update(batch_size=batch_size, max_new_tokens=max_new_tokens, workers=num_workers, progress=show_progress)
        return records

    monkeypatch.setattr(evaluation_module, "generate_predictions", fake_generate)
    path = tmp_path / "eval_after.json"
    path.write_text("old report")
    metric = Metric("anls_like", lambda ids, predictions, references: {"ids": ids, "anls_like": 0.25})
    report = evaluate(
        None, None, None, metric, path, eval_config(batch_size=4, max_new_tokens=9, show_progress=True), ONE_PROCESS
    )
    assert report == {"ids": ["a", "b"], "anls_like": 0.25}
    assert seen == dict(batch_size=4, max_new_tokens=9, workers=0, progress=True)
    assert json.loads(path.read_text()) == report  # replaced
    assert [(s["id"], s["prediction"], s["score"]) for s in read_samples(path)] == [("a", " Yes.", 0.25), ("b", "No", 0.25)]
    assert not list(tmp_path.glob("*.tmp"))


def test_evaluate_writes_nothing_on_other_ranks(monkeypatch, tmp_path):
    monkeypatch.setattr(evaluation_module, "generate_predictions", lambda *a: [
        {"index": 0, "id": "a", "prediction": "yes", "references": ["yes"]}])
    path = tmp_path / "eval.json"
    assert evaluate(None, None, None, ACCURACY, path, eval_config(), SECOND_OF_TWO)["accuracy"] == 1.0  # every rank
    assert not path.exists() and read_samples(path) is None
