"""common/data.py: samples, image opening, local dataset copies and the_cauldron (conversation formats:
tests/common/formats/)."""

import io
import json
import random
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

from common import data as data_module
from common.config import DataConfig
from common.data import (
    Sample,
    SampleDataset,
    Turn,
    base_dir_of,
    first_images,
    load_cauldron_splits,
    load_split,
    open_image,
)
from common.formats import load_conversations
from common.trainer import DrawEpochCallback


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Keep datasets' parquet/json caches out of the user's cache folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def png_bytes(size=(8, 6), colour=(255, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: Path, size=(8, 6), colour=(255, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(size, colour))
    return path


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


# ---- Sample -------------------------------------------------------------------------------------------


def test_references_default_to_the_last_answer():
    sample = Sample("s", [Turn("q1", "first"), Turn("q2", "second")])
    assert sample.references == ["second"]


def test_explicit_references_are_kept():
    sample = Sample("s", [Turn("q", "a")], references=["a", "A.", "an a"])
    assert sample.references == ["a", "A.", "an a"]


def test_a_sample_needs_turns():
    with pytest.raises(ValueError, match="sample empty-7"):
        Sample("empty-7", [])


def test_images_of_all_turns_in_order():
    sample = Sample("s", [Turn("q1", "a1", ["x", "y"]), Turn("q2", "a2"), Turn("q3", "a3", ["z"])])
    assert sample.images == ["x", "y", "z"]


# ---- open_image ---------------------------------------------------------------------------------------


def test_open_pil_image_is_returned_as_is():
    image = Image.new("RGB", (5, 4))
    assert open_image(image, "s") is image


def test_open_path_relative_to_base_dir(tmp_path):
    write_png(tmp_path / "images" / "a.png", size=(12, 7))
    image = open_image("a.png", "s", base_dir=tmp_path / "images")
    assert image.size == (12, 7)
    assert image.getpixel((0, 0)) == (255, 0, 0)  # decoded


def test_open_absolute_path_ignores_base_dir(tmp_path):
    path = write_png(tmp_path / "abs.png", size=(3, 9))
    assert open_image(str(path), "s", base_dir=tmp_path / "elsewhere").size == (3, 9)
    assert open_image(path, "s").size == (3, 9)  # a Path works too


def test_open_embedded_bytes():
    image = open_image({"bytes": png_bytes((10, 11), (0, 255, 0)), "path": "ignored.png"}, "s")
    assert image.size == (10, 11)
    assert image.getpixel((5, 5)) == (0, 255, 0)


@pytest.mark.parametrize("bytes_key", [False, True])
def test_open_path_dict(tmp_path, bytes_key):
    write_png(tmp_path / "b.png", size=(4, 4))
    source = {"bytes": None, "path": "b.png"} if bytes_key else {"path": "b.png"}  # datasets' Image dicts
    assert open_image(source, "s", base_dir=tmp_path).size == (4, 4)


def test_missing_file_names_the_sample_and_the_path(tmp_path):
    with pytest.raises(ValueError) as info:
        open_image("nope/missing.png", "train-42", base_dir=tmp_path)
    message = str(info.value)
    assert "sample train-42" in message
    assert str(tmp_path / "nope" / "missing.png") in message


def test_corrupt_file_names_the_sample_and_the_path(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ValueError) as info:
        open_image("bad.jpg", "val-3", base_dir=tmp_path)
    assert "sample val-3" in str(info.value) and str(bad) in str(info.value)


def test_truncated_file_fails_on_open_not_later(tmp_path):
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(png_bytes((64, 64))[:60])
    with pytest.raises(ValueError, match="sample cut-1.*cut.png"):
        open_image(truncated, "cut-1")


def test_corrupt_bytes_are_named_as_embedded():
    with pytest.raises(ValueError, match=r"sample s9: cannot read image <embedded bytes>"):
        open_image({"bytes": b"garbage"}, "s9")


@pytest.fixture
def generic_dir(tmp_path) -> Path:
    root = tmp_path / "ucf"
    write_png(root / "images" / "train" / "t.0.png", size=(20, 10))
    write_png(root / "images" / "train" / "t.1.png", size=(30, 10))
    write_png(root / "images" / "val" / "v.0.png", size=(40, 10))
    write_jsonl(root / "ucf101_train.jsonl", [
        {"id": "train-1", "conversations": [
            {"images": ["train/t.0.png", "train/t.1.png"], "user": "Classify.", "assistant": "Archery"}]},
        {"id": "train-2", "conversations": [{"user": "No image here.", "assistant": "Fine"}]},
    ])
    write_jsonl(root / "ucf101_val.jsonl", [
        {"id": "val-1", "conversations": [{"images": ["val/v.0.png"], "user": "Classify.", "assistant": "Basketball"}]},
    ])
    return root


def generic_splits(root: Path):
    data = DataConfig(dataset_path=None, data_dir=str(root), eval_size=0, max_eval_samples=None, seed=0)
    return load_conversations(data)


# ---- SampleDataset.subset -----------------------------------------------------------------------------


def _row_sample(row, index: int, draws) -> Sample:
    return Sample(id=row["name"], turns=[Turn(row["question"], row["answer"])])


def test_subset_of_list_rows():
    rows = [{"name": f"n{i}", "question": f"q{i}", "answer": f"a{i}"} for i in range(5)]
    dataset = SampleDataset(rows, _row_sample, base_dir=Path("/base"))
    subset = dataset.subset([3, 1])
    assert len(subset) == 2
    assert [subset[i].id for i in range(2)] == ["n3", "n1"]
    assert subset.base_dir == Path("/base")
    assert len(dataset) == 5  # the original is untouched


def test_subset_of_dataset_rows():
    rows = datasets.Dataset.from_dict({
        "name": [f"n{i}" for i in range(5)], "question": ["q"] * 5, "answer": [f"a{i}" for i in range(5)],
    })
    subset = SampleDataset(rows, _row_sample).subset([4, 0, 2])
    assert isinstance(subset.rows, datasets.Dataset)
    assert [subset[i].id for i in range(3)] == ["n4", "n0", "n2"]
    assert subset[0].turns[0].assistant == "a4"
    assert len(subset.subset(range(1))) == 1


# ---- load_split: hub and local copies -----------------------------------------------------------------


def _rows(prefix: str, count: int) -> dict:
    return {"question": [f"{prefix}{i}" for i in range(count)], "answers": [[f"ans{i}"] for i in range(count)]}


def test_load_split_from_the_hub_by_name(monkeypatch):
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or "rows")
    assert load_split("HuggingFaceM4/the_cauldron", "nlvr2", "train") == "rows"
    assert calls == [(("HuggingFaceM4/the_cauldron", "nlvr2"), {"split": "train"})]


def test_load_split_from_a_saved_dataset_dict(tmp_path):
    path = tmp_path / "docvqa"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(_rows("t", 3)),
        "validation": datasets.Dataset.from_dict(_rows("v", 2)),
    }).save_to_disk(str(path))
    assert load_split("hub/id", None, "train", str(path))["question"] == ["t0", "t1", "t2"]
    assert load_split("hub/id", None, "validation", str(path))["question"] == ["v0", "v1"]
    with pytest.raises(ValueError) as info:
        load_split("hub/id", None, "test", str(path))
    assert "['train', 'validation']" in str(info.value) and "'test'" in str(info.value)


