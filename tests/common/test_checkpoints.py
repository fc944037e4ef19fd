"""Checkpoints count only when complete: the manifest written last, what makes a folder incomplete, which
checkpoint a run resumes from, rotation that never leaves no complete checkpoint, and the ResumableTrainer
that writes them (a save that dies half-way, a resume from the checkpoint at max_steps)."""

import errno
import json

import pytest
import torch
from transformers import TrainerCallback

from common import checkpoints
from common.checkpoints import (
    COMPLETE_FILE,
    IncompleteCheckpointError,
    OutOfDiskSpaceError,
    ResumableTrainer,
    check_complete,
    export_checkpoint_model,
    mark_complete,
    newest_complete_checkpoint,
    remove_checkpoint,
    rotate_checkpoints,
    why_incomplete,
    writing,
)
from common.config import TrainingEvaluationConfig
from common.distributed import Distributed
from common.metrics import ACCURACY
from common.training_evaluation import BestCheckpointCallback
from tests.common.regression_trainer import regression_trainer, weights


def write_checkpoint(output_dir, step: int, complete: bool = True):
    folder = output_dir / f"checkpoint-{step}"
    (folder / f"global_step{step}").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"w" * 100)
    (folder / f"global_step{step}" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o" * 300)
    (folder / "trainer_state.json").write_text("{}")
    if complete:
        mark_complete(folder)
    return folder


def test_a_marked_checkpoint_lists_every_file_with_its_size(tmp_path):
    folder = write_checkpoint(tmp_path, 3)
    assert why_incomplete(folder) is None
    manifest = json.loads((folder / COMPLETE_FILE).read_text())
    assert manifest == {"step": 3, "files": {
        "global_step3/zero_pp_rank_0_mp_rank_00_optim_states.pt": 300, "model.safetensors": 100,
        "trainer_state.json": 2,
    }}
    assert not list(folder.glob("*.tmp"))


@pytest.mark.parametrize("damage, reason", [
    (lambda folder: (folder / COMPLETE_FILE).unlink(), f"no {COMPLETE_FILE}"),
    (lambda folder: (folder / "model.safetensors").write_bytes(b"w" * 10), "model.safetensors has 10 bytes instead of 100"),
    (lambda folder: (folder / "global_step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink(),
     "global_step3/zero_pp_rank_0_mp_rank_00_optim_states.pt is missing"),
    (lambda folder: (folder / COMPLETE_FILE).write_text('{"files": '), f"{COMPLETE_FILE} is unreadable"),
], ids=["unmarked", "truncated", "missing shard", "torn manifest"])
def test_what_makes_a_checkpoint_incomplete(tmp_path, damage, reason):
    folder = write_checkpoint(tmp_path, 3)
    damage(folder)
    assert reason in why_incomplete(folder)


def test_the_newest_complete_checkpoint_by_step_number(tmp_path):
    for step in (2, 9):
        write_checkpoint(tmp_path, step)
    write_checkpoint(tmp_path, 10, complete=False)  # numerically newest, not lexically
    (tmp_path / "checkpoint-11.tmp").mkdir()  # not a checkpoint name
    newest, skipped = newest_complete_checkpoint(tmp_path)
    assert newest == tmp_path / "checkpoint-9"
    assert [folder.name for folder, _ in skipped] == ["checkpoint-10"]
    assert newest_complete_checkpoint(tmp_path / "absent") == (None, [])


def test_an_explicit_incomplete_checkpoint_is_refused_with_the_one_to_use(tmp_path):
    write_checkpoint(tmp_path, 2)
    incomplete = write_checkpoint(tmp_path, 4, complete=False)
    assert check_complete(tmp_path / "checkpoint-2") == tmp_path / "checkpoint-2"
    with pytest.raises(IncompleteCheckpointError) as error:
        check_complete(incomplete)
    assert str(error.value) == (
        f"--resume_from_checkpoint {incomplete} is not a complete checkpoint (no {COMPLETE_FILE}: it was not "
        f"finished being written); the newest complete checkpoint beside it is {tmp_path / 'checkpoint-2'}"
    )
    with pytest.raises(IncompleteCheckpointError, match="give one of them, e.g. .*checkpoint-4"):
        check_complete(tmp_path)  # the output folder instead of a checkpoint in it


def test_a_deletion_killed_half_way_leaves_an_incomplete_folder(tmp_path, monkeypatch):
    folder = write_checkpoint(tmp_path, 2)
    monkeypatch.setattr(checkpoints.shutil, "rmtree", lambda *args, **kwargs: None)  # killed before any file went
    remove_checkpoint(folder)
    assert folder.is_dir() and why_incomplete(folder) is not None


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (1, 2, 3):
        write_checkpoint(tmp_path, step)
    write_checkpoint(tmp_path, 4, complete=False)  # a leftover of a killed save, older than the new one
    write_checkpoint(tmp_path, 9, complete=False)  # newer: the run has not rewritten it yet
    newest = write_checkpoint(tmp_path, 5)
    rotate_checkpoints(tmp_path, 2, newest)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-5", "checkpoint-9"]
    rotate_checkpoints(tmp_path, None, newest)  # no limit: nothing goes
    assert len(list(tmp_path.iterdir())) == 3


def test_rotation_never_deletes_the_best_checkpoint(tmp_path):
    best = write_checkpoint(tmp_path, 1)
    for step in (2, 3):
        write_checkpoint(tmp_path, step)
    newest = write_checkpoint(tmp_path, 4)
    rotate_checkpoints(tmp_path, 2, newest, best)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-3", "checkpoint-4"]


def test_the_trainer_marks_its_checkpoints_and_keeps_the_newest(tmp_path):
    trainer = regression_trainer(tmp_path, max_steps=6, save_steps=2, keep=2)
    trainer.train()
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert why_incomplete(tmp_path / "checkpoint-6") is None
    saved = json.loads((tmp_path / "checkpoint-6" / COMPLETE_FILE).read_text())["files"]
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(saved)


class DiesWhileSaving(ResumableTrainer):
    """Dies after the weights and optimizer of checkpoint-4 are written, before the rest."""

    def _save_rng_state(self, output_dir):
        if output_dir.endswith("checkpoint-4"):
            raise SystemExit("killed")
        super()._save_rng_state(output_dir)


def test_a_save_that_dies_half_way_leaves_the_previous_checkpoint_complete(tmp_path):
    with pytest.raises(SystemExit):
        regression_trainer(tmp_path, max_steps=6, save_steps=2, keep=1, trainer_class=DiesWhileSaving).train()
    assert (tmp_path / "checkpoint-4" / "model.safetensors").is_file()
    assert f"no {COMPLETE_FILE}" in why_incomplete(tmp_path / "checkpoint-4")
    assert why_incomplete(tmp_path / "checkpoint-2") is None  # --save_total_limit 1 waits for a complete one
    assert newest_complete_checkpoint(tmp_path)[0] == tmp_path / "checkpoint-2"


def test_a_rewritten_checkpoint_holds_only_the_new_files(tmp_path):
    leftover = write_checkpoint(tmp_path, 2, complete=False)  # of a save killed half-way
    regression_trainer(tmp_path, max_steps=2, save_steps=2).train()
    assert not (leftover / "global_step2").exists() and why_incomplete(leftover) is None


def test_a_save_at_a_step_with_a_complete_checkpoint_keeps_it(tmp_path):
    """A stop requested right after checkpoint-2 was written saves at step 2 again: the complete one stays."""
    trainer = regression_trainer(tmp_path, max_steps=2, save_steps=2)
    trainer.train()
    manifest = (tmp_path / "checkpoint-2" / COMPLETE_FILE).read_text()
    trainer._save_checkpoint(trainer.model, None)
    assert (tmp_path / "checkpoint-2" / COMPLETE_FILE).read_text() == manifest
    assert why_incomplete(tmp_path / "checkpoint-2") is None


class PeersGone(Distributed):
    """A rank whose peers were killed: its next collective fails."""

    def gather(self, value) -> list:
        raise torch.distributed.DistError("Connection closed by peer")


def test_a_save_whose_peers_are_gone_touches_nothing(tmp_path):
    trainer = regression_trainer(tmp_path, max_steps=2, save_steps=2)
    trainer.train()
    leftover = write_checkpoint(tmp_path, 4, complete=False)
    trainer.distributed = PeersGone(rank=0, local_rank=0, world_size=2, local_world_size=2, device=torch.device("cpu"))
    for step in (2, 4):  # the step of the newest complete checkpoint, a step with a leftover
        trainer.state.global_step = step
        with pytest.raises(torch.distributed.DistError):
            trainer._save_checkpoint(trainer.model, None)
    assert why_incomplete(tmp_path / "checkpoint-2") is None
    assert (leftover / "model.safetensors").is_file()


def test_resuming_from_the_checkpoint_at_max_steps_trains_nothing(tmp_path):
    # 4 steps per epoch: step 6 is in the middle of the second epoch
    finished = regression_trainer(tmp_path, max_steps=6, save_steps=3)
    finished.train()
    resumed = regression_trainer(tmp_path, max_steps=6, save_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    assert resumed.state.global_step == 6
    assert not (tmp_path / "checkpoint-7").exists()
    assert torch.equal(weights(resumed), weights(finished))


def test_resuming_from_a_middle_checkpoint_is_exact(tmp_path):
    uninterrupted = regression_trainer(tmp_path / "a", max_steps=6, save_steps=3)
    uninterrupted.train()
    resumed = regression_trainer(tmp_path / "a", max_steps=6, save_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert torch.equal(weights(resumed), weights(uninterrupted))


def _list_as_rank(rank: int, root, port: int, results) -> None:
    import torch.distributed as dist

    from common.distributed import Distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        view = root / f"view_of_rank_{rank}"  # what each node sees of one checkpoint folder on a shared filesystem
        distributed = Distributed(rank=rank, local_rank=rank, world_size=2, local_world_size=2, device=torch.device("cpu"))
        results[rank] = checkpoints._files_of_all_ranks(view, distributed)
    finally:
        dist.destroy_process_group()


def test_the_manifest_holds_what_every_rank_wrote_even_if_another_lists_it_late(tmp_path):
    import multiprocessing
    import socket

    for rank, files in ((0, {"model.safetensors": 100, "zero_pp_rank_0.pt": 30}),
                        (1, {"model.safetensors": 40, "zero_pp_rank_1.pt": 30})):  # rank 1: a stale, shorter view
        for name, size in files.items():
            (tmp_path / f"view_of_rank_{rank}").mkdir(exist_ok=True)
            (tmp_path / f"view_of_rank_{rank}" / name).write_bytes(b"x" * size)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("fork")
    with context.Manager() as manager:
        results = manager.dict()
        ranks = [context.Process(target=_list_as_rank, args=(rank, tmp_path, port, results)) for rank in (0, 1)]
        for process in ranks:
            process.start()
        for process in ranks:
            process.join(60)
        assert [process.exitcode for process in ranks] == [0, 0]
        expected = {"model.safetensors": 100, "zero_pp_rank_0.pt": 30, "zero_pp_rank_1.pt": 30}
        assert results[0] == results[1] == expected


class DiskFullWhileSaving(ResumableTrainer):
    """The filesystem fills up while checkpoint-4 is written (after its weights and optimizer)."""

    def _save_rng_state(self, output_dir):
        if output_dir.endswith("checkpoint-4"):
            raise OSError(errno.ENOSPC, "No space left on device")
        super()._save_rng_state(output_dir)


def test_a_full_disk_while_saving_is_one_error_naming_what_where_and_the_checkpoint_to_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "_free_bytes", lambda path: 2048)
    with pytest.raises(OutOfDiskSpaceError) as error:
        regression_trainer(tmp_path, max_steps=6, save_steps=2, trainer_class=DiskFullWhileSaving).train()
    assert str(error.value) == (
        f"out of disk space writing the checkpoint checkpoint-4 to {tmp_path / 'checkpoint-4'} (2.0 KiB free there); "
        "free space (or choose an --output_dir on a larger filesystem) and run again: the same command resumes from "
        f"{tmp_path / 'checkpoint-2'}, the newest complete checkpoint"
    )
    assert why_incomplete(tmp_path / "checkpoint-2") is None


@pytest.mark.parametrize("failure, free, converted", [
    (OSError(errno.ENOSPC, "No space left on device"), 0, True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), 10**9, True),
    (Exception("Error while serializing: I/O error: No space left on device (os error 28)"), 0, True),  # safetensors
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), 4096, True),  # torch.save
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), 10**10, False),
    (OSError(errno.EACCES, "Permission denied"), 0, False),
], ids=["ENOSPC", "quota", "safetensors", "torch.save, disk nearly full", "torch.save, space left", "permission"])
def test_which_failures_are_a_full_disk(tmp_path, monkeypatch, failure, free, converted):
    monkeypatch.setattr(checkpoints, "_free_bytes", lambda path: free)
    expected = OutOfDiskSpaceError if converted else type(failure)
    with pytest.raises(expected) as error, writing("the evaluation eval_after.json", tmp_path / "eval_after.json",
                                                   tmp_path):
        raise failure
    if converted:
        assert str(error.value).startswith(f"out of disk space writing the evaluation eval_after.json to "
                                           f"{tmp_path / 'eval_after.json'} (")
        assert str(error.value).endswith("no complete checkpoint yet: the same command starts the run again")
    else:
        assert error.value is failure


