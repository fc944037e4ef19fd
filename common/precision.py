"""Numeric precision and attention kernel for a run, from the flags and the hardware at hand.

The recipe's rules: `--bf16` trains in bf16; otherwise fp16 mixed precision with fp32 master weights.
Without a GPU both fall back to fp32 (with one warning) so tests and the demo run anywhere. Attention
is SDPA unless `--use_flash_attention` asks for flash_attention_2.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers.utils import is_flash_attn_2_available

from .errors import UsageError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Precision:
    load_dtype: torch.dtype  # dtype the weights are loaded in
    bf16: bool  # Trainer mixed-precision flags
    fp16: bool
    attn_implementation: str
    compute_dtype: torch.dtype  # dtype of 4-bit (QLoRA) matmuls


def resolve_precision(bf16: bool, use_flash_attention: bool, cuda_available: bool | None = None) -> Precision:
    """Raises UsageError with the reason when the combination cannot run here."""
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if use_flash_attention:
        if not cuda_available:
            raise UsageError("--use_flash_attention needs a CUDA GPU (Ampere or newer)")
        if not is_flash_attn_2_available():
            raise UsageError(
                "--use_flash_attention needs the flash-attn package: "
                "pip install ninja && MAX_JOBS=32 pip install flash-attn --no-build-isolation"
            )
        if not bf16:
            # fp16 mixed precision keeps fp32 weights and activations outside autocast regions, which the
            # flash kernels reject; every GPU that runs flash attention also supports bf16.
            raise UsageError(
                "--use_flash_attention requires --bf16 (flash attention needs half-precision "
                "activations, fp16 mixed precision keeps them in fp32; every flash-capable GPU supports bf16)"
            )
    attn = "flash_attention_2" if use_flash_attention else "sdpa"
    if not cuda_available:
        logger.warning("No CUDA GPU found: training in fp32 on CPU (--bf16 / fp16 mixed precision need a GPU).")
        return Precision(torch.float32, bf16=False, fp16=False, attn_implementation=attn, compute_dtype=torch.float32)
    if bf16:
        return Precision(torch.bfloat16, bf16=True, fp16=False, attn_implementation=attn, compute_dtype=torch.bfloat16)
    return Precision(torch.float32, bf16=False, fp16=True, attn_implementation=attn, compute_dtype=torch.float16)
