"""A clean stop on SIGTERM or SIGINT: finish the optimizer step, write a checkpoint, say how to resume, exit.

SLURM, Kubernetes and spot instances send SIGTERM some time before they take the machine; Ctrl-C sends
SIGINT. While training, the first signal only asks to stop: at the end of the optimizer step in progress the
ranks agree (a MAX all-reduce of the request: on a multi-node run only some ranks may get the signal), every
rank stops at that same step, the Trainer writes a checkpoint, and the run prints one line (the step, the
checkpoint, the command that resumes) and exits with 128 + the signal number. Outside training (loading, the
evaluations, the final save) a signal interrupts at once, with one line and the same exit status; nothing
it leaves half-done counts (checkpoints are complete or skipped, reports are written whole).

A second signal stops at once, without a checkpoint. A repeat within `REPEAT_WINDOW_S` is the same request
delivered twice and is ignored: Ctrl-C under torchrun reaches each worker from the terminal and again from
the launcher, which forwards the signals it receives.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from .distributed import ONE_PROCESS, Distributed

SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_WINDOW_S = 2.0


class Interrupted(BaseException):
    """A signal outside training. A BaseException, like KeyboardInterrupt: library code that catches Exception
    must not swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGTERM/SIGINT handlers for the duration of a run (a context manager; enter in the main thread).

    `deferred` is True while training: then the first signal only records the request (`signum`), which the
    `PreemptionCallback` acts on at the end of the step; otherwise it raises `Interrupted` at once.
    `activity` names what the run is doing, for the messages; only the main process of `distributed` prints
    them.
    """

    def __init__(self, distributed: Distributed = ONE_PROCESS):
        self.signum: int | None = None
        self.deferred = False
        self.activity = "start-up"
        self.distributed = distributed
        self._received_at = 0.0
        self._owner = os.getpid()
        self._previous = {}

    def __enter__(self) -> StopSignals:
        self._owner = os.getpid()
        self._previous = {signum: signal.signal(signum, self._handle) for signum in SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal"

    def _say(self, line: str) -> None:
        # os.write: the handler may run while the main thread is inside a print
        if self.distributed.is_main:
            os.write(2, (line + "\n").encode())

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._owner:  # a forked DataLoader worker: the main process decides, and ends it
            return
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._received_at = signum, now
            if not self.deferred:
                raise Interrupted(signum)
            self._say(f"{self.name} received: stopping after the current optimizer step to write a checkpoint "
                      "(send it again to stop at once, without one)")
            return
        if now - self._received_at < REPEAT_WINDOW_S:
            return
        self._say(f"{signal.Signals(signum).name} received again: stopping now, without a checkpoint")
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


class PreemptionCallback(TrainerCallback):
    """Acts on a stop request at the end of each optimizer step: all ranks stop at the same step and the
    Trainer writes a checkpoint, with or without --save_steps. A request that arrives while a checkpoint is
    being written ends training right after it. `stopped_at` is the step of that checkpoint, else None."""

    def __init__(self, signals: StopSignals):
        self.signals = signals
        self.stopped_at: int | None = None

    def _agree(self, args) -> bool:
        # the highest signal number any rank received: every rank stops at the same step
        agreed = self.signals.distributed.agree_max(self.signals.signum or 0) or None
        if agreed and self.signals.signum is None:
            self.signals.signum = agreed  # the signal another rank received
        return agreed is not None

    def on_train_begin(self, args, state, control, **kwargs):
        self.signals.deferred = True
        self.signals.activity = "training"

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped_at is None and self._agree(args):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step

    def on_save(self, args, state, control, **kwargs):
        if self.stopped_at is None and self._agree(args):
            control.should_training_stop = True
            self.stopped_at = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        self.signals.deferred = False
        # a request after the last step's agreement: training is over but the run is not
        if self.stopped_at is None and self._agree(args):
            raise Interrupted(self.signals.signum)


def resume_command(
    argv: list[str], checkpoint: Path | None, distributed: Distributed, environ=os.environ
) -> str:
    """The command line that continues this run from `checkpoint` (or starts it again when None): the same
    launcher and script arguments, with --resume_from_checkpoint set accordingly. `distributed`: the run's
    processes."""
    arguments = _without_resume_flag(argv[1:])
    if checkpoint is not None:
        arguments += ["--resume_from_checkpoint", str(checkpoint)]
    return shlex.join([*_launcher(distributed, environ), argv[0], *arguments])


def _without_resume_flag(arguments: list[str]) -> list[str]:
    kept, skip_value = [], False
    for argument in arguments:
        if skip_value and not argument.startswith("-"):
            skip_value = False
            continue
        skip_value = argument == "--resume_from_checkpoint"
        if not skip_value and not argument.startswith("--resume_from_checkpoint="):
            kept.append(argument)
    return kept


def _launcher(distributed: Distributed, environ) -> list[str]:
    """`python`, or the torchrun flags that recreate this launch (torchrun sets TORCHELASTIC_RUN_ID)."""
    if "TORCHELASTIC_RUN_ID" not in environ:
        return ["python"]
    per_node = distributed.local_world_size
    nodes = distributed.world_size // per_node
    if nodes == 1:
        return ["torchrun", f"--nproc_per_node={per_node}"]
    return [
        "torchrun", f"--nnodes={nodes}", "--node_rank=<this node's rank>", f"--nproc_per_node={per_node}",
        f"--master_addr={environ.get('MASTER_ADDR', '<master address>')}",
        f"--master_port={environ.get('MASTER_PORT', '<master port>')}",
    ]


def exit_status(signum: int) -> int:
    """What a shell reports for a process ended by the signal: 128 + its number (143 for SIGTERM)."""
    return 128 + signum


def report_and_exit(line: str, signum: int, distributed: Distributed, synchronize: bool) -> None:
    """Print `line` (the main process) and exit with the signal's status. `synchronize`: all ranks are alive
    and leave together, so that the launcher, seeing one rank end, stops none of the others before the main
    process is done."""
    if distributed.is_main:
        print(line, file=sys.stderr, flush=True)
    if synchronize:
        with contextlib.suppress(Exception):  # a peer already gone: it stopped too, and this rank is done
            distributed.finished()
    raise SystemExit(exit_status(signum))
