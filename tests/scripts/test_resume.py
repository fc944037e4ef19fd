"""Resuming is exact, wherever a run was stopped: a resumed run ends with the weights (and the logged loss) of
the uninterrupted run, for full finetuning under DeepSpeed ZeRO-2 and LoRA (frozen vision and QLoRA: slow).

Kill points: after the last checkpoint, before the final save (the resumed run trains nothing more and
finishes the run); SIGKILL while checkpoint-4 is written (automatic resume skips it, says so, and continues
from checkpoint-2; an explicit path to it is one clear error); Ctrl-C (SIGINT to the process group, DataLoader
worker included) without --save_steps; SIGTERM to one of two torchrun workers (both stop at the same step).
The data: 6 training rows in steps of 2, so --max_steps 4 ends in the middle of the second epoch, and
--save_steps 2 writes checkpoint-2 (in the first epoch) and checkpoint-4 (the last). The LoRA runs that are
stopped by a signal train 8 steps, so that the signal finds training running even on a fast machine.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import torch

from common.checkpoints import COMPLETE_FILE, why_incomplete
from tests.scripts.e2e import (
    REPO_ROOT,
    SCRIPTS,
    STRATEGIES,
    fast_args,
    finish,
    free_port,
    script_env,
    tensors,
    torchrun,
    write_cauldron,
)

SCRIPT = SCRIPTS["hateful_memes"]
KILLED_AT_CHECKPOINT = REPO_ROOT / "tests" / "scripts" / "_killed_at_checkpoint.py"
WEIGHTS = {"full": "model.safetensors", "frozen": "model.safetensors", "lora": "adapter_model.safetensors",
           "qlora": "adapter_model.safetensors"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cauldron(tmp_path_factory.mktemp("resume") / "memes", "hateful_memes", 7, "disk")


def args_for(model_dir, output_dir, data, strategy: str, *extra, evaluate_before: bool = False):
    return fast_args(model_dir, output_dir, "--dataset_path", data, "--eval_size", "1", "--max_steps", "4",
                     *([] if evaluate_before else ["--skip_eval_before"]), *STRATEGIES[strategy], *map(str, extra))


def assert_same_weights(reference_dir, output_dir, strategy: str):
    expected, actual = tensors(reference_dir / WEIGHTS[strategy]), tensors(output_dir / WEIGHTS[strategy])
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.allclose(expected[key], actual[key], atol=1e-6), key


def logged_losses(checkpoint) -> dict[int, float]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def assert_clean(result):
    assert "Traceback" not in result.stdout + result.stderr, result.tail()


@pytest.fixture(
    scope="module",
    params=["full", "lora", pytest.param("frozen", marks=pytest.mark.slow), pytest.param("qlora", marks=pytest.mark.slow)],
)
def killed(request, launcher, tiny_model_dir, data, tmp_path_factory):
    """{"strategy", "root", kind: Result} for an uninterrupted run, runs stopped at each kill point and their
    resumptions."""
    strategy, root = request.param, tmp_path_factory.mktemp(request.param)

    def job(name: str, *extra):
        return SCRIPT, args_for(tiny_model_dir, root / name, data, strategy, "--save_steps", "2", *extra)

    killed_job = job("killed")
    runs = launcher.run_many({
        "uninterrupted": job("uninterrupted"),
        "killed": (KILLED_AT_CHECKPOINT, ["while-saving", "4", killed_job[0], *killed_job[1]]),
    })
    runs["uninterrupted"].check()
    # Stopped after its last checkpoint, before the final save: what is left is the run record and checkpoints.
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(root / "uninterrupted" / name, root / "last" / name)
    shutil.copy(root / "uninterrupted" / "run.json", root / "last" / "run.json")
    runs.update(launcher.run_many({
        "last": job("last"),
        "explicit incomplete": job("killed", "--resume_from_checkpoint", root / "killed" / "checkpoint-4"),
    }))
    runs["killed, resumed"] = launcher.run(*job("killed"))
    return {"strategy": strategy, "root": root, **runs}


def test_resumed_from_the_last_checkpoint_it_trains_nothing_more_and_finishes(killed):
    root, result = killed["root"], killed["last"]
    result.check()
    assert_clean(result)
    assert f"resuming from {root / 'last' / 'checkpoint-4'}" in result.stdout
    assert not (root / "last" / "checkpoint-5").exists()
    assert_same_weights(root / "uninterrupted", root / "last", killed["strategy"])
    assert (root / "last" / "eval_after.json").is_file() and (root / "last" / "training_curves.png").is_file()


def test_killed_while_saving_it_resumes_from_the_newest_complete_checkpoint(killed):
    root, strategy = killed["root"], killed["strategy"]
    assert killed["killed"].returncode == -signal.SIGKILL
    result = killed["killed, resumed"]
    result.check()
    assert_clean(result)
    assert (f"skipping {root / 'killed' / 'checkpoint-4'}: incomplete checkpoint (no {COMPLETE_FILE}: it was not "
            "finished being written)") in result.stdout
    assert f"resuming from {root / 'killed' / 'checkpoint-2'}" in result.stdout
    assert why_incomplete(root / "killed" / "checkpoint-4") is None  # written again, whole
    assert_same_weights(root / "uninterrupted", root / "killed", strategy)
    reference = logged_losses(root / "uninterrupted" / "checkpoint-4")
    assert logged_losses(root / "killed" / "checkpoint-4") == pytest.approx(reference, abs=1e-6)


def test_an_explicit_incomplete_checkpoint_is_one_clear_error(killed):
    root, result = killed["root"], killed["explicit incomplete"]
    assert result.returncode == 1
    assert_clean(result)
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --resume_from_checkpoint {root / 'killed' / 'checkpoint-4'} is not a complete checkpoint (no "
        f"{COMPLETE_FILE}: it was not finished being written); the newest complete checkpoint beside it is "
        f"{root / 'killed' / 'checkpoint-2'}"
    )


@pytest.fixture(scope="module")
def lora_runs(launcher, tiny_model_dir, data, tmp_path_factory):
    """LoRA: the uninterrupted run, a run stopped with Ctrl-C and resumed with the command it printed, a fresh
    --output_dir resumed from a checkpoint path, full finetuning pointed at the LoRA run's folder, and the
    same run again from scratch."""
    root = tmp_path_factory.mktemp("lora")

    def job(name: str, *extra, strategy="lora", evaluate_before=False):
        # 8 steps: room for Ctrl-C to land in training on a fast machine
        return SCRIPT, args_for(tiny_model_dir, root / name, data, strategy, "--max_steps", "8", *extra,
                                evaluate_before=evaluate_before)

    runs = launcher.run_many({"uninterrupted": job("uninterrupted", "--save_steps", "2")})
    runs["uninterrupted"].check()
    shutil.copytree(root / "uninterrupted" / "checkpoint-2", root / "other" / "checkpoint-2")
    shutil.copy(root / "uninterrupted" / "run.json", root / "other" / "run.json")
    with ThreadPoolExecutor(1) as pool:
        others = pool.submit(launcher.run_many, {
            "explicit": job("explicit", "--resume_from_checkpoint", root / "uninterrupted" / "checkpoint-2"),
            "other run": job("other", strategy="full"),
            "from scratch": job("from scratch"),  # as after a kill before the first checkpoint
        }, parallel=1)
        # no --save_steps; evaluated before training, which the resumed run does not repeat
        stopped = launcher.start(*job("interrupted", "--dataloader_num_workers", "1", evaluate_before=True))
        wait_for_steps(stopped.stdout, 1)
        os.killpg(stopped.pid, signal.SIGINT)  # Ctrl-C: the script and its DataLoader worker
        runs["interrupted"] = launcher.wait(stopped)
        runs["resumed"] = launcher.run(*command_of(printed_resume_command(runs["interrupted"].stderr)))
        runs.update(others.result())
    return root, runs


def wait_for_text(log_path, text: str, count: int = 1, timeout: float = 120) -> None:
    """Until the run's log holds `text` `count` times."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log_path.exists() and log_path.read_text().count(text) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"no {text!r} ({count} times) in {log_path}")


