"""Numeric precision and attention kernel of a run, from the flags and the device it runs on.

The recipe's rules: weights load in bf16 with `--use_flash_attention`, in fp32 otherwise; the Trainer runs
bf16 autocast with `--bf16` and fp16 mixed precision (loss scaling) without it; QLoRA's 4-bit matmuls compute
in bf16 with flash attention, in fp16 otherwise. The NLVR2 and UCF-101 tasks turn `--bf16` on with
`--use_flash_attention`, as the recipe's scripts do (`Task.flash_attention_implies_bf16`, applied while the
flags are resolved); DocVQA and hateful memes do not, and flash attention with fp16 mixed precision is refused (the recipe's known issue: flash kernels and fp16 AMP do not go together).

`--fp16` asks for fp16 mixed precision explicitly and `--dtype` sets the weights' load dtype (`auto`: the rule
above), so `--bf16 --dtype bfloat16` has the flash configuration's weights with SDPA kernels.

Both flags are checked against the GPU's compute capability before anything loads: bf16 and flash-attn
need Ampere (8.0) or newer (`torch.cuda.is_bf16_supported()` says yes on V100/T4, which only emulate bf16).
The precision flags mean the same on the CPU (bf16 or fp16 autocast, fp16 with loss scaling), so every
configuration also runs without a GPU; only the default differs: without `--bf16` or `--fp16` a GPU trains
with fp16 mixed precision, the CPU in fp32 (one warning), so tests and the demo run in fp32 anywhere.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from transformers.utils import is_flash_attn_2_available

from .config import AUTO_DTYPE, DTYPE_NAMES
from .errors import UsageError

logger = logging.getLogger(__name__)

AMPERE = (8, 0)
LOAD_DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # --dtype's names


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
        in fp32 on fp32 weights, several times slower), on the GPU and on the CPU alike."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(torch.device(device).type, dtype=self.autocast_dtype)

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
    fp16: bool = False,
    dtype: str = AUTO_DTYPE,
    uses_deepspeed: bool = False,
) -> Precision:
    """Raises UsageError with the reason when the combination cannot run on `device` (default: the GPU of
    the process with `local_rank`). Called while the flags are resolved, before anything loads.
    `fp16`: --fp16 (fp16 mixed precision, the GPU's default anyway); `dtype`: --dtype, a LOAD_DTYPES name or auto;
    `uses_deepspeed`: the strategy trains under DeepSpeed (full finetuning, frozen vision)."""
    if bf16 and fp16:
        raise UsageError("--bf16 and --fp16 exclude each other: give one (bf16 autocast or fp16 mixed precision)")
    device = local_device(local_rank) if device is None else device
    if fp16 and uses_deepspeed and not device.has_cuda:
        raise UsageError(
            "--fp16 with full finetuning (DeepSpeed ZeRO-2) needs a CUDA GPU: DeepSpeed has no fp16 on the CPU; "
            "without a GPU, train all weights with --bf16, or train LoRA/QLoRA (--use_lora, --use_qlora) with --fp16"
        )
    flash_attn_installed = is_flash_attn_2_available() if flash_attn_installed is None else flash_attn_installed
    if use_flash_attention:
        _check_flash_attention(device, bf16, flash_attn_installed)
    if bf16 and device.has_cuda and not device.is_ampere_or_newer:
        raise UsageError(
            f"--bf16 needs an Ampere or newer GPU (compute capability 8.0+); {device.describe()} only emulates "
            "bf16, slowly: drop --bf16 to train with fp16 mixed precision"
        )
    if not (bf16 or fp16 or device.has_cuda):
        logger.warning("No CUDA GPU found: running in fp32 on CPU (give --bf16 or --fp16 for mixed precision, "
                       "which a GPU run uses).")
    fp16 = fp16 or (device.has_cuda and not bf16)  # the recipe's default on a GPU
    load_dtype = LOAD_DTYPES[dtype] if dtype != AUTO_DTYPE else torch.bfloat16 if use_flash_attention else torch.float32
    _check_half_weights(load_dtype, torch.bfloat16 if bf16 else torch.float16 if fp16 else None)
    attn_implementation = "flash_attention_2" if use_flash_attention else "sdpa"
    return Precision(load_dtype, bf16=bf16, fp16=fp16, attn_implementation=attn_implementation,
                     compute_dtype=_compute_dtype(load_dtype, mixed_precision=bf16 or fp16))


def _check_half_weights(load_dtype: torch.dtype, autocast_dtype: torch.dtype | None) -> None:
    """Half-precision weights under autocast must be in its dtype: autocast refuses to mix bf16 and fp16."""
    if load_dtype == torch.float32 or autocast_dtype in (None, load_dtype):
        return
    names = {dtype: name for name, dtype in LOAD_DTYPES.items()}
    mode = "--bf16 (bf16 autocast)" if autocast_dtype == torch.bfloat16 else "fp16 mixed precision (--fp16, a GPU's default)"
    raise UsageError(
        f"--dtype {names[load_dtype]} does not go with {mode}: autocast cannot compute in "
        f"{names[autocast_dtype]} with {names[load_dtype]} weights; load them with --dtype {names[autocast_dtype]} or "
        f"float32{', or add --bf16' if load_dtype == torch.bfloat16 else ''}"
    )


def _compute_dtype(load_dtype: torch.dtype, mixed_precision: bool) -> torch.dtype:
    """QLoRA's 4-bit matmuls: in the weights' dtype when they load in half precision (bf16 with flash attention,
    the recipe's rule), else in fp16 under mixed precision (the recipe's) and in fp32 without it (a plain CPU run)."""
    if load_dtype != torch.float32:
        return load_dtype
    return torch.float16 if mixed_precision else torch.float32
