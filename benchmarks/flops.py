"""Model FLOPs per training sample, peak FLOPs per GPU and utilisation (MFU/HFU); see benchmark.py's docstring."""

from __future__ import annotations

from dataclasses import dataclass

from common.phi3v.image_processing_phi3_v import CROP_SIZE
from common.strategy import STRATEGIES


@dataclass(frozen=True)
class ModelDims:
    """The matmul shapes of a Phi-3-V model (weight matrices only; norms, biases and embeddings are ignored)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    vision_hidden: int = 0
    vision_intermediate: int = 0
    vision_layers: int = 0  # layers of the CLIP tower as built
    vision_feature_layers: int = 0  # layers whose output feeds the projection (the rest is trimmed for LoRA)
    patch_size: int = 14
    image_size: int = CROP_SIZE

    @classmethod
    def from_config(cls, config) -> ModelDims:
        vision = config.vision_config
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads or config.num_attention_heads,
            vocab=config.vocab_size,
            vision_hidden=vision.hidden_size,
            vision_intermediate=vision.intermediate_size,
            vision_layers=vision.num_hidden_layers,
            vision_feature_layers=config.vision_feature_layer,
            patch_size=vision.patch_size,
            image_size=vision.image_size,
        )

    @property
    def decoder_linears(self) -> list[tuple[int, int]]:
        """(in, out) of one decoder layer's weights: qkv_proj, o_proj, gate_up_proj, down_proj."""
        h, kv = self.hidden, self.hidden // self.heads * self.kv_heads
        return [(h, h + 2 * kv), (h, h), (h, 2 * self.intermediate), (self.intermediate, h)]

    @property
    def vision_linears(self) -> list[tuple[int, int]]:
        """(in, out) of one CLIP layer's weights: q, k, v, out_proj, fc1, fc2."""
        v = self.vision_hidden
        return [(v, v)] * 4 + [(v, self.vision_intermediate), (self.vision_intermediate, v)]

    @property
    def projection_linears(self) -> list[tuple[int, int]]:
        """img_projection.0 (4 merged CLIP patches -> hidden) and img_projection.2."""
        return [(4 * self.vision_hidden, self.hidden), (self.hidden, self.hidden)]

    @property
    def vision_tokens_per_crop(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # patches + CLS

    def matmul_params(self) -> int:
        """Weight-matrix parameters that do matmuls (decoder, lm_head, CLIP layers, patch conv, projection)."""
        decoder = self.layers * sum(i * o for i, o in self.decoder_linears) + self.hidden * self.vocab
        vision = self.vision_layers * sum(i * o for i, o in self.vision_linears)
        conv = 3 * self.patch_size**2 * self.vision_hidden
        return decoder + vision + conv + sum(i * o for i, o in self.projection_linears)


def training_flops(
    dims: ModelDims,
    seq_len: float,
    crops: int,
    image_tokens: int,
    strategy: str,
    lora_rank: int = 64,
    gradient_checkpointing: bool = True,
) -> dict[str, float]:
    """FLOPs of one training sample (one image of `crops` encoded crops and `image_tokens` placeholder tokens in
    a sequence of `seq_len` tokens) -> {"forward", "model", "hardware"}; see benchmark.py's docstring.

    Roles: "train" (weights trainable: backward 2x forward), "pass" (frozen, gradients flow through them to
    something trainable: 1x), "leaf" (frozen, nothing trainable below: 0). Attention backward is 2x its forward
    wherever gradients flow. `hardware` adds one forward of checkpointed layers that take part in the backward.
    """
    lora, frozen_vision = STRATEGIES[strategy].lora, STRATEGIES[strategy].freeze_vision
    decoder_role = "pass" if lora else "train"
    vision_role = "leaf" if frozen_vision else decoder_role
    totals = {"forward": 0.0, "model": 0.0, "hardware": 0.0}

    def add(linears, tokens, role, attention=0.0, checkpointed=False, lora_targets=False, count=1):
        matmul = 2 * sum(i * o for i, o in linears) * tokens
        backward = {"train": 2 * matmul, "pass": matmul, "leaf": 0.0}[role]
        backward += 2 * attention if role != "leaf" else 0.0
        forward = matmul + attention
        if lora and lora_targets and role != "leaf":
            adapter = 2 * sum(lora_rank * (i + o) for i, o in linears) * tokens
            forward += adapter
            backward += 2 * adapter
        totals["forward"] += count * forward
        totals["model"] += count * (forward + backward)
        totals["hardware"] += count * (forward + backward + (forward if checkpointed and role != "leaf" else 0.0))

    # Decoder layers and lm_head (logits for every position).
    add(dims.decoder_linears, seq_len, decoder_role, attention=4 * seq_len**2 * dims.hidden,
        checkpointed=gradient_checkpointing, lora_targets=True, count=dims.layers)
    add([(dims.hidden, dims.vocab)], seq_len, decoder_role, lora_targets=True)
    if crops and dims.vision_layers:
        vision_tokens = crops * dims.vision_tokens_per_crop
        vision_attention = 4 * crops * dims.vision_tokens_per_crop**2 * dims.vision_hidden
        # LoRA trims the CLIP layers after the feature layer; otherwise they run forward but get no gradient.
        built = dims.vision_feature_layers if lora else dims.vision_layers
        used = dims.vision_feature_layers
        add(dims.vision_linears, vision_tokens, vision_role, attention=vision_attention,
            checkpointed=gradient_checkpointing, lora_targets=True, count=used)
        add(dims.vision_linears, vision_tokens, "leaf", attention=vision_attention, count=built - used)
        # The patch convolution sees only pixels: trainable in full finetuning, never passed through.
        conv = [(3 * dims.patch_size**2, dims.vision_hidden)]
        add(conv, crops * (dims.vision_tokens_per_crop - 1), "train" if vision_role == "train" else "leaf")
        add(dims.projection_linears, image_tokens, vision_role, lora_targets=True)
    return totals


# Dense bf16 tensor-core peak per GPU (no sparsity), matched in order against torch.cuda.get_device_name().
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
]


def peak_flops_for(device_name: str) -> float | None:
    """Dense bf16 peak FLOPs/s of one GPU from its name, or None when unknown."""
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def utilization(flops_per_sample: float, samples_per_s: float, peak_flops_per_gpu: float | None, gpus: int):
    """Achieved FLOPs/s over the peak of all GPUs; None without a known peak."""
    if not peak_flops_per_gpu or gpus < 1:
        return None
    return flops_per_sample * samples_per_s / (peak_flops_per_gpu * gpus)