def wait_for_steps(log_path, steps: int) -> None:
    """Until the run's log shows `steps` optimizer steps (the Trainer logs every step: --logging_steps 1)."""
    wait_for_text(log_path, "{'loss'", steps)


def printed_resume_command(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("stopped by ")]
    assert len(lines) == 1, stderr
    return lines[0].split("; resume with: ")[1]


def command_of(command: str) -> tuple:
    words = shlex.split(command)
    assert words[0] == "python"
    return words[1], words[2:]


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(lora_runs):
    root, runs = lora_runs
    interrupted = runs["interrupted"]
    assert interrupted.returncode == 128 + signal.SIGINT
    assert_clean(interrupted)
    line = next(line for line in interrupted.stderr.splitlines() if line.startswith("stopped by "))
    step = int(line.split(" at step ")[1].split()[0])
    checkpoint = root / "interrupted" / f"checkpoint-{step}"
    assert line.startswith(f"stopped by SIGINT at step {step} of 8: {checkpoint} is complete; resume with: python ")
    assert line.endswith(f"--resume_from_checkpoint {checkpoint}")
    assert 1 <= step <= 8 and why_incomplete(checkpoint) is None
    assert "after finetuning" not in interrupted.stdout  # neither the final save nor the final evaluation
    resumed = runs["resumed"].check()
    assert_clean(resumed)
    assert f"resuming from {checkpoint}" in resumed.stdout
    assert_same_weights(root / "uninterrupted", root / "interrupted", "lora")
    before = [line for line in interrupted.stdout.splitlines() if line.startswith("ACCURACY before finetuning: ")]
    assert len(before) == 1 and before[0] in resumed.stdout.splitlines()
    assert "(already evaluated by this run)" in resumed.stdout


