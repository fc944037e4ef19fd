"""Run a finetuning script as `python SCRIPT ARGS` would, and SIGKILL it in the middle of writing checkpoint-STEP:
after the weights and the optimizer state (DeepSpeed's shards under ZeRO-2) are on disk, before the RNG and
Trainer states. What a node lost, or an out-of-memory kill, during a save leaves behind.

    python _killed_while_saving.py STEP SCRIPT ARGS...
"""

import os
import runpy
import signal
import sys

from transformers import Trainer

step, script, *arguments = sys.argv[1:]
save_rng_state = Trainer._save_rng_state


def killed_while_saving(trainer, output_dir):
    if os.path.basename(output_dir) == f"checkpoint-{step}":
        os.kill(os.getpid(), signal.SIGKILL)
    save_rng_state(trainer, output_dir)


Trainer._save_rng_state = killed_while_saving
sys.argv = [script, *arguments]
sys.path[0] = os.path.dirname(os.path.abspath(script))
runpy.run_path(script, run_name="__main__")
