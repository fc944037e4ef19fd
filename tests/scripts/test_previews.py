"""Every script's samples, token for token, against the recipe's collators (hateful memes, NLVR2, DocVQA mini
and --full_train, UCF-101's phi3v_dataset.py single and multi-turn), with the tiny byte-level tokenizer and
with Phi-3.5-vision's real one (tests/fixtures/phi35v_processor).

`recipe_*` below restate what the recipe's scripts do with the original processor (`Phi3VProcessor.__call__`
keeps its behaviour): per turn, the chat template, one processor call with that turn's images, and the
answer `{answer}<|end|>\\n<|endoftext|>` tokenized without special tokens; the previews come from
`common.preview`, the code a run trains with.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import datasets
import pytest
from transformers import AutoProcessor

from common.config import DataConfig
from common.formats import load_conversations
from common.preview import describe, preview_records
from tests.scripts.e2e import (
    SCRIPTS,
    cauldron_rows,
    colour_image,
    colour_task,
    docvqa_rows,
    load_module,
    write_cauldron,
    write_docvqa,
    write_generic,
)

REAL_PROCESSOR = Path(__file__).resolve().parents[1] / "fixtures" / "phi35v_processor"
END = "<|end|>\n<|endoftext|>"
SEED = 42


@pytest.fixture(scope="module", params=["tiny", "real"])
def processor(request, tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir if request.param == "tiny" else REAL_PROCESSOR, num_crops=1)


@pytest.fixture(scope="module")
def scripts():
    modules = {name: load_module(path, f"{name}_script") for name, path in SCRIPTS.items()}
    sys.modules.update({f"{name}_script": module for name, module in modules.items()})
    yield modules
    for name in modules:
        del sys.modules[f"{name}_script"]


def data(dataset_path: Path) -> DataConfig:
    return DataConfig(dataset_path=str(dataset_path), data_dir=None, eval_size=2, max_eval_samples=None, seed=SEED)


def generic_splits(root: Path):
    """(train, eval) of a --data_dir folder in the generic format."""
    return load_conversations(DataConfig(dataset_path=None, data_dir=str(root), eval_size=0, max_eval_samples=None,
                                         seed=SEED))


# ---- the recipe's collators, restated ----------------------------------------------------------------


def recipe_prompt(processor, messages: list[dict], images: list) -> list[int]:
    prompt = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(prompt, images or None).input_ids[0].tolist()


def recipe_training(processor, turns: list[tuple[str, list, str]]) -> tuple[list[int], list[int]]:
    """turns: (user message content, the images of that processor call, answer)."""
    input_ids, labels = [], []
    for content, images, answer in turns:
        prompt_ids = recipe_prompt(processor, [{"role": "user", "content": content}], images)
        answer_ids = processor.tokenizer(answer + END, add_special_tokens=False).input_ids
        input_ids += prompt_ids + answer_ids
        labels += [-100] * len(prompt_ids) + answer_ids
    return input_ids, labels


def recipe_phi3v_eval(processor, conversation: list[dict], images: list) -> list[int]:
    """phi3v_dataset.Phi3VEvalDataset: all turns as chat messages, earlier answers closed by <|end|>\\n<|endoftext|>."""
    messages = []
    for number, turn in enumerate(conversation):
        tags = "".join(f"<|image_{i}|>" for i in range(1, len(turn["images"]) + 1))
        messages.append({"role": "user", "content": f"{tags}\n{turn['user']}"})
        if number + 1 < len(conversation):
            messages.append({"role": "assistant", "content": turn["assistant"] + END})
    return recipe_prompt(processor, messages, images)


def assert_records(records: list[dict], split: str, expected: list[tuple]) -> None:
    got = [record for record in records if record["split"] == split]
    assert len(got) == len(expected)
    for record, (sample_id, input_ids, labels) in zip(got, expected, strict=True):
        assert record["id"] == sample_id
        assert record["input_ids"] == input_ids, f"{split} {sample_id}"
        if split == "train":
            assert record["labels"] == labels, f"{split} {sample_id}"
        else:
            assert "labels" not in record


# ---- per script ----------------------------------------------------------------------------------------


def cauldron_copy(tmp_path, subset: str, count: int) -> tuple[Path, datasets.Dataset]:
    rows = cauldron_rows(subset, count)
    datasets.DatasetDict({"train": rows}).save_to_disk(str(tmp_path / subset))
    return tmp_path / subset, rows


def test_hateful_memes(processor, scripts, tmp_path):
    path, rows = cauldron_copy(tmp_path, "hateful_memes", 5)
    train, evaluation = scripts["hateful_memes"].load_memes(data(path), None)
    records = preview_records(processor, train, evaluation, 2)

    def turn(row):
        text = row["texts"][0]
        return [(f"<|image_1|>\n{text['user']}", [row["images"][0]], text["assistant"])]

    assert_records(records, "train", [(f"hateful_memes-{i}", *recipe_training(processor, turn(rows[i]))) for i in (2, 3)])
    assert_records(records, "eval", [
        (f"hateful_memes-{i}", recipe_prompt(processor, [{"role": "user", "content": turn(rows[i])[0][0]}],
                                             [rows[i]["images"][0]]), None)
        for i in (0, 1)
    ])


def test_nlvr2_trains_every_pair_and_evaluates_the_first(processor, scripts, tmp_path):
    path, rows = cauldron_copy(tmp_path, "nlvr2", 6)
    train, evaluation = scripts["nlvr2"].load_nlvr2(data(path), None)
    records = preview_records(processor, train, evaluation, 2)

    def turns(row):
        return [
            (f"<|image_1|><|image_2|>\n{text['user']}" if number == 0 else text["user"],
             list(row["images"]) if number == 0 else [], text["assistant"])
            for number, text in enumerate(row["texts"])
        ]

    assert [len(rows[i]["texts"]) for i in (2, 3)] == [1, 2]  # single and multi-turn rows
    assert_records(records, "train", [(f"nlvr2-{i}", *recipe_training(processor, turns(rows[i]))) for i in (2, 3)])
    assert_records(records, "eval", [
        (f"nlvr2-{i}", recipe_prompt(processor, [{"role": "user", "content": turns(rows[i])[0][0]}],
                                     list(rows[i]["images"])), None)
        for i in (0, 1)
    ])
    assert len(rows[1]["texts"]) == 2  # evaluation used the first of two pairs


def test_nlvr2_needs_its_image_pair(scripts, tmp_path):
    rows = cauldron_rows("hateful_memes", 3)  # one image per row
    datasets.DatasetDict({"train": rows}).save_to_disk(str(tmp_path / "one_image"))
    train, _ = scripts["nlvr2"].load_nlvr2(data(tmp_path / "one_image"), None)
    with pytest.raises(ValueError, match="sample nlvr2-2: expected exactly 2 image"):
        train[0]


def test_docvqa_mini_train(processor, scripts, tmp_path):
    datasets.DatasetDict({"train": docvqa_rows(4), "test": docvqa_rows(3, 1)}).save_to_disk(str(tmp_path / "mini"))
    train_rows, test_rows = docvqa_rows(4), docvqa_rows(3, 1)
    docvqa = scripts["docvqa"]
    train, evaluation = docvqa.load_docvqa(data(tmp_path / "mini"), docvqa.DocVQAOptions(False, None))
    records = preview_records(processor, train, evaluation, 2)

    def content(row):
        return f"<|image_1|>\n{row['query']['en']}\nAnswer briefly."

    expected_train = []
    for i in range(2):
        answer = random.Random(f"{SEED}-0-{i}").choice(train_rows[i]["answers"])  # epoch 0's draw
        expected_train.append((f"train-{i}", *recipe_training(processor, [(content(train_rows[i]), [train_rows[i]["image"]], answer)])))
    assert_records(records, "train", expected_train)
    assert_records(records, "eval", [
        (f"test-{i}", recipe_prompt(processor, [{"role": "user", "content": content(test_rows[i])}], [test_rows[i]["image"]]), None)
        for i in range(2)
    ])


def test_docvqa_full_train(processor, scripts, tmp_path):
    path, rows = cauldron_copy(tmp_path, "docvqa", 4)
    datasets.DatasetDict({"train": docvqa_rows(1), "test": docvqa_rows(3, 1)}).save_to_disk(str(tmp_path / "mini"))
    docvqa = scripts["docvqa"]
    train, evaluation = docvqa.load_docvqa(data(path), docvqa.DocVQAOptions(True, str(tmp_path / "mini")))
    records = preview_records(processor, train, evaluation, 3)
    expected = []
    for i in range(3):
        text = random.Random(f"{SEED}-0-{i}").choice(rows[i]["texts"])
        expected.append((f"docvqa-{i}", *recipe_training(
            processor, [(f"<|image_1|>\n{text['user']}", [rows[i]["images"][0]], text["assistant"])])))
    assert_records(records, "train", expected)
    assert [r["id"] for r in records if r["split"] == "eval"] == ["test-0", "test-1", "test-2"]


def ucf_folder(tmp_path, conversations: dict[str, list[list[dict]]]) -> Path:
    """A converted-UCF-101-like folder; every image named in a conversation is written (distinct sizes)."""
    images, splits = {}, {}
    for split, samples in conversations.items():
        splits[split] = [{"id": f"{split}-{n:010d}", "source": "ucf101", "conversations": turns}
                         for n, turns in enumerate(samples)]
        for turns in samples:
            for turn in turns:
                for k, name in enumerate(turn["images"]):
                    images[name] = colour_image(["red", "green", "blue"][k % 3], (20 + 3 * len(images), 24))
    return write_generic(tmp_path / "ucf101", splits, images, name="ucf101")


def frames(prefix: str, count: int) -> list[str]:
    return [f"{prefix}.{i}.jpg" for i in range(count)]


def test_ucf101_single_and_multi_turn(processor, tmp_path):
    question = "Classify the video into one of the following classes: Archery, BabyCrawling."
    single = [{"images": frames("train-archery-a", 8), "user": question, "assistant": "Archery"}]
    multi = [  # every turn with its own frames, numbered from 1
        {"images": frames("train-baby-b", 3), "user": question, "assistant": "BabyCrawling"},
        {"images": frames("train-baby-c", 2), "user": "And this one?", "assistant": "Archery"},
    ]
    eval_multi = [  # the later turn without frames: the recipe's evaluation prompt works for it
        {"images": frames("val-archery-d", 2), "user": question, "assistant": "Archery"},
        {"images": [], "user": "Are you sure?", "assistant": "Yes"},
    ]
    root = ucf_folder(tmp_path, {"train": [single, multi], "val": [single, eval_multi]})
    train, evaluation = generic_splits(root)
    records = preview_records(processor, train, evaluation, 2)

    def open_all(names):
        from common.data import open_image
        return [open_image(name, "test", root / "images") for name in names]

    def training(turns):
        return recipe_training(processor, [
            ("".join(f"<|image_{i}|>" for i in range(1, len(t["images"]) + 1)) + "\n" + t["user"],
             open_all(t["images"]), t["assistant"]) for t in turns
        ])

    assert_records(records, "train", [("train-0000000000", *training(single)), ("train-0000000001", *training(multi))])
    assert_records(records, "eval", [
        ("val-0000000000", recipe_phi3v_eval(processor, single, open_all(single[0]["images"])), None),
        ("val-0000000001", recipe_phi3v_eval(processor, eval_multi, open_all(eval_multi[0]["images"])), None),
    ])
    multi_ids = records[1]["input_ids"]
    assert [token for token in dict.fromkeys(multi_ids) if token < 0] == [-1, -2, -3]  # per turn from 1


def test_ucf101_evaluation_prompt_with_frames_in_later_turns(processor, tmp_path):
    """The recipe's processor rejects this prompt (its tags repeat per turn); we keep every turn's frames in
    place: the spans follow the turns, each turn numbered from 1, the frames in conversation order."""
    question = "Classify the video."
    conversation = [
        {"images": frames("val-a", 2), "user": question, "assistant": "Archery"},
        {"images": frames("val-b", 1), "user": "And this one?", "assistant": "BabyCrawling"},
    ]
    root = ucf_folder(tmp_path, {"train": [conversation], "val": [conversation]})
    train, evaluation = generic_splits(root)
    (record,) = [r for r in preview_records(processor, train, evaluation, 1) if r["split"] == "eval"]
    sample = evaluation[0]
    counts = processor.image_processor(sample.images)["num_img_tokens"]
    spans = []
    for token in record["input_ids"]:
        if token < 0:
            if spans and spans[-1][0] == token and spans[-1][2]:
                spans[-1][1] += 1
            else:
                spans.append([token, 1, True])
        elif spans:
            spans[-1][2] = False
    assert [(tag, length) for tag, length, _ in spans] == [(-1, counts[0]), (-2, counts[1]), (-1, counts[2])]
    text = processor.tokenizer.decode([t for t in record["input_ids"] if t >= 0], skip_special_tokens=False)
    assert "Archery<|end|>" in text and "<|endoftext|>" in text and text.count("<|user|>") == 2


def test_readable_view_collapses_image_spans(tmp_path, tiny_model_dir):
    processor = AutoProcessor.from_pretrained(REAL_PROCESSOR, num_crops=1)
    root = ucf_folder(tmp_path, {"train": [[{"images": frames("a", 2), "user": "Which?", "assistant": "Archery"}]],
                                 "val": [[{"images": frames("b", 1), "user": "Which?", "assistant": "Archery"}]]})
    train, evaluation = generic_splits(root)
    text = describe(processor.tokenizer, preview_records(processor, train, evaluation, 1)[0])
    assert text == (
        "sample train-0000000000 (647 tokens):\n"
        "<s><|user|> \n[image 1: 313 tokens]<s>[image 2: 313 tokens]<s> \nWhich?<|end|> \n<|assistant|> "
        "Archery<|end|> \n<|endoftext|>\n"
        "learnt targets:\n"
        '  "Archery<|end|> \\n<|endoftext|>"'
    )


# ---- --preview_samples through the scripts --------------------------------------------------------------


def preview_data(name: str, root: Path) -> list:
    if name == "docvqa":
        return ["--dataset_path", write_docvqa(root / "mini", 3, 2)]
    if name == "ucf101":
        return ["--data_dir", colour_task(root / "colours", 3, 2)]
    return ["--dataset_path", write_cauldron(root / name, name, 5, "disk"), "--eval_size", "2"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_preview_samples_writes_the_preview_and_exits_without_weights(name, launcher, tmp_path):
    """The real processor folder holds no weights: the preview never loads a model."""
    assert not list(REAL_PROCESSOR.glob("*.safetensors"))
    output_dir = tmp_path / "out"
    args = ["--model_name_or_path", REAL_PROCESSOR, "--output_dir", output_dir, "--num_crops", "1",
            "--preview_samples", "2", "--no-tqdm", *preview_data(name, tmp_path)]
    result = launcher.run(SCRIPTS[name], args).check()
    records = [json.loads(line) for line in (output_dir / "data_preview.jsonl").read_text().splitlines()]
    assert [record["split"] for record in records] == ["train", "train", "eval", "eval"]
    for record in records:
        assert list(record) == (["split", "id", "input_ids", "labels"] if record["split"] == "train"
                                else ["split", "id", "input_ids"])
        assert -1 in record["input_ids"]  # image placeholders as the processor emits them
    assert sorted(path.name for path in output_dir.iterdir()) == ["data_preview.jsonl"]
    assert f"sample {records[0]['id']} (" in result.stdout and "learnt targets:" in result.stdout
    assert "[image 1: 313 tokens]" in result.stdout
    assert "4 preview records written to" in result.stdout
    assert "finetuning" not in result.stdout  # no evaluation, no training


def test_preview_samples_must_be_positive(launcher, tmp_path):
    args = ["--model_name_or_path", REAL_PROCESSOR, "--output_dir", tmp_path / "out", "--preview_samples", "0",
            *preview_data("ucf101", tmp_path)]
    result = launcher.run(SCRIPTS["ucf101"], args)
    assert result.returncode == 2 and "--preview_samples must be at least 1, got 0" in result.stderr


def test_preview_samples_shows_the_packs_with_packing(launcher, tmp_path):
    output_dir = tmp_path / "out"
    args = ["--model_name_or_path", REAL_PROCESSOR, "--output_dir", output_dir, "--num_crops", "1",
            "--preview_samples", "3", "--packing", "--batch_size", "2", "--batch_size_per_gpu", "2",
            "--max_packed_tokens", "700", *preview_data("ucf101", tmp_path)]
    result = launcher.run(SCRIPTS["ucf101"], args).check()
    records = [json.loads(line) for line in (output_dir / "data_preview.jsonl").read_text().splitlines()]
    samples = {record["id"]: record for record in records if record["split"] == "train"}
    packs = [record for record in records if record["split"] == "train_pack"]
    # micro-batches of 2 samples in dataset order; two samples of ~330 tokens fit a row of 700
    assert [(pack["micro_batch"], pack["ids"]) for pack in packs] == [(0, ["train-0", "train-1"]), (1, ["train-2"])]
    for pack in packs:
        assert pack["input_ids"] == [token for i in pack["ids"] for token in samples[i]["input_ids"]]
        assert pack["labels"] == [label for i in pack["ids"] for label in samples[i]["labels"]]
        assert pack["position_ids"] == [p for i in pack["ids"] for p in range(len(samples[i]["input_ids"]))]
    assert "micro-batch 0: packed row of" in result.stdout and "samples train-0, train-1" in result.stdout