def test_a_signal_during_the_evaluation_stops_the_run_cleanly(launcher, tiny_model_dir, data, tmp_path):
    output_dir = tmp_path / "out"
    # long generations, so that the signal finds the evaluation running
    args = args_for(tiny_model_dir, output_dir, data, "lora", "--eval_size", "3", "--eval_batch_size", "1",
                    "--max_new_tokens", "300", evaluate_before=True)
    running = launcher.start(SCRIPT, args)
    wait_for_text(running.stdout, "parameters trainable")  # the model is built: the evaluation comes next
    time.sleep(0.2)
    os.kill(running.pid, signal.SIGTERM)
    result = launcher.wait(running)
    assert result.returncode == 128 + signal.SIGTERM
    assert_clean(result)
    assert result.stderr.strip().splitlines()[-1] == (
        "interrupted by SIGTERM during the evaluation before training; no checkpoint to resume from; to "
        f"continue: python {shlex.join([str(SCRIPT), *map(str, args)])}"
    )
    assert not (output_dir / "eval_before.json").exists()


def test_resumed_into_a_fresh_output_dir_from_a_checkpoint_path(lora_runs):
    root, runs = lora_runs
    runs["explicit"].check()
    assert f"resuming from {root / 'uninterrupted' / 'checkpoint-2'}" in runs["explicit"].stdout
    assert_same_weights(root / "uninterrupted", root / "explicit", "lora")


def test_a_run_started_again_from_scratch_is_the_same_run(lora_runs):
    root, runs = lora_runs
    runs["from scratch"].check()
    assert_same_weights(root / "uninterrupted", root / "from scratch", "lora")  # --seed fixes the LoRA init too


def test_a_checkpoint_of_another_run_is_not_resumed(lora_runs):
    root, runs = lora_runs
    result = runs["other run"]  # full finetuning pointed at the LoRA run's folder
    assert result.returncode != 0
    assert f"{root / 'other'} holds checkpoint-2 of another run" in result.stderr
    assert "--resume_from_checkpoint" in result.stderr
    assert_clean(result)


# ---- torchrun: SIGTERM reaches one of two workers (as on a multi-node run where one node is preempted) ----


