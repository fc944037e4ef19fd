"""common/run_directory.py: the run's identity (what gates automatic resume and the reuse of the evaluation before
training), the branch an explicit resume abandons, and what a failed run leaves."""

import json
from dataclasses import dataclass

import pytest

from common.arguments import build_parser, resolve_run_config
from common.checkpoints import mark_complete, newest_complete_checkpoint, why_incomplete
from common.config import OutputConfig
from common.distributed import ONE_PROCESS
from common.errors import UserError
from common.metrics import ANLS
from common.run_directory import (
    ABANDONED_PREFIX,
    discard_half_written_outputs,
    record_run,
    resolve_checkpoint,
    run_identity,
)
from common.task import Task
from tests.common.test_checkpoints import write_checkpoint


@dataclass(frozen=True)
class Options:
    full_train: bool


TASK = Task("DocVQA", ANLS, lambda data, options: None, Options)


@pytest.fixture(autouse=True)
def _workspace(monkeypatch, tmp_path_factory):
    """One process; the data paths the flags name exist (relative to the working directory)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    workspace = tmp_path_factory.mktemp("workspace")
    for folder in ("data", "images", "model"):
        (workspace / folder).mkdir()
    for name in ("a.jsonl", "b.jsonl", "model/config.json"):
        (workspace / name).write_text("")
    monkeypatch.chdir(workspace)
    return workspace


def identity(*argv: str) -> dict:
    parser = build_parser("test")
    parser.add_argument("--full_train", action="store_true")
    return run_identity(TASK.name, resolve_run_config(parser.parse_args(["--data_dir", "data", *argv]), TASK))


@pytest.mark.parametrize("flags", [
    ["--full_train"], ["--seed", "7"], ["--batch_size", "32"], ["--image_folder", "images"],
    ["--train_file", "a.jsonl", "--eval_file", "b.jsonl", "--data_dir", ""], ["--learning_rate", "1e-5"],
    ["--use_lora"], ["--num_crops", "4"], ["--eval_steps", "5"], ["--max_new_tokens", "8"],
], ids=lambda flags: flags[0])
def test_every_setting_that_changes_the_result_is_in_the_identity(flags):
    assert identity(*flags) != identity()


@pytest.mark.parametrize("flags", [
    ["--output_dir", "elsewhere"], ["--save_steps", "7"], ["--save_total_limit", "2"], ["--logging_steps", "3"],
    ["--report_to", "tensorboard"], ["--dataloader_num_workers", "0"], ["--no-tqdm"], ["--verbose"],
    ["--batch_size_per_gpu", "2"], ["--eval_batch_size", "4"], ["--gradient_checkpointing", "off"],
], ids=lambda flags: flags[0])
def test_settings_that_do_not_change_the_result_are_not(flags):
    assert identity(*flags) == identity()


def test_relative_model_and_data_paths_are_resolved(_workspace):
    resolved = identity("--model_name_or_path", "model")
    assert resolved["model.name_or_path"] == str(_workspace / "model")
    assert resolved["data.data_dir"] == str(_workspace / "data")


def test_a_checkpoint_of_another_run_is_refused_naming_the_settings_that_differ(tmp_path):
    write_checkpoint(tmp_path, 2)
    record_run(tmp_path, identity(), ONE_PROCESS)
    outputs = OutputConfig(str(tmp_path), 2, None, None, False)
    assert resolve_checkpoint(outputs, identity(), ONE_PROCESS) == tmp_path / "checkpoint-2"
    with pytest.raises(UserError) as error:
        resolve_checkpoint(outputs, identity("--full_train", "--seed", "7"), ONE_PROCESS)
    assert f"{tmp_path} holds checkpoint-2 of another run (data.seed 42 -> 7; task_options.full_train False -> " \
           "True; training.seed 42 -> 7)" in str(error.value)
    assert f"--resume_from_checkpoint {tmp_path / 'checkpoint-2'}" in str(error.value)


def trainer_checkpoint(output_dir, step: int):
    folder = write_checkpoint(output_dir, step, complete=False)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    mark_complete(folder)


def test_an_explicit_resume_sets_aside_the_abandoned_newer_checkpoints(tmp_path):
    for step in (100, 200, 300):
        trainer_checkpoint(tmp_path, step)
    outputs = OutputConfig(str(tmp_path), 100, 1, str(tmp_path / "checkpoint-100"), False)
    assert resolve_checkpoint(outputs, identity(), ONE_PROCESS) == tmp_path / "checkpoint-100"
    assert [path.name for path in tmp_path.glob("checkpoint-*")] == ["checkpoint-100"]
    (aside,) = tmp_path.glob(f"{ABANDONED_PREFIX}*")
    assert sorted(path.name for path in aside.iterdir()) == ["checkpoint-200", "checkpoint-300"]
    assert newest_complete_checkpoint(tmp_path)[0] == tmp_path / "checkpoint-100"  # what an automatic resume takes


def test_a_failed_run_keeps_what_is_complete_and_removes_what_it_half_wrote(tmp_path):
    (tmp_path / "eval_before.json").write_text("{}")  # hours at full size
    (tmp_path / "runs").mkdir()  # the TensorBoard logs that show a divergence
    (tmp_path / "runs" / "events.out.tfevents").write_text("")
    record_run(tmp_path, identity(), ONE_PROCESS)
    write_checkpoint(tmp_path, 2)
    write_checkpoint(tmp_path, 4, complete=False)
    discard_half_written_outputs(tmp_path, created_output_dir=True, distributed=ONE_PROCESS)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-2", "eval_before.json", "run.json", "runs"]
    assert why_incomplete(tmp_path / "checkpoint-2") is None


def test_a_failed_run_that_wrote_nothing_leaves_no_folder(tmp_path):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    discard_half_written_outputs(output_dir, created_output_dir=True, distributed=ONE_PROCESS)
    assert not output_dir.exists()
