"""Numeric precision and attention kernel of a run, from the flags and the GPU it runs on.

The recipe's rules: weights load in bf16 with `--use_flash_attention`, in fp32 otherwise; the Trainer runs
bf16 autocast with `--bf16` and fp16 mixed precision (loss scaling) without it; QLoRA's 4-bit matmuls compute
in bf16 with flash attention, in fp16 otherwise. The NLVR2 and UCF-101 tasks turn `--bf16` on with
`--use_flash_attention`, as the recipe's scripts do (`Task.flash_attention_implies_bf16`, applied while the
flags are resolved); DocVQA and hateful memes do not, and flash attention with fp16 mixed precision is refused (the recipe's known issue: flash kernels and fp16 AMP do not go together).

Both flags are checked against the GPU's compute capability before anything loads: bf16 and flash-attn
need Ampere (8.0) or newer (`torch.cuda.is_bf16_supported()` says yes on V100/T4, which only emulate bf16).
Without a GPU everything falls back to fp32 (one warning) so tests and the demo run anywhere.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from transformers.utils import is_flash_attn_2_available

from .errors import UsageError

logger = logging.getLogger(__name__)

AMPERE = (8, 0)


@dataclass(frozen=True)
class Device:
    """The GPU a process trains on, as far as precision is concerned; `capability` None: no CUDA GPU."""

    name: str
    capability: tuple[int, int] | None

    @property
    def has_cuda(self) -> bool:
        return self.capability is not None

    @property
    def is_ampere_or_newer(self) -> bool:
        return self.capability is not None and self.capability >= AMPERE

    def describe(self) -> str:
        if self.capability is None:
            return self.name
        return f"{self.name} (compute capability {self.capability[0]}.{self.capability[1]})"


NO_GPU = Device("CPU", None)


def local_device(local_rank: int) -> Device:
    """The GPU of the process with this local rank (`Distributed.local_rank`), or the CPU."""
    if not torch.cuda.is_available():
        return NO_GPU
    return Device(torch.cuda.get_device_name(local_rank), tuple(torch.cuda.get_device_capability(local_rank)))


@dataclass(frozen=True)
class Precision:
    load_dtype: torch.dtype  # dtype the weights are loaded in (also the LoRA reload for the final evaluation)
    bf16: bool  # Trainer mixed-precision flags
    fp16: bool
    attn_implementation: str
    compute_dtype: torch.dtype  # dtype of 4-bit (QLoRA) matmuls

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype training computes in under autocast (None: plain fp32)."""
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else None

    def autocast(self, device: torch.device | str) -> AbstractContextManager:
        """Autocast as in training, for evaluation outside the Trainer (fp16 mode would otherwise generate
        in fp32 on fp32 weights, several times slower)."""
        device_type = torch.device(device).type
        if self.autocast_dtype is None or device_type != "cuda":
            return nullcontext()
        return torch.autocast(device_type, dtype=self.autocast_dtype)

    def describe(self) -> str:
        mode = "bf16 autocast" if self.bf16 else "fp16 mixed precision (loss scaling)" if self.fp16 else "fp32"
        dtype = str(self.load_dtype).removeprefix("torch.")
        return f"{mode}, weights loaded in {dtype}, attention {self.attn_implementation}"


def _check_flash_attention(device: Device, bf16: bool, flash_attn_installed: bool) -> None:
    if not device.has_cuda:
        raise UsageError("--use_flash_attention needs a CUDA GPU (Ampere or newer); this machine has none")
    if not device.is_ampere_or_newer:
        raise UsageError(
            f"--use_flash_attention needs an Ampere or newer GPU (compute capability 8.0+); {device.describe()} "
            "is older: drop the flag (attention then runs on PyTorch's SDPA kernels)"
        )
    if not flash_attn_installed:
        raise UsageError(
            "--use_flash_attention needs the flash-attn package: "
            "pip install ninja && MAX_JOBS=32 pip install flash-attn --no-build-isolation"
        )
    if not bf16:
        raise UsageError(
            "--use_flash_attention requires --bf16 for this task (flash attention with fp16 mixed precision "
            "keeps fp32 weights and activations outside autocast regions, which the flash kernels reject; "
            "every flash-capable GPU supports bf16)"
        )


def resolve_precision(
    bf16: bool,
    use_flash_attention: bool,
    device: Device | None = None,
    flash_attn_installed: bool | None = None,
    local_rank: int = 0,
) -> Precision:
    """Raises UsageError with the reason when the combination cannot run on `device` (default: the GPU of
    the process with `local_rank`). Called while the flags are resolved, before anything loads."""
    device = local_device(local_rank) if device is None else device
    flash_attn_installed = is_flash_attn_2_available() if flash_attn_installed is None else flash_attn_installed
    if use_flash_attention:
        _check_flash_attention(device, bf16, flash_attn_installed)
    attn = "flash_attention_2" if use_flash_attention else "sdpa"
    if not device.has_cuda:
        logger.warning("No CUDA GPU found: running in fp32 on CPU (--bf16 / fp16 mixed precision need a GPU).")
        return Precision(torch.float32, bf16=False, fp16=False, attn_implementation=attn, compute_dtype=torch.float32)
    if bf16 and not device.is_ampere_or_newer:
        raise UsageError(
            f"--bf16 needs an Ampere or newer GPU (compute capability 8.0+); {device.describe()} only emulates "
            "bf16, slowly: drop --bf16 to train with fp16 mixed precision"
        )
    load_dtype = torch.bfloat16 if use_flash_attention else torch.float32
    compute_dtype = torch.bfloat16 if use_flash_attention else torch.float16
    return Precision(load_dtype, bf16=bf16, fp16=not bf16, attn_implementation=attn, compute_dtype=compute_dtype)