def test_the_export_copies_the_model_and_leaves_the_training_state(tmp_path):
    checkpoint, output_dir = tmp_path / "checkpoint-2", tmp_path / "out"
    (checkpoint / "global_step2").mkdir(parents=True)
    output_dir.mkdir()
    model_files = {"model.safetensors": "weights", "preprocessor_config.json": "{}", "training_args.bin": "args",
                   "adapter_model.safetensors": "adapter", "tokenizer.json": "{}"}
    state_files = ["optimizer.pt", "scheduler.pt", "rng_state.pth", "rng_state_1.pth", "trainer_state.json",
                   "latest", "zero_to_fp32.py", "checkpoint_complete.json", "global_step2/shard.pt"]
    for name, text in model_files.items():
        (checkpoint / name).write_text(text)
    for name in state_files:
        (checkpoint / name).write_text("state")
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "phi3_v", "use_cache": False}))
    export_checkpoint_model(checkpoint, output_dir)
    assert sorted(path.name for path in output_dir.iterdir()) == sorted([*model_files, "config.json"])
    assert all((output_dir / name).read_text() == text for name, text in model_files.items())
    assert json.loads((output_dir / "config.json").read_text()) == {"model_type": "phi3_v", "use_cache": True}


class ScoredEveryTwoSteps(TrainerCallback):
    """Hands the real BestCheckpointCallback a score every second step, the best at step 2 (as --eval_steps 2)."""

    def __init__(self, watch: BestCheckpointCallback):
        self.watch = watch

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % 2 == 0:
            score = 1.0 if state.global_step == 2 else 0.0
            self.watch.on_evaluate(args, state, control, metrics={"eval_accuracy": score})


def test_save_total_limit_keeps_the_best_checkpoint_beyond_the_count(tmp_path):
    """--keep_best with --save_total_limit 1: the Trainer state's best checkpoint (which BestCheckpointCallback sets
    and the rotation reads) survives every later save."""
    watch = BestCheckpointCallback(TrainingEvaluationConfig(eval_steps=2, keep_best=True), ACCURACY, num_samples=1)
    trainer = regression_trainer(tmp_path, max_steps=8, save_steps=2, keep=1, callbacks=[ScoredEveryTwoSteps(watch)])
    trainer.train()
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-8"]
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    assert why_incomplete(tmp_path / "checkpoint-2") is None
