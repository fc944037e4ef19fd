"""Shared code of the Phi-3.5-vision finetuning scripts.

Importing this package registers the native Phi-3-V model family (`model_type` `phi3_v`) with
transformers' Auto classes, so official checkpoints load without `trust_remote_code`.
"""

from . import phi3v  # noqa: F401  (registration side effect)
