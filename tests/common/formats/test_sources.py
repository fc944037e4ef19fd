"""common/formats: where conversations come from (--data_dir, --train_file/--eval_file, a chat-messages
--dataset_path), which part evaluates, and chat-messages datasets read lazily but checked up front."""

from __future__ import annotations

import pickle
from pathlib import Path

import datasets
import pytest
from PIL import Image

from common.config import EVALUATION_RULE, DataConfig
from common.errors import UserError
from common.formats import load_conversations
from common.formats.naming import evaluation_rank, split_by_name
from common.formats.tables import is_messages_dataset
from tests.common.formats.same_conversations import CHAT, GENERIC, write_images, write_jsonl

FEATURES = datasets.Features({
    "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.List(
        {"type": datasets.Value("string"), "text": datasets.Value("string")})}),
    "images": datasets.List(datasets.Image()),
})


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def config(eval_size: int = 2, **sources) -> DataConfig:
    return DataConfig(**{"dataset_path": None, "data_dir": None, **sources}, eval_size=eval_size,
                      max_eval_samples=None, seed=0)


def ids(dataset) -> list[str]:
    return [dataset[i].id for i in range(len(dataset))]


@pytest.mark.parametrize("name, rank", [
    ("mydata_val", 0), ("val", 0), ("x-validation", 0), ("set.valid2", 0), ("docs_eval", 1), ("evaluation", 1),
    ("ucf101_test", 2), ("llava_v1_5_mix665k", None), ("mydata_train", None), ("values", None), ("contest", None),
    ("docs_valset", None), ("x_values", None),
])
def test_evaluation_names(name, rank):
    assert evaluation_rank(name) == rank


def test_validation_files_are_preferred_and_test_files_then_unused():
    files = [Path(name) for name in ("a_train.jsonl", "b.json", "a_test.jsonl", "a_val.jsonl", "b_val.json")]
    assert split_by_name(files) == ([Path("a_train.jsonl"), Path("b.json")], [Path("a_val.jsonl"), Path("b_val.json")])
    assert split_by_name(files[:3]) == (files[:2], [Path("a_test.jsonl")])


def test_names_that_only_look_like_evaluation_names_are_reported(caplog):
    files = [Path(name) for name in ("docs_valset.jsonl", "x_values.jsonl", "dev.jsonl", "docs.jsonl", "docs_val.jsonl")]
    with caplog.at_level("WARNING"):
        assert split_by_name(files) == (files[:4], files[4:])
    reported = [record.getMessage() for record in caplog.records]
    assert len(reported) == 3 and all(EVALUATION_RULE in message for message in reported)
    assert reported[0].startswith("docs_valset.jsonl trains: its name looks like an evaluation file's")
    assert reported[0].endswith("rename it, e.g. to docs_valset_val.jsonl, if it should evaluate")


def test_a_data_dir_mixes_formats_and_files(tmp_path):
    write_images(tmp_path / "images")
    write_jsonl(tmp_path / "one_train.jsonl", GENERIC[:2])
    write_jsonl(tmp_path / "two.jsonl", CHAT[2:4])
    write_jsonl(tmp_path / "three_val.jsonl", CHAT[4:])
    write_jsonl(tmp_path / "three_test.jsonl", [{"not": "read"}])  # a validation file wins: test files unused
    (tmp_path / "notes.txt").write_text("not data")
    write_jsonl(tmp_path / ".tool.state.jsonl", [{"frames": 8}])  # hidden: a tool's bookkeeping, not data
    train, evaluation = load_conversations(config(data_dir=str(tmp_path)))
    assert ids(train) == ["single", "several", "later", "text"] and ids(evaluation) == ["system", "inline"]


def test_without_evaluation_files_the_first_eval_size_samples_evaluate(tmp_path):
    write_images(tmp_path)
    path = write_jsonl(tmp_path / "all.jsonl", CHAT)
    train, evaluation = load_conversations(config(eval_size=2, train_file=str(path)))
    assert ids(evaluation) == ["single", "several"] and ids(train) == ["later", "text", "system", "inline"]
    with pytest.raises(UserError, match=rf"--train_file {path} has no evaluation file or split, and --eval_size 6 "
                                        "would hold out all 6 samples"):
        load_conversations(config(eval_size=6, train_file=str(path)))


def test_an_eval_file_evaluates(tmp_path):
    write_images(tmp_path)
    train, evaluation = load_conversations(config(train_file=str(write_jsonl(tmp_path / "t.jsonl", CHAT[:3])),
                                                  eval_file=str(write_jsonl(tmp_path / "e.jsonl", CHAT[3:4]))))
    assert (ids(train), ids(evaluation)) == (["single", "several", "later"], ["text"])


