"""What is benchmarked: the strategies, a configuration's name, the row every configuration reports, and the
reason a failed one gives."""

from __future__ import annotations

from pathlib import Path

import torch

from common.cli import user_message

REPO = Path(__file__).resolve().parent.parent
OFFICIAL_CONFIG = REPO / "benchmarks" / "phi35v_config.json"

# name -> (label in the table, the script flags that select it)
STRATEGIES = {
    "full": ("full-finetuning", {}),
    "frozen": ("frozen image model", {"freeze_vision_model": True}),
    "lora": ("LoRA", {"use_lora": True}),
    "qlora": ("QLoRA", {"use_qlora": True}),
    "lora_frozen": ("LoRA (frozen image model)", {"use_lora": True, "freeze_vision_model": True}),
    "qlora_frozen": ("QLoRA (frozen image model)", {"use_qlora": True, "freeze_vision_model": True}),
}
DEFAULT_STRATEGIES = "full,frozen,lora,qlora"


def config_name(strategy: str, flash: bool) -> str:
    return f"{strategy}_flash-{'on' if flash else 'off'}"


def base_row(args, strategy: str, flash: bool) -> dict:
    """The row a configuration reports when it gets no measurement (status "error" until a reason is set)."""
    return {
        "config": config_name(strategy, flash),
        "strategy": strategy,
        "method": STRATEGIES[strategy][0],
        "flash_attention": flash,
        "effective_batch_size": args.batch_size,
        "batch_size_per_gpu": args.batch_size_per_gpu,
        "status": "error",
        "reason": None,
    }


def error_reason(error: BaseException) -> str:
    """One line for a row's reason: a SystemExit's message, a short CUDA out-of-memory, else the exception."""
    if isinstance(error, SystemExit):
        text = str(error.code)
    elif isinstance(error, torch.cuda.OutOfMemoryError):
        text = "CUDA out of memory: " + str(error).split(".")[0]
    else:
        text = f"{type(error).__name__}: {user_message(error)}"
    text = text.removeprefix("error: ").strip()
    return " ".join(text.split())[:500]

