"""The training strategies — full, frozen vision, LoRA, QLoRA — as plain facts; `common.model_loading` applies them.

What trains (`common.model_loading.build_model` is where it happens):
- full finetuning: every weight (DeepSpeed ZeRO-2);
- frozen vision (`--freeze_vision_model`): all but the CLIP tower and the image projection (ZeRO-2);
- LoRA (`--use_lora`): adapters on the language model (LANGUAGE_LORA_TARGETS) and, unless the vision is
  frozen, on CLIP and the projection (VISION_LORA_TARGETS); the base stays frozen (DDP);
- QLoRA (`--use_qlora`): the same adapters on a 4-bit nf4 base (DDP).

`TrainingStrategy.from_flags` is the one place flags become a strategy; `STRATEGIES` names every
combination for the benchmark and the tests. Scripts never branch on the strategy.
"""

from __future__ import annotations

from dataclasses import dataclass

LANGUAGE_LORA_TARGETS = ["qkv_proj", "o_proj", "down_proj", "gate_up_proj", "lm_head"]
VISION_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "img_projection.0", "img_projection.2"]


@dataclass(frozen=True)
class TrainingStrategy:
    lora: bool  # adapters train, the base weights stay frozen
    quantize_4bit: bool  # the frozen base is loaded in 4-bit nf4 (QLoRA)
    freeze_vision: bool  # the CLIP tower and image projection do not train (no adapters there either)

    @classmethod
    def from_flags(cls, use_lora: bool, use_qlora: bool, freeze_vision_model: bool) -> TrainingStrategy:
        """The one place flags become a strategy: --use_qlora implies --use_lora."""
        return cls(lora=use_lora or use_qlora, quantize_4bit=use_qlora, freeze_vision=freeze_vision_model)

    @property
    def flags(self) -> dict[str, bool]:
        """The values of the script flags that select this strategy."""
        return {
            "use_lora": self.lora and not self.quantize_4bit,
            "use_qlora": self.quantize_4bit,
            "freeze_vision_model": self.freeze_vision,
        }

    @property
    def command_line(self) -> list[str]:
        """The flags that select this strategy on a script's command line."""
        return [f"--{flag}" for flag, on in self.flags.items() if on]

    @property
    def name(self) -> str:
        base = "QLoRA" if self.quantize_4bit else "LoRA" if self.lora else "full finetuning"
        return f"{base} (frozen vision)" if self.freeze_vision else base

    @property
    def uses_deepspeed(self) -> bool:
        """The recipe trains all weights under ZeRO-2 and adapters under plain DDP."""
        return not self.lora


# The strategies by short name (benchmark configurations, tests): every combination the flags can select.
STRATEGIES = {
    "full": TrainingStrategy(lora=False, quantize_4bit=False, freeze_vision=False),
    "frozen": TrainingStrategy(lora=False, quantize_4bit=False, freeze_vision=True),
    "lora": TrainingStrategy(lora=True, quantize_4bit=False, freeze_vision=False),
    "qlora": TrainingStrategy(lora=True, quantize_4bit=True, freeze_vision=False),
    "lora_frozen": TrainingStrategy(lora=True, quantize_4bit=False, freeze_vision=True),
    "qlora_frozen": TrainingStrategy(lora=True, quantize_4bit=True, freeze_vision=True),
}
