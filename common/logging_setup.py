"""Logging set-up of every command that trains (the scripts, the benchmark's workers), in one place.

Rank 0 logs our INFO lines; other ranks only warnings, so a multi-GPU run prints each line once.
Libraries (transformers) log warnings and errors only.
"""

from __future__ import annotations

import logging
import sys

import transformers

from .distributed import Distributed

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(distributed: Distributed) -> None:
    level = logging.INFO if distributed.is_main else logging.WARNING
    logging.basicConfig(format=LOG_FORMAT, level=level, stream=sys.stdout)
    transformers.utils.logging.set_verbosity(logging.WARNING if level == logging.INFO else level)