def test_load_split_from_a_saved_dataset_is_train_only(tmp_path):
    path = tmp_path / "cauldron"
    datasets.Dataset.from_dict(_rows("t", 4)).save_to_disk(str(path))
    assert load_split("hub/id", "x", "train", str(path))["question"] == ["t0", "t1", "t2", "t3"]
    with pytest.raises(ValueError, match="single split.*'validation'"):
        load_split("hub/id", "x", "validation", str(path))


def test_load_split_from_a_parquet_file(tmp_path):
    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_dict(_rows("p", 3)).to_parquet(str(path))
    rows = load_split("hub/id", None, "train", str(path))
    assert rows["question"] == ["p0", "p1", "p2"] and rows["answers"][2] == ["ans2"]
    with pytest.raises(ValueError, match="single split"):
        load_split("hub/id", None, "validation", str(path))


def test_load_split_from_a_jsonl_file(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"question": "j0", "answers": ["a"]}, {"question": "j1", "answers": []}])
    assert load_split("hub/id", None, "train", str(path))["question"] == ["j0", "j1"]


def test_load_split_from_a_folder_of_split_files(tmp_path):
    folder = tmp_path / "docvqa"
    folder.mkdir()
    datasets.Dataset.from_dict(_rows("a", 2)).to_parquet(str(folder / "train-00000-of-00002.parquet"))
    datasets.Dataset.from_dict(_rows("b", 1)).to_parquet(str(folder / "train-00001-of-00002.parquet"))
    datasets.Dataset.from_dict(_rows("v", 3)).to_parquet(str(folder / "validation-00000-of-00001.parquet"))
    assert load_split("hub/id", None, "train", str(folder))["question"] == ["a0", "a1", "b0"]
    assert load_split("hub/id", None, "validation", str(folder))["question"] == ["v0", "v1", "v2"]
    with pytest.raises(ValueError, match=r"no test\*\.parquet or test\*\.jsonl files"):
        load_split("hub/id", None, "test", str(folder))


