"""The training strategies — full, frozen vision, LoRA, QLoRA — their facts, and the one builder that applies them.

What trains (`build_model` is where it happens):
- full finetuning: every weight (DeepSpeed ZeRO-2);
- frozen vision (`--freeze_vision_model`): all but the CLIP tower and the image projection (ZeRO-2);
- LoRA (`--use_lora`): adapters on the language model (LANGUAGE_LORA_TARGETS) and, unless the vision is
  frozen, on CLIP and the projection (VISION_LORA_TARGETS); the base stays frozen (DDP);
- QLoRA (`--use_qlora`): the same adapters on a 4-bit nf4 base (DDP).

`TrainingStrategy.from_flags` is the one place flags become a strategy; `STRATEGIES` names every
combination for the benchmark and the tests. `quantization_config` and `lora_config` are pure helpers
returning a config or None. Scripts never branch on the strategy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from .precision import Precision

if TYPE_CHECKING:
    from .config import LoraSettings

logger = logging.getLogger(__name__)

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


def quantization_config(strategy: TrainingStrategy, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if not strategy.quantize_4bit:
        return None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


def lora_config(
    strategy: TrainingStrategy, rank: int, alpha_ratio: float, dropout: float, exclude_modules: str | None = None
) -> LoraConfig | None:
    if not strategy.lora:
        return None
    targets = LANGUAGE_LORA_TARGETS + ([] if strategy.freeze_vision else VISION_LORA_TARGETS)
    return LoraConfig(
        r=rank,
        lora_alpha=round(rank * alpha_ratio),
        lora_dropout=dropout,
        target_modules=targets,
        init_lora_weights="gaussian",
        exclude_modules=exclude_modules,
        task_type="CAUSAL_LM",
    )


def load_model(
    model_name_or_path: str,
    precision: Precision,
    device: torch.device | str,
    quantization: BitsAndBytesConfig | None = None,
    adapter_path: str | None = None,
) -> PreTrainedModel:
    """Load an official-format checkpoint (and optionally a LoRA adapter on top) with our native code, in
    `precision.load_dtype`, straight onto `device`: the weights never sit in host memory all at once (without
    a device map every rank of a node would hold a full fp32 copy in RAM, ~16.6 GB each, before moving it)."""
    model = AutoModelForCausalLM.from_pretrained(
        model_name_or_path,
        dtype=precision.load_dtype,
        attn_implementation=precision.attn_implementation,
        quantization_config=quantization,
        device_map={"": torch.device(device)},
    )
    if adapter_path is not None:
        model = PeftModel.from_pretrained(model, adapter_path)
    return model


def _keep_4bit_layout_trainable(model: PreTrainedModel) -> None:
    """On CPU, bitsandbytes repacks a 4-bit layer for its inference kernel at the first forward in eval mode
    without gradients (the evaluation before training) and never unpacks it when training starts: the packed
    kernel has no backward, and it rejects layers narrower than its 64-value quantization block. The model
    being trained keeps the trainable layout (a no-op on GPU)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def build_model(
    model_name_or_path: str,
    strategy: TrainingStrategy,
    lora: LoraSettings,
    precision: Precision,
    device: torch.device | str,
) -> PreTrainedModel:
    """Load the base model onto `device` and make exactly the strategy's parameters trainable."""
    model = load_model(model_name_or_path, precision, device, quantization_config(strategy, precision.compute_dtype))
    model.config.use_cache = False  # the KV cache is useless with gradient checkpointing
    if strategy.quantize_4bit:
        _keep_4bit_layout_trainable(model)
    # The CLIP layers after the feature layer never influence the output: they get no adapters (so the adapter
    # loads onto a complete base model without missing keys) and are dropped from the model being trained.
    adapters = lora_config(strategy, lora.rank, lora.alpha_ratio, lora.dropout, model.unused_vision_layers_pattern())
    if adapters is not None:
        model.enable_input_require_grads()
        model = get_peft_model(model, adapters)
        model.get_base_model().trim_unused_vision_layers()  # never computed: saves the work, and DDP's checks
    if strategy.freeze_vision:
        freeze_image_embedding(model.get_base_model() if isinstance(model, PeftModel) else model)
    trainable, total = parameter_counts(model)
    logger.info("%s: %s of %s parameters trainable", strategy.name, f"{trainable:,}", f"{total:,}")
    return model


def freeze_image_embedding(model: PreTrainedModel) -> None:
    """The recipe's `--freeze_vision_model`: `requires_grad_(False)` on the original model's image-embedding
    module, which holds the CLIP tower, the separators, the projection and the token-embedding table it
    shares with the decoder. Our model keeps that table at `model.embed_tokens`, so it is frozen by name."""
    model.model.vision_embed_tokens.requires_grad_(False)
    model.model.embed_tokens.requires_grad_(False)


def _stored_numel(parameter: torch.Tensor) -> int:
    """Parameters in a tensor; a bitsandbytes 4-bit weight stores two per byte, its quant state knows the shape."""
    quant_state = getattr(parameter, "quant_state", None)
    return quant_state.shape.numel() if quant_state is not None else parameter.numel()


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameter counts, 4-bit weights counted as the weights they quantize."""
    return (
        sum(_stored_numel(p) for p in model.parameters() if p.requires_grad),
        sum(_stored_numel(p) for p in model.parameters()),
    )
