"""common/inference.py: what a model path holds, the questions of a file or a prompt, scores and the answers file."""

import json

import pytest

from common.errors import UserError
from common.inference import (
    Answer,
    ModelSource,
    file_dataset,
    locate_model,
    prompt_dataset,
    score,
    write_answers,
)
from common.metrics import ACCURACY, ANLS


def folder_with(path, *files, content="{}"):
    path.mkdir(parents=True)
    for name in files:
        (path / name).write_text(content)
    return path


def test_a_full_model_folder_is_loaded_as_it_is(tmp_path):
    folder = folder_with(tmp_path / "run", "config.json", "model.safetensors", "preprocessor_config.json")
    assert locate_model(str(folder)) == ModelSource(str(folder), None, str(folder))


def test_an_adapter_loads_on_the_base_its_config_names_unless_overridden(tmp_path):
    folder = folder_with(tmp_path / "lora", "adapter_model.safetensors", "processor_config.json")
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/base"}))
    assert locate_model(str(folder)) == ModelSource("/models/base", str(folder), str(folder))
    assert locate_model(str(folder), "/elsewhere/base").weights == "/elsewhere/base"


def test_an_adapter_without_a_processor_takes_the_bases(tmp_path):
    folder = folder_with(tmp_path / "lora", "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base"}))
    assert locate_model(str(folder)).processor == "org/base"


def test_an_adapter_config_without_a_base_asks_for_base_model(tmp_path):
    folder = folder_with(tmp_path / "lora", "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": None}))
    with pytest.raises(UserError, match="names no base model; give it with --base_model"):
        locate_model(str(folder))


def test_a_run_folder_with_checkpoints_only_names_one(tmp_path):
    folder = folder_with(tmp_path / "run", "run.json")
    folder_with(folder / "checkpoint-2", "config.json")
    folder_with(folder / "checkpoint-10", "config.json")
    with pytest.raises(UserError, match=f"holds no model .*give one, e.g. {folder / 'checkpoint-10'}"):
        locate_model(str(folder))


@pytest.mark.parametrize("path", ["./missing", "/no/such/model", "a/b/c"])
def test_a_path_that_is_no_folder_is_refused(path):
    with pytest.raises(UserError, match=f"--model {path}: no such folder"):
        locate_model(path)


def test_a_hub_id_is_loaded_from_the_hub():
    assert locate_model("microsoft/Phi-3.5-vision-instruct") == ModelSource(
        "microsoft/Phi-3.5-vision-instruct", None, "microsoft/Phi-3.5-vision-instruct")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_a_file_may_leave_out_the_last_answer_and_reads_images_from_images(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"")
    path = write_jsonl(tmp_path / "q.jsonl", [
        {"id": "one", "conversations": [{"images": ["a.png"], "user": "Q1", "assistant": "A1"}, {"user": "Q2"}]},
        {"id": "two", "conversations": [{"images": ["a.png"], "user": "Q", "assistant": "yes"}]},
    ])
    dataset = file_dataset(str(path))
    first, second = dataset.rows
    assert first.turns[-1].assistant == "" and first.turns[0].assistant == "A1"
    assert second.references == ["yes"]
    assert first.turns[0].images == [str(tmp_path / "images" / "a.png")]


def test_a_missing_image_of_a_file_names_the_sample_and_the_file(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"id": "s1", "conversations": [{"images": ["gone.png"], "user": "Q"}]}])
    with pytest.raises(UserError, match="q.jsonl:1: image gone.png does not exist"):
        file_dataset(str(path))


def test_an_earlier_turn_still_needs_its_answer(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"id": "s1", "conversations": [{"user": "Q1"}, {"user": "Q2"}]}])
    with pytest.raises(UserError, match=r"q.jsonl:1: conversations\[0\] must be an object with 'user' and 'assistant'"):
        file_dataset(str(path))


def test_a_missing_prompt_image_is_refused(tmp_path):
    with pytest.raises(UserError, match=f"--image: no such file: {tmp_path / 'gone.png'}"):
        prompt_dataset("Q", [str(tmp_path / "gone.png")])


def test_scores_count_only_answers_with_a_reference():
    answers = [Answer("a", "Yes.", "yes"), Answer("b", "no", "yes"), Answer("c", "maybe", None)]
    assert score(answers, ACCURACY) == 0.5
    assert score([Answer("a", "Total: 42", "Total: 42")], ANLS) == 1.0
    assert score([Answer("c", "maybe", None)], ACCURACY) is None


def test_answers_are_written_whole_one_line_each(tmp_path):
    path = tmp_path / "out" / "answers.jsonl"
    write_answers([Answer("a", "rouge", "red"), Answer("b", "blue", None)], path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"id": "a", "prediction": "rouge", "reference": "red"}, {"id": "b", "prediction": "blue", "reference": None}]
    assert sorted(p.name for p in path.parent.iterdir()) == ["answers.jsonl"]


def test_a_llava_file_may_leave_out_the_last_answer(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    path = tmp_path / "q.json"
    path.write_text(json.dumps([
        {"id": "one", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ1"},
                                                          {"from": "gpt", "value": "A1"},
                                                          {"from": "human", "value": "Q2"}]},
    ]))
    (sample,) = file_dataset(str(path)).rows
    assert [(turn.user, turn.assistant, turn.images) for turn in sample.turns] == [
        ("Q1", "A1", [str(tmp_path / "a.png")]), ("Q2", "", [])]