def test_load_split_refuses_mixed_file_kinds(tmp_path):
    datasets.Dataset.from_dict(_rows("a", 1)).to_parquet(str(tmp_path / "train-0.parquet"))
    write_jsonl(tmp_path / "train-1.jsonl", [{"question": "x", "answers": []}])
    with pytest.raises(ValueError, match="one kind"):
        load_split("hub/id", None, "train", str(tmp_path))


def test_base_dir_of(tmp_path):
    file = write_jsonl(tmp_path / "rows.jsonl", [{}])
    assert base_dir_of(None) is None
    assert base_dir_of(str(file)) == tmp_path
    assert base_dir_of(str(tmp_path)) == tmp_path


# ---- the_cauldron -------------------------------------------------------------------------------------


def cauldron_rows(count: int) -> dict:
    """Rows in the_cauldron's schema; row i has (i % 3) images of width 10 + i, and row 1 two turns."""
    images, texts = [], []
    for i in range(count):
        images.append([Image.new("RGB", (10 + i, 5 + k)) for k in range(i % 3)])
        turns = [{"user": f"question {i}", "assistant": f"answer {i}", "source": "test"}]
        if i == 1:
            turns.append({"user": "follow-up", "assistant": "again", "source": "test"})
        texts.append(turns)
    return {"images": images, "texts": texts}


@pytest.fixture
def cauldron_copy(tmp_path) -> Path:
    path = tmp_path / "nlvr2"
    features = datasets.Features({
        "images": datasets.Sequence(datasets.Image()),
        "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string"),
                   "source": datasets.Value("string")}],
    })
    datasets.Dataset.from_dict(cauldron_rows(6), features=features).save_to_disk(str(path))
    return path


def first_pair(row, index: int, draws) -> Sample:
    text = row["texts"][0]
    return Sample(f"rows-{index}", [Turn(text["user"], text["assistant"], list(row["images"]))])


def drawn_pair(row, index: int, draws) -> Sample:
    text = draws.choice(row["texts"])
    return Sample(f"rows-{index}", [Turn(text["user"], text["assistant"], list(row["images"]))])


