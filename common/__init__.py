"""Shared code of the Phi-3.5-vision finetuning scripts.

Importing this package registers the native Phi-3-V model family (`model_type` `phi3_v`) with
transformers' Auto classes, so official checkpoints load without `trust_remote_code`.
"""

import logging

# transformers' Trainer imports peft, which imports bitsandbytes, which logs a warning while it probes for
# CPU kernels: before any command could set up its logging, even for --help. Those loggers stay quiet until
# common/logging_setup.py decides (--verbose shows the libraries' lines).
for _library in ("bitsandbytes", "kernels"):
    logging.getLogger(_library).setLevel(logging.ERROR)

from . import phi3v  # noqa: E402, F401  (registration side effect)
