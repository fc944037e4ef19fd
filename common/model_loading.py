"""Loading the processor and the model, and building the model a strategy trains.

`build_model` applies a `TrainingStrategy` (common/strategy.py): the 4-bit base of QLoRA, the LoRA adapters
(on the language model, and on CLIP and the projection unless the vision is frozen), the frozen image
embedding. `load_model` loads a checkpoint (and an adapter on top) as users load it; `load_processor` the
checkpoint's processor with the run's num_crops.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, AutoProcessor, BitsAndBytesConfig, PreTrainedModel

from . import phi3v  # noqa: F401  (registers phi3_v with the Auto classes used here)
from .config import LoraSettings, ModelConfig
from .errors import UserError
from .precision import Precision
from .strategy import LANGUAGE_LORA_TARGETS, VISION_LORA_TARGETS, TrainingStrategy

if TYPE_CHECKING:
    from peft import LoraConfig

# peft is imported where adapters are made or loaded, not with this module: importing it loads bitsandbytes,
# which probes for its kernels and prints a line of its own before any logging is set up (even for --help).

logger = logging.getLogger(__name__)


def load_processor(model_config: ModelConfig):
    """The checkpoint's processor with the run's num_crops."""
    try:
        return AutoProcessor.from_pretrained(model_config.name_or_path, num_crops=model_config.num_crops)
    except OSError as error:  # not on the hub, or no hub access: transformers' message says which
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"cannot load --model_name_or_path {model_config.name_or_path} ({first_line}); give the folder of a "
            "downloaded checkpoint, or a hub model id with hub access"
        ) from error


def load_processor_and_model(
    model_config: ModelConfig, strategy: TrainingStrategy, lora: LoraSettings, precision: Precision, device
):
    """The processor with the run's num_crops, and the model built for the strategy on its device."""
    return load_processor(model_config), build_model(model_config.name_or_path, strategy, lora, precision, device)


def quantization_config(strategy: TrainingStrategy, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if not strategy.quantize_4bit:
        return None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


def lora_config(
    strategy: TrainingStrategy, rank: int, alpha_ratio: float, dropout: float, exclude_modules: str | None = None
) -> LoraConfig | None:
    if not strategy.lora:
        return None
    from peft import LoraConfig

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
        from peft import PeftModel

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
        from peft import get_peft_model

        model.enable_input_require_grads()
        model = get_peft_model(model, adapters)
        model.get_base_model().trim_unused_vision_layers()  # never computed: saves the work, and DDP's checks
    if strategy.freeze_vision:
        freeze_image_embedding(model.get_base_model() if adapters is not None else model)
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
