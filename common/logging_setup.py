"""Logging set-up of every command that trains (the scripts, the benchmark's workers), in one place.

By default a run prints our own lines only — strategy, precision, trainable parameters, data sizes,
progress, metrics, where outputs went — once, from rank 0 (other ranks: warnings and errors). Library
chatter (deprecation notices, accelerator probing, weight-loading bars, info-level notes) is hidden:
libraries log errors only and their Python warnings are ignored. `--verbose` shows everything.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import torch

from .distributed import Distributed

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LIBRARY_LOGGERS = (
    "transformers", "accelerate", "DeepSpeed", "deepspeed", "peft", "bitsandbytes", "kernels", "datasets",
    "huggingface_hub", "torch.distributed", "torch._dynamo", "PIL",
)
LIBRARY_MODULES = r"(transformers|accelerate|deepspeed|peft|bitsandbytes|datasets|huggingface_hub|torch|PIL)(\.|$)"


def quiet_libraries(verbose: bool) -> None:
    """Silence the libraries before they start talking (part of `setup_logging`, the first thing a run does,
    before any of them loads a model or starts DeepSpeed); with `verbose` leave them as they are."""
    if verbose:
        return
    if not torch.cuda.is_available():
        # DeepSpeed warns that it "was unable to detect" a GPU when it probes for one; naming the CPU skips it.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # per-shard "Loading weights" bars
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=LIBRARY_MODULES)


def setup_logging(distributed: Distributed, verbose: bool = False) -> None:
    """Once per process, first thing: our lines from rank 0 (every rank with `verbose`), libraries quiet."""
    quiet_libraries(verbose)
    level = logging.INFO if distributed.is_main or verbose else logging.WARNING
    logging.basicConfig(format=LOG_FORMAT, level=level, stream=sys.stdout, force=True)
    if verbose:
        import transformers

        transformers.utils.logging.set_verbosity_info()
        for name in ("bitsandbytes", "kernels"):  # quiet since `import common`
            logging.getLogger(name).setLevel(logging.NOTSET)
