"""SIGTERM/SIGINT: recorded while training and acted on at the step end (a checkpoint, then the stop), raised
at once outside training, a second signal ends the process, a duplicate delivery is one request, forked
DataLoader workers leave the decision to the main process; and the command line that resumes."""

import os
import signal

import pytest
from transformers import TrainerCallback

from common import preemption
from common.checkpoints import why_incomplete
from common.distributed import ONE_PROCESS, Distributed
from common.preemption import Interrupted, PreemptionCallback, StopSignals, exit_status, resume_command
from tests.common.regression_trainer import regression_trainer


def test_while_training_the_first_signal_is_a_request(capfd):
    with StopSignals() as signals:
        signals.deferred = True
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # the launcher forwarding the same signal: one request
    assert signals.signum == signal.SIGTERM and signals.name == "SIGTERM"
    assert capfd.readouterr().err.count("SIGTERM received: stopping after the current optimizer step") == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored on the way out


def test_outside_training_a_signal_interrupts_at_once():
    with StopSignals() as signals, pytest.raises(Interrupted) as interruption:
        signal.raise_signal(signal.SIGINT)
    assert interruption.value.signum == signals.signum == signal.SIGINT
    assert exit_status(signal.SIGINT) == 130 and exit_status(signal.SIGTERM) == 143


def test_a_forked_worker_leaves_the_signal_to_the_main_process():
    with StopSignals() as signals:
        signals._owner = os.getpid() + 1  # as seen from a DataLoader worker forked from the main process
        signal.raise_signal(signal.SIGTERM)
    assert signals.signum is None


def test_a_second_signal_ends_the_process_at_once(monkeypatch):
    monkeypatch.setattr(preemption, "REPEAT_WINDOW_S", 0.0)
    child = os.fork()
    if child == 0:
        status = 0
        try:
            with StopSignals() as signals:
                signals.deferred = True
                signal.raise_signal(signal.SIGTERM)
                signal.raise_signal(signal.SIGTERM)
        finally:
            os._exit(status)  # only reached if the second signal did not end the process
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


class SignalAt(TrainerCallback):
    """Sends a signal to this process during optimizer step `step` (or while its checkpoint is written)."""

    def __init__(self, step: int, during_save: bool = False):
        self.step, self.during_save = step, during_save

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step and not self.during_save:
            signal.raise_signal(signal.SIGTERM)

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step and self.during_save:
            signal.raise_signal(signal.SIGTERM)


def stopped_run(tmp_path, sender: SignalAt, save_steps: int = 0):
    with StopSignals() as signals:
        callback = PreemptionCallback(signals)
        # the sender first: its signal arrives while the checkpoint is written, before the Trainer says "saved"
        trainer = regression_trainer(tmp_path, max_steps=8, save_steps=save_steps, callbacks=[sender, callback])
        trainer.train()
    return trainer, callback


def test_a_signal_during_a_step_stops_after_it_with_a_checkpoint(tmp_path):
    trainer, callback = stopped_run(tmp_path, SignalAt(3))  # no --save_steps
    assert callback.stopped_at == trainer.state.global_step == 3
    assert [path.name for path in tmp_path.glob("checkpoint-*")] == ["checkpoint-3"]
    assert why_incomplete(tmp_path / "checkpoint-3") is None


def test_a_signal_while_a_checkpoint_is_written_stops_right_after_it(tmp_path):
    trainer, callback = stopped_run(tmp_path, SignalAt(4, during_save=True), save_steps=2)
    assert callback.stopped_at == trainer.state.global_step == 4
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_a_signal_after_the_last_step_interrupts_what_follows(tmp_path):
    with StopSignals() as signals:
        callback = PreemptionCallback(signals)
        trainer = regression_trainer(tmp_path, max_steps=2, callbacks=[callback])
        signals.deferred = True
        signal.raise_signal(signal.SIGTERM)  # as if it came after the agreement at the end of step 2
        with pytest.raises(Interrupted):
            callback.on_train_end(trainer.args, trainer.state, trainer.control)


SCRIPT_ARGS = ["train.py", "--output_dir", "out dir", "--max_steps", "9"]


@pytest.mark.parametrize("previous", [[], ["--resume_from_checkpoint"], ["--resume_from_checkpoint", "out/checkpoint-2"],
                                      ["--resume_from_checkpoint=out/checkpoint-2"]], ids=["none", "latest", "path", "path="])
def test_the_resume_command_names_the_checkpoint_once(previous):
    command = resume_command([*SCRIPT_ARGS, *previous], "out dir/checkpoint-5", ONE_PROCESS, environ={})
    assert command == "python train.py --output_dir 'out dir' --max_steps 9 --resume_from_checkpoint 'out dir/checkpoint-5'"


def test_the_resume_command_recreates_the_torchrun_launch():
    def processes(world_size: int) -> Distributed:
        return Distributed(rank=0, local_rank=0, world_size=world_size, local_world_size=4, device=ONE_PROCESS.device)

    torchrun = {"TORCHELASTIC_RUN_ID": "none", "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
    assert resume_command(SCRIPT_ARGS, None, processes(4), torchrun) == (
        "torchrun --nproc_per_node=4 train.py --output_dir 'out dir' --max_steps 9"
    )
    assert resume_command(SCRIPT_ARGS, None, processes(8), torchrun).startswith(
        "torchrun --nnodes=2 '--node_rank=<this node'\"'\"'s rank>' --nproc_per_node=4 --master_addr=node1 "
        "--master_port=29500 train.py"
    )
