"""Run a finetuning script as `python SCRIPT ARGS` (or as a torchrun worker) would, and SIGKILL it at checkpoint-STEP:
what a lost node, a lost GPU or an out-of-memory kill does.

    python _killed_at_checkpoint.py MOMENT STEP SCRIPT ARGS...

MOMENT `while-saving`: after the weights and the optimizer state (DeepSpeed's shards under ZeRO-2) are on disk,
before the RNG and Trainer states. MOMENT `after-saving`: once the checkpoint is complete, before training goes on.
Under torchrun only rank 1 of the first attempt is killed: the attempts torchrun restarts run normally.
"""

import os
import runpy
import signal
import sys
import time
from pathlib import Path

from transformers import Trainer

from common.checkpoints import ResumableTrainer, why_incomplete

moment, step, script, *arguments = sys.argv[1:]
checkpoint = f"checkpoint-{step}"
targeted = os.environ.get("RANK", "1") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if moment == "while-saving":
    save_rng_state = Trainer._save_rng_state

    def killed_while_saving(trainer, output_dir):
        if targeted and os.path.basename(output_dir) == checkpoint:
            kill()
        save_rng_state(trainer, output_dir)

    Trainer._save_rng_state = killed_while_saving
elif moment == "after-saving":
    save_checkpoint = ResumableTrainer._save_checkpoint

    def killed_after_saving(trainer, *args, **kwargs):
        save_checkpoint(trainer, *args, **kwargs)
        folder = Path(trainer.args.output_dir) / checkpoint
        if targeted and trainer.state.global_step == int(step):
            deadline = time.monotonic() + 120
            while why_incomplete(folder) is not None and time.monotonic() < deadline:  # rank 0 writes the manifest
                time.sleep(0.05)
            kill()

    ResumableTrainer._save_checkpoint = killed_after_saving
else:
    raise SystemExit(f"unknown moment {moment!r}: while-saving or after-saving")
sys.argv = [script, *arguments]
sys.path[0] = os.path.dirname(os.path.abspath(script))
runpy.run_path(script, run_name="__main__")