def test_cauldron_holds_out_the_first_rows_for_evaluation(cauldron_copy):
    train, evaluation = load_cauldron_splits("nlvr2", str(cauldron_copy), 2, first_pair, first_pair)
    assert (len(train), len(evaluation)) == (4, 2)
    assert [evaluation[i].id for i in range(2)] == ["rows-0", "rows-1"]
    assert [train[i].id for i in range(4)] == ["rows-2", "rows-3", "rows-4", "rows-5"]  # row indices
    assert [evaluation[i].turns[0].user for i in range(2)] == ["question 0", "question 1"]
    assert train[0].turns[0].assistant == "answer 2"
    two_images = train[0]  # row 2
    assert [image.size for image in two_images.images] == [(12, 5), (12, 6)]
    assert all(isinstance(image, Image.Image) for image in two_images.images)


def test_cauldron_eval_size_larger_than_the_data(cauldron_copy):
    train, evaluation = load_cauldron_splits("hateful_memes", str(cauldron_copy), 100, first_pair, first_pair)
    assert (len(train), len(evaluation)) == (0, 6)
    assert evaluation[5].id == "rows-5"


def test_first_images_names_the_sample():
    row = {"images": ["a", "b", "c"]}
    assert first_images(row, "s", 1) == ["a"]
    assert first_images({"images": ["a", "b"]}, "s", 2, exact=True) == ["a", "b"]
    with pytest.raises(ValueError, match="sample s: expected exactly 2 image"):
        first_images(row, "s", 2, exact=True)
    with pytest.raises(ValueError, match="sample t: expected 1 image.*found 0"):
        first_images({"images": []}, "t", 1)


def test_cauldron_from_a_jsonl_copy_resolves_image_paths_next_to_the_file(tmp_path):
    write_png(tmp_path / "img" / "a.png", size=(7, 3))
    write_png(tmp_path / "img" / "b.png", size=(9, 3))
    path = write_jsonl(tmp_path / "memes.jsonl", [
        {"images": ["img/a.png"], "texts": [{"user": "hateful?", "assistant": "no"}]},
        {"images": ["img/b.png"], "texts": [{"user": "hateful?", "assistant": "yes"}]},
    ])
    train, evaluation = load_cauldron_splits("hateful_memes", str(path), 1, first_pair, first_pair)
    assert evaluation[0].images[0].size == (7, 3)
    assert train[0].images[0].size == (9, 3) and train[0].id == "rows-1"


def test_cauldron_reads_the_hub_when_no_copy_is_given(monkeypatch):
    seen = []

    def fake_load_split(hub_id, subset, split, dataset_path=None):
        seen.append((hub_id, subset, split, dataset_path))
        return datasets.Dataset.from_dict({"images": [[], []], "texts": [[{"user": "u", "assistant": "a"}]] * 2})

    monkeypatch.setattr(data_module, "load_split", fake_load_split)
    train, evaluation = load_cauldron_splits("nlvr2", None, 1, first_pair, first_pair)
    assert seen == [("HuggingFaceM4/the_cauldron", "nlvr2", "train", None)]
    assert (len(train), len(evaluation)) == (1, 1) and train.base_dir is None


def test_cauldron_ids_survive_subsetting(cauldron_copy):
    train, evaluation = load_cauldron_splits("nlvr2", str(cauldron_copy), 4, first_pair, first_pair)
    shard = evaluation.subset([1, 3])  # what generate_predictions does on rank 1 of 2
    assert [shard[i].id for i in range(2)] == ["rows-1", "rows-3"]
    assert [train.subset([1])[0].id] == ["rows-5"]


# ---- random draws: (seed, epoch, row index) -----------------------------------------------------------


def many_pairs(count: int = 8, pairs: int = 50) -> list[dict]:
    return [{"images": [], "texts": [{"user": f"q{i}-{k}", "assistant": f"a{k}"} for k in range(pairs)]}
            for i in range(count)]


def drawn(dataset) -> list[str]:
    return [dataset[i].turns[0].user for i in range(len(dataset))]


