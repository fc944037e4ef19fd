"""One conversation gives the same tokens in every format: generic, LLaVA/ShareGPT, chat messages (file and
dataset), with the tiny byte-level tokenizer and Phi-3.5-vision's real one; and the tokens are the recipe's
layout, checked against prompts written out by hand."""

from __future__ import annotations

from itertools import groupby
from pathlib import Path

import datasets
import pytest
from transformers import AutoProcessor

from common.config import DataConfig
from common.formats import load_conversations
from common.preview import preview_records
from tests.common.formats.same_conversations import GENERIC, SYSTEM, write_all

REAL_PROCESSOR = Path(__file__).resolve().parents[2] / "fixtures" / "phi35v_processor"
END = "<|end|>\n<|endoftext|>"


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


@pytest.fixture(scope="module", params=["tiny", "real"])
def processor(request, tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir if request.param == "tiny" else REAL_PROCESSOR, num_crops=1)


def config(**sources) -> DataConfig:
    return DataConfig(**{"dataset_path": None, "data_dir": None, **sources}, eval_size=2, max_eval_samples=None,
                      seed=0)


def previews(processor, sources: dict) -> list[dict]:
    train, evaluation = load_conversations(config(**sources))
    return preview_records(processor, train, evaluation, len(GENERIC))


def test_every_format_gives_the_generic_formats_tokens(processor, tmp_path):
    formats = write_all(tmp_path, train=slice(None), evaluation=slice(None))
    expected = previews(processor, formats.pop("generic"))
    assert [r["id"] for r in expected if r["split"] == "train"] == [r["id"] for r in GENERIC]
    for name, sources in formats.items():
        got = previews(processor, sources)
        assert [r["id"] for r in got] == [r["id"] for r in expected], name
        for mine, theirs in zip(got, expected, strict=True):
            assert mine == theirs, f"{name}: {mine['split']} {mine['id']}"


def test_held_out_evaluation_is_the_same_in_every_format(processor, tmp_path):
    """Without evaluation files the first --eval_size samples evaluate, whatever the format."""
    formats = write_all(tmp_path, train=slice(None), evaluation=None)
    expected = previews(processor, formats.pop("generic"))
    assert [(r["split"], r["id"]) for r in expected] == (
        [("train", r["id"]) for r in GENERIC[2:]] + [("eval", r["id"]) for r in GENERIC[:2]])
    for name, sources in formats.items():
        assert previews(processor, sources) == expected, name


def decode(processor, ids: list[int]) -> str:
    """The text of ids, each image span as `[image N]`."""
    parts = []
    for tag, run in groupby(ids, key=lambda token: min(token, 0)):
        parts.append(f"[image {-tag}]" if tag else processor.tokenizer.decode(list(run), skip_special_tokens=False))
    return "".join(parts)


def test_the_layout_is_the_recipes(tmp_path):
    """Spelled out with the real tokenizer: tags per turn from 1, leading tags concatenated before a newline,
    in-place tags where the placeholders stood, the system message first and never learnt."""
    processor = AutoProcessor.from_pretrained(REAL_PROCESSOR, num_crops=1)
    formats = write_all(tmp_path, train=slice(None), evaluation=slice(None))
    records = {(r["split"], r["id"]): r for r in previews(processor, formats["llava"])}

    def prompt_and_targets(sample_id):
        record = records[("train", sample_id)]
        learnt = [token if label != -100 else None for token, label in zip(record["input_ids"], record["labels"], strict=True)]
        targets, current = [], []
        for token in learnt + [None]:
            if token is None and current:
                targets.append(processor.tokenizer.decode(current, skip_special_tokens=False).replace(" \n", "\n"))
                current = []
            elif token is not None:
                current.append(token)
        return decode(processor, record["input_ids"]).replace(" \n", "\n"), targets

    text, targets = prompt_and_targets("later")
    assert text.count("<s>") == 6  # BOS before each turn and after each image
    assert "<|user|>\n[image 1]<s>\nWhat colour is this?<|end|>" in text
    assert "<|user|>\n[image 1]<s>[image 2]<s>\nAnd these two?<|end|>" in text
    assert "<s><|user|>\n\nWere any two the same?<|end|>" in text  # a turn without images: `\n{text}`
    assert targets == ["green" + END, "blue, red" + END, "No." + END]

    text, targets = prompt_and_targets("inline")
    # each text chunk after an image is tokenized on its own, with BOS and SentencePiece's leading space
    assert "<|user|>\nIs [image 1]<s>  darker than [image 2]<s> ?<|end|>" in text
    assert "<|user|>\nDescribe this one:\n[image 1]<s><|end|>" in text
    assert targets == ["No" + END, "A green square." + END]

    text, targets = prompt_and_targets("system")
    assert text.startswith(f"<s><|system|>\n{SYSTEM}<|end|>\n<|user|>\n[image 1]<s>\nWhat colour is this?")
    assert text.count("<|system|>") == 1 and targets == ["blue" + END, "Yes" + END]
    evaluation = decode(processor, records[("eval", "system")]["input_ids"]).replace(" \n", "\n")
    assert evaluation.startswith(f"<s><|system|>\n{SYSTEM}<|end|>\n<|user|>\n[image 1]<s>\nWhat colour is this?<|end|>")
    assert evaluation.endswith(f"blue{END}<|end|>\n<|user|>\n\nSure?<|end|>\n<|assistant|>")
