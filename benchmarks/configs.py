"""What is benchmarked: the strategies (`common.strategy.STRATEGIES`) as the table names them, a configuration's name, the row every configuration reports, and the
reason a failed one gives."""

from __future__ import annotations

from pathlib import Path

from common.cli import user_message
from common.errors import UserError

REPO = Path(__file__).resolve().parent.parent
OFFICIAL_CONFIG = REPO / "benchmarks" / "phi35v_config.json"

# strategy name -> the method column of the table, named as the recipe's tables name it
METHOD_LABELS = {
    "full": "full-finetuning",
    "frozen": "frozen image model",
    "lora": "LoRA",
    "qlora": "QLoRA",
    "lora_frozen": "LoRA (frozen image model)",
    "qlora_frozen": "QLoRA (frozen image model)",
}
DEFAULT_STRATEGIES = "full,frozen,lora,qlora"


def config_name(strategy: str, flash: bool) -> str:
    return f"{strategy}_flash-{'on' if flash else 'off'}"


def base_row(args, strategy: str, flash: bool) -> dict:
    """The row a configuration reports when it gets no measurement (status "error" until a reason is set)."""
    return {
        "config": config_name(strategy, flash),
        "strategy": strategy,
        "method": METHOD_LABELS[strategy],
        "flash_attention": flash,
        "effective_batch_size": args.batch_size,
        "batch_size_per_gpu": args.batch_size_per_gpu,
        "status": "error",
        "reason": None,
    }


def error_reason(error: BaseException) -> str:
    """One line for a row's reason: a user error's message, a short CUDA out-of-memory, else the exception."""
    import torch  # not at the top: benchmark.py's parser imports this module before any library loads

    if isinstance(error, UserError):
        text = user_message(error)
    elif isinstance(error, torch.cuda.OutOfMemoryError):
        text = "CUDA out of memory: " + str(error).split(".")[0]
    else:
        text = f"{type(error).__name__}: {user_message(error)}"
    text = text.strip()
    return " ".join(text.split())[:500]