def test_sigterm_to_one_torchrun_worker_stops_both_at_the_same_step(tiny_model_dir, data, tmp_path):
    def args(output_dir):  # global batch 4 = 2 processes x 1 per device x 2 accumulation steps
        return args_for(tiny_model_dir, output_dir, data, "full", "--batch_size", "4", "--batch_size_per_gpu", "1",
                        "--max_steps", "6")

    reference = torchrun(SCRIPT, args(tmp_path / "uninterrupted"), "--nproc_per_node=2",
                         f"--master_port={free_port()}", cwd=tmp_path)
    logs = tmp_path / "logs"
    launch = ["--nproc_per_node=2", f"--master_port={free_port()}", f"--log-dir={logs}", "--redirects=3"]
    with open(tmp_path / "torchrun.out", "w") as out, open(tmp_path / "torchrun.err", "w") as err:
        stopped = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *launch, str(SCRIPT), *args(tmp_path / "stopped")],
            cwd=tmp_path, env=script_env(), stdout=out, stderr=err, text=True, start_new_session=True,
        )
        try:
            rank_logs = {rank: wait_for_file(logs, f"attempt_0/{rank}/stdout.log") for rank in (0, 1)}
            wait_for_steps(rank_logs[0], 2)  # rank 0 logs the loss
            workers = {int(child.environ()["RANK"]): child for child in psutil.Process(stopped.pid).children()}
            workers[1].send_signal(signal.SIGTERM)  # rank 0 learns of it only from rank 1
            stopped.wait(timeout=300)
        finally:
            if stopped.poll() is None:
                stopped.kill()
    finish(reference).check()

    rank_errors = {rank: (path.parent / "stderr.log").read_text() for rank, path in rank_logs.items()}
    for rank, stderr in rank_errors.items():
        assert "Traceback" not in stderr + rank_logs[rank].read_text(), stderr
    assert "exitcode  : 143" in (tmp_path / "torchrun.err").read_text()  # both workers, as the launcher reports
    line = next(line for line in rank_errors[0].splitlines() if line.startswith("stopped by "))
    step = int(line.split(" at step ")[1].split()[0])
    checkpoint = tmp_path / "stopped" / f"checkpoint-{step}"
    assert line.startswith(f"stopped by SIGTERM at step {step} of 6: {checkpoint} is complete; resume with: "
                           "torchrun --nproc_per_node=2 ")
    assert 2 <= step < 6 and "stopped by" not in rank_errors[1]  # one line, from rank 0
    manifest = json.loads((checkpoint / COMPLETE_FILE).read_text())["files"]
    for rank in (0, 1):  # each rank's part, written at the same step
        assert f"rng_state_{rank}.pth" in manifest
        assert f"global_step{step}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in manifest

    resumed = finish(torchrun(SCRIPT, args(tmp_path / "stopped"), "--nproc_per_node=2",
                              f"--master_port={free_port()}", cwd=tmp_path))
    resumed.check()
    assert f"resuming from {checkpoint}" in resumed.stdout
    assert_same_weights(tmp_path / "uninterrupted", tmp_path / "stopped", "full")


def wait_for_file(root, pattern: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(root.glob(f"*/{pattern}"))
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no {pattern} under {root}")


# ---- torchrun --max_restarts: a worker killed (a lost node or GPU, the OOM killer) restarts and resumes by itself ----


def restart_args(model_dir, output_dir, data, strategy: str):
    # global batch 4 = 2 processes x 1 per device x 2 accumulation steps; checkpoints at steps 2, 4 and 6
    return args_for(model_dir, output_dir, data, strategy, "--batch_size", "4", "--batch_size_per_gpu", "1",
                    "--max_steps", "6", "--save_steps", "2")


@pytest.fixture(scope="module")
def uninterrupted_torchrun(tiny_model_dir, data, tmp_path_factory):
    """strategy -> the output folder of the two-process run without a kill."""
    root, runs = tmp_path_factory.mktemp("uninterrupted_torchrun"), {}

    def run(strategy):
        if strategy not in runs:
            output_dir = root / strategy
            finish(torchrun(SCRIPT, restart_args(tiny_model_dir, output_dir, data, strategy), "--nproc_per_node=2",
                            f"--master_port={free_port()}", cwd=root)).check()
            runs[strategy] = output_dir
        return runs[strategy]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["lora", "full"])  # DDP, DeepSpeed ZeRO-2
@pytest.mark.parametrize("moment, resumed_from", [("after-saving", 4), ("while-saving", 2)])
def test_a_killed_torchrun_worker_restarts_and_the_run_finishes_by_itself(
    uninterrupted_torchrun, tiny_model_dir, data, tmp_path, strategy, moment, resumed_from
):
    """Rank 1 is SIGKILLed at checkpoint-4 (once it is complete, or while it is written); torchrun stops rank 0
    and, with --max_restarts=1, starts both again: they form their process group anew, resume from the newest
    complete checkpoint, and the job ends with the uninterrupted run's weights, with no command typed again."""
    output_dir = tmp_path / "killed"
    launch = ["--nproc_per_node=2", "--max_restarts=1", f"--master_port={free_port()}"]
    started = time.monotonic()
    result = finish(torchrun(KILLED_AT_CHECKPOINT, [moment, "4", SCRIPT, *restart_args(tiny_model_dir, output_dir,
                                                                                        data, strategy)],
                             *launch, cwd=tmp_path))
    print(f"{strategy}, killed {moment}: {time.monotonic() - started:.0f} s")
    result.check()
    assert "torchrun restart 1: the process group of 2 processes is formed" in result.stdout, result.tail()
    assert f"resuming from {output_dir / f'checkpoint-{resumed_from}'}" in result.stdout, result.tail()
    for step in (4, 6):
        assert why_incomplete(output_dir / f"checkpoint-{step}") is None
    assert_same_weights(uninterrupted_torchrun(strategy), output_dir, strategy)