def test_draws_depend_on_seed_epoch_and_row_only():
    dataset = SampleDataset(many_pairs(), drawn_pair, seed=1)
    first = drawn(dataset)
    assert first == drawn(SampleDataset(many_pairs(), drawn_pair, seed=1))  # reproducible
    assert [dataset[i].turns[0].user for i in reversed(range(8))] == first[::-1]  # order does not matter
    assert first != drawn(SampleDataset(many_pairs(), drawn_pair, seed=2))
    dataset.set_epoch(1)
    second_epoch = drawn(dataset)
    assert second_epoch != first  # a fresh draw every epoch
    dataset.set_epoch(0)
    assert drawn(dataset) == first  # a resumed epoch draws the same again
    assert dataset.subset([3])[0].turns[0].user == first[3]  # a subset draws as its original rows


def test_the_epoch_callback_follows_the_trainers_epoch():
    from transformers import TrainerControl, TrainerState

    dataset = SampleDataset(many_pairs(), drawn_pair)
    callback = DrawEpochCallback(dataset)
    for epoch, expected in ((0, 0), (2.0, 2), (1.5, 1), (None, 0)):  # fresh, next epoch, resumed mid-epoch
        callback.on_epoch_begin(None, TrainerState(epoch=epoch), TrainerControl())
        assert dataset.epoch == expected


def test_datasets_pickle_for_spawned_workers(cauldron_copy, generic_dir):
    """DataLoader workers started with spawn/forkserver receive the dataset pickled: no lambdas or closures."""
    import pickle

    train, evaluation = load_cauldron_splits("nlvr2", str(cauldron_copy), 2, first_pair, first_pair)
    generic_train, _ = generic_splits(generic_dir)
    train.set_epoch(3)
    for dataset in (train, evaluation.subset([1]), generic_train.subset([1, 0])):
        restored = pickle.loads(pickle.dumps(dataset))
        assert [restored[i].id for i in range(len(restored))] == [dataset[i].id for i in range(len(dataset))]
        assert restored.epoch == dataset.epoch


def test_text_only_samples_are_detected_in_the_generic_format(generic_dir, cauldron_copy):
    train, evaluation = generic_splits(generic_dir)
    assert train.has_text_only_samples() and not evaluation.has_text_only_samples()
    assert not load_cauldron_splits("nlvr2", str(cauldron_copy), 2, first_pair, first_pair)[0].has_text_only_samples()


class _DrawRecorder(torch.nn.Module):
    """Stands in for the model: records which row and which drawn pair every training step saw."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward(self, rows, pairs):
        self.seen += list(zip(rows.tolist(), pairs.tolist(), strict=True))
        return {"loss": self.weight.sum() * 0 + self.weight.square().sum()}


def _collate_draws(samples: list[Sample]) -> dict:
    return {
        "rows": torch.tensor([int(sample.id.split("-")[1]) for sample in samples]),
        "pairs": torch.tensor([int(sample.turns[0].assistant[1:]) for sample in samples]),
    }


def test_each_epoch_draws_afresh_in_data_loader_workers_under_the_trainer(tmp_path):
    """The Trainer with 2 data-loader workers (each epoch's workers copy the dataset when iteration starts):
    every step sees the draw of (seed, epoch, row)."""
    from transformers import Trainer, TrainingArguments

    rows, epochs, seed = 6, 3, 7
    dataset = SampleDataset(many_pairs(rows), drawn_pair, seed=seed)
    model = _DrawRecorder()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, num_train_epochs=epochs, dataloader_num_workers=2,
        report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True, seed=seed, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=_collate_draws,
                      callbacks=[DrawEpochCallback(dataset)])
    trainer.train()
    assert len(model.seen) == rows * epochs
    expected_by_epoch = []
    for epoch in range(epochs):
        seen = dict(model.seen[epoch * rows : (epoch + 1) * rows])
        expected = {row: random.Random(f"{seed}-{epoch}-{row}").randrange(50) for row in range(rows)}
        assert seen == expected, f"epoch {epoch}"
        expected_by_epoch.append(expected)
    assert expected_by_epoch[0] != expected_by_epoch[1] != expected_by_epoch[2]
