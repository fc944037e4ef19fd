"""Shared code of the Phi-3.5-vision finetuning scripts.

Importing this package loads no library: a command parses and checks its flags before torch, transformers,
peft or DeepSpeed load (CONTRIBUTING.md, Commands). `common.phi3v` registers the native Phi-3-V model family
(`model_type` `phi3_v`) with transformers' Auto classes when it is imported; `common.model_loading` and
`common.inference` import it, so official checkpoints load without `trust_remote_code`.
"""

import logging

# transformers' Trainer imports peft, which imports bitsandbytes, which logs a warning while it probes for
# CPU kernels: before any command could set up its logging. Those loggers stay quiet until
# common/logging_setup.py decides (--verbose shows the libraries' lines).
for _library in ("bitsandbytes", "kernels"):
    logging.getLogger(_library).setLevel(logging.ERROR)