@pytest.mark.parametrize("files, message", [
    ({}, "no .json or .jsonl files"),
    ({"x_val.jsonl": GENERIC[:1]}, "only evaluation files (x_val.jsonl)"),
])
def test_data_dir_problems(tmp_path, files, message):
    for name, records in files.items():
        write_jsonl(tmp_path / name, records)
    with pytest.raises(UserError, match=rf"--data_dir {tmp_path}: " + message.replace("(", r"\(").replace(")", r"\)")):
        load_conversations(config(data_dir=str(tmp_path)))


def test_the_tasks_own_data_is_not_conversations(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"texts": [[{"user": "q", "assistant": "a"}]]})}) \
        .save_to_disk(str(tmp_path / "cauldron"))
    assert load_conversations(config(dataset_path=str(tmp_path / "cauldron"))) is None
    assert load_conversations(config()) is None  # the hub
    assert not is_messages_dataset(tmp_path / "missing")


# ---- chat-messages datasets -----------------------------------------------------------------------------


def row(question: str, answer: str, images: list) -> dict:
    content = [{"type": "image", "text": None}] * len(images) + [{"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": content},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}], "images": images}


def table(rows: list[dict], features=FEATURES) -> datasets.Dataset:
    return datasets.Dataset.from_list(rows, features=features)


def colour(size) -> Image.Image:
    return Image.new("RGB", size, (200, 10, 10))


def test_a_dataset_dict_with_a_test_split(tmp_path):
    splits = {"train": table([row("q0", "a0", [colour((20, 10))]), row("q1", "a1", [])]),
              "test": table([row("q2", "a2", [colour((10, 30))])])}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "d"))
    assert is_messages_dataset(tmp_path / "d")
    train, evaluation = load_conversations(config(dataset_path=str(tmp_path / "d")))
    assert ids(train) == ["train-0", "train-1"] and ids(evaluation) == ["evaluation-0"]
    assert train[0].images[0].size == (20, 10) and train[1].images == []
    assert train.has_text_only_samples() and not evaluation.has_text_only_samples()
    restored = pickle.loads(pickle.dumps(train.subset([1, 0])))  # data-loader workers get it pickled
    assert ids(restored) == ["train-1", "train-0"]


def test_parquet_files_with_image_paths(tmp_path):
    write_images(tmp_path / "data" / "images")
    paths = datasets.Features({**FEATURES, "images": datasets.List(datasets.Value("string"))})
    table([row("q", "red", ["red.png"]), row("q", "green", ["green.png"])], paths).to_parquet(str(tmp_path / "data" / "train.parquet"))
    table([row("q", "blue", ["blue.png"])], paths).to_parquet(str(tmp_path / "data" / "val.parquet"))
    train, evaluation = load_conversations(config(dataset_path=str(tmp_path / "data")))
    assert [train[i].turns[0].assistant for i in range(2)] == ["red", "green"]
    assert evaluation[0].images[0].size == Image.open(tmp_path / "data" / "images" / "blue.png").size
    train, evaluation = load_conversations(config(eval_size=1, dataset_path=str(tmp_path / "data" / "train.parquet")))
    assert (len(train), len(evaluation)) == (1, 1)  # a single file: held out
    train, _ = load_conversations(config(eval_size=0, dataset_path=str(tmp_path / "data" / "val.parquet")))
    assert train[0].turns[0].assistant == "blue"  # a single file trains, whatever its name


@pytest.mark.parametrize("bad, fragment", [
    (row("q", "", [colour((8, 8))]), "row 2: messages[1]: empty answer"),
    (row("q", "a", [colour((8, 8))]) | {"images": []}, "row 2: 1 image placeholder(s)"),
    ({"messages": [{"role": "assistant", "content": [{"type": "text", "text": "a"}]},
                   {"role": "user", "content": [{"type": "text", "text": "q"}]}], "images": []},
     "row 2: messages[0]: the conversation starts with an answer"),
])
def test_bad_rows_are_found_when_the_dataset_loads(tmp_path, bad, fragment):
    rows = [row("q", "a", [colour((8, 8))]), row("q", "a", []), bad]
    table(rows).to_parquet(str(tmp_path / "rows.parquet"))
    with pytest.raises(UserError) as info:
        load_conversations(config(eval_size=1, dataset_path=str(tmp_path / "rows.parquet")))
    assert str(info.value).startswith(f"{tmp_path / 'rows.parquet'} (train) ") and fragment in str(info.value)


def test_a_missing_image_path_in_a_dataset(tmp_path):
    paths = datasets.Features({**FEATURES, "images": datasets.List(datasets.Value("string"))})
    table([row("q", "a", ["gone.png"])], paths).to_parquet(str(tmp_path / "rows.parquet"))
    with pytest.raises(UserError, match=r"row 0: image gone.png does not exist"):
        load_conversations(config(eval_size=0, dataset_path=str(tmp_path / "rows.parquet")))
