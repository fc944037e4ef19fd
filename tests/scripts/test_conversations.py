"""Conversation data through the scripts: a LLaVA file mixing text-only and image samples trains end to end
with full finetuning under DeepSpeed ZeRO-2 and with LoRA (one process; two processes in the slow suite);
bad data stops with one line naming file and line, before the model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.common.formats.same_conversations import write_all
from tests.scripts.e2e import (
    COLOUR_QUESTION,
    SCRIPTS,
    STRATEGIES,
    assert_finished_run,
    colour_image,
    colour_names,
    fast_args,
    finish,
    free_port,
    read_eval,
    torchrun,
)
from tests.scripts.test_bad_input import assert_clean_failure

NUM_EVAL = 2
REAL_PROCESSOR = Path(__file__).resolve().parents[1] / "fixtures" / "phi35v_processor"


def llava_records(count: int) -> list[dict]:
    """Every second record text-only; one with a system message, one with two images in its turn."""
    records = []
    for i, colour in enumerate(colour_names(count)):
        if i % 2:
            records.append({"id": f"text-{i}", "conversations": [
                {"from": "human", "value": f"Which colour is called {colour}?"}, {"from": "gpt", "value": colour}]})
            continue
        images = [f"{colour}.png"] * (2 if i == 2 else 1)
        conversation = [{"from": "human", "value": "<image>\n" * len(images) + COLOUR_QUESTION},
                        {"from": "gpt", "value": colour}]
        if i == 4:
            conversation.insert(0, {"from": "system", "value": "Answer with one word."})
        records.append({"id": f"image-{i}", "image": images, "conversations": conversation})
    return records


def write_llava(root: Path, records: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in colour_names(3):
        colour_image(name).save(root / f"{name}.png")
    path = root / "colours.json"
    path.write_text(json.dumps(records, indent=1))
    return path


@pytest.fixture(scope="module")
def runs(launcher, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    data = write_llava(root / "data", llava_records(6))
    jobs = {
        "full": (SCRIPTS["ucf101"], fast_args(tiny_model_dir, root / "full", "--train_file", data,
                                              "--eval_size", str(NUM_EVAL), *STRATEGIES["full"])),
        "lora": (SCRIPTS["hateful_memes"], fast_args(tiny_model_dir, root / "lora", "--train_file", data,
                                                     "--eval_size", str(NUM_EVAL), "--metric", "anls",
                                                     *STRATEGIES["lora"])),
    }
    return root, launcher.run_many(jobs)


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_a_mixed_llava_file_trains_saves_reloads_and_evaluates(runs, strategy, tiny_model_dir):
    root, results = runs
    assert_finished_run(results[strategy], root / strategy, strategy, tiny_model_dir, num_eval=NUM_EVAL)
    assert "training samples: 4, evaluation samples: 2" in results[strategy].stderr + results[strategy].stdout
    report = read_eval(root / strategy, "after")
    if strategy == "full":  # the generic script's metric: accuracy by id, the held-out first records
        assert [answer["id"] for answer in report["answers_unique"]] == ["image-0", "text-1"]
    else:  # --metric anls in another task's script: ANLS against the last answer
        assert report["answers_unique"] == [["red"], ["green"]] and "anls" in report
    assert (root / strategy / "run.json").read_text().count(str(root / "data" / "colours.json")) == 1


@pytest.mark.slow
def test_two_processes_with_text_only_batches(tiny_model_dir, tmp_path):
    """LoRA under DDP, where a rank's micro-batch has no image: the vision adapters get no gradient there."""
    data = write_llava(tmp_path / "data", llava_records(6))
    output_dir = tmp_path / "out"
    args = fast_args(tiny_model_dir, output_dir, "--train_file", data, "--eval_size", str(NUM_EVAL),
                     "--batch_size", "2", "--batch_size_per_gpu", "1", *STRATEGIES["lora"])
    result = finish(torchrun(SCRIPTS["ucf101"], args, "--nproc_per_node=2", f"--master_port={free_port()}",
                             cwd=tmp_path))
    assert_finished_run(result, output_dir, "lora", tiny_model_dir, num_eval=NUM_EVAL)


def unknown_format(root: Path) -> tuple[list, list]:
    (root / "notes.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    return ["--data_dir", root], [f"{root / 'notes.jsonl'}:1: unknown format", "LLaVA/ShareGPT", "chat messages"]


def placeholder_count(root: Path) -> tuple[list, list]:
    records = llava_records(4)
    records[2]["image"] = ["red.png"]  # its turn has two <image>
    return ["--train_file", write_llava(root, records)], [
        f"{root / 'colours.json'}:", "2 image placeholder(s) <image> in the human messages but 1 image(s)"]


def missing_image(root: Path) -> tuple[list, list]:
    records = llava_records(4)
    records[0]["image"] = ["nowhere.png"]
    return ["--train_file", write_llava(root, records)], [f"{root / 'colours.json'}:", "image nowhere.png does not exist"]


def answer_first(root: Path) -> tuple[list, list]:
    records = llava_records(4)
    records[3]["conversations"].reverse()
    return ["--train_file", write_llava(root, records)], ["conversations[0]: the conversation starts with an answer"]


def empty_answer(root: Path) -> tuple[list, list]:
    records = llava_records(4)
    records[1]["conversations"][1]["value"] = ""
    return ["--train_file", write_llava(root, records)], ["conversations[1]: empty answer"]


def roles_out_of_order(root: Path) -> tuple[list, list]:
    records = llava_records(4)
    records[1]["conversations"].insert(1, {"from": "human", "value": "And?"})
    return ["--train_file", write_llava(root, records)], ["conversations[1]: roles out of order: 'human' where 'gpt'"]


@pytest.mark.parametrize("case", [unknown_format, placeholder_count, missing_image, answer_first, empty_answer,
                                  roles_out_of_order], ids=lambda case: case.__name__)
def test_bad_conversation_data_stops_before_the_model_loads(case, launcher, tiny_model_dir, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    write_llava(root, llava_records(4))
    extra, expected = case(root)
    output_dir = tmp_path / "out"
    result = launcher.run(SCRIPTS["ucf101"], fast_args(tiny_model_dir, output_dir, *extra), cwd=tmp_path)
    assert_clean_failure(result.returncode, result.stderr, expected, output_dir)
    assert "process(es)" not in result.stdout + result.stderr  # stopped while reading the data


def test_preview_samples_of_every_format_are_the_same(launcher, tmp_path):
    """--preview_samples through the script, with the real tokenizer: the generic folder, the LLaVA folder, the
    chat file and the chat dataset write the same data_preview.jsonl."""
    sources = write_all(tmp_path / "data", train=slice(None), evaluation=slice(None))
    previews = {}
    for name, values in sources.items():
        flags = [item for flag, value in values.items() for item in (f"--{flag}", value)]
        output_dir = tmp_path / name
        args = ["--model_name_or_path", REAL_PROCESSOR, "--output_dir", output_dir, "--num_crops", "1",
                "--preview_samples", "6", "--no-tqdm", *flags]
        launcher.run(SCRIPTS["ucf101"], args).check()
        previews[name] = (output_dir / "data_preview.jsonl").read_text()
    assert len(previews["generic"].splitlines()) == 12
    assert all(preview == previews["generic"] for preview in previews.values()), [
        name for name, preview in previews.items() if preview != previews["generic"]]
