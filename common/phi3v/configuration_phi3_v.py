"""Configuration of the Phi-3-V (Phi-3.5-vision) model family.

Reads and writes the official `config.json` of `microsoft/Phi-3.5-vision-instruct`: the Phi-3 decoder
fields, `rope_scaling` of type `su` (long factors past `original_max_position_embeddings`), `embd_layer`
(HD transform layout and projection) and `img_processor` (which CLIP hidden layer feeds the projection).

One extension: an optional top-level `vision_config` (CLIPVisionConfig fields) replaces the CLIP
ViT-L/14-336 tower the official code hard-codes, so tiny models can be built for tests. Without it the
tower is ViT-L/14-336, and `vision_config` is not written back, so official files round-trip unchanged.
"""

from __future__ import annotations

import warnings
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import CLIPVisionConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.phi3.configuration_phi3 import Phi3Config
from transformers.utils import is_flash_attn_2_available

# The tower the official code builds for `img_processor.model_name == "openai/clip-vit-large-patch14-336"`.
CLIP_VIT_LARGE_PATCH14_336 = {
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "hidden_act": "quick_gelu",
    "hidden_size": 1024,
    "image_size": 336,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "num_attention_heads": 16,
    "num_channels": 3,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "projection_dim": 768,
}

DEFAULT_EMBD_LAYER = {
    "embedding_cls": "image",
    "hd_transform_order": "sub_glb",
    "projection_cls": "mlp",
    "use_hd_transform": True,
    "with_learnable_separator": True,
}

DEFAULT_IMG_PROCESSOR = {
    "image_dim_out": 1024,
    "model_name": "openai/clip-vit-large-patch14-336",
    "name": "clip_vision_model",
    "num_img_tokens": 144,
}


@strict
class Phi3VConfig(Phi3Config):
    r"""
    Phi-3-V configuration: a [`Phi3Config`] for the decoder plus the image embedding settings.

    embd_layer (`dict`):
        Image embedding layout. Supported as in the released models: `use_hd_transform` with learnable
        separators (`glb_GN`, `sub_GN`), `projection_cls` `"mlp"` (Linear-GELU-Linear) and
        `hd_transform_order` `"sub_glb"` or `"glb_sub"`.
    img_processor (`dict`):
        `image_dim_out` (CLIP hidden size), `num_img_tokens` (144), `layer_idx` (CLIP hidden state fed to
        the projection, default -2) and `type_feature` (`"patch"`: the CLS token is dropped).
    vision_config (`CLIPVisionConfig` or `dict`, *optional*):
        Overrides the CLIP ViT-L/14-336 tower (extension, for tiny test models).
    """

    model_type = "phi3_v"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=CLIPVisionConfig, init_kwargs=CLIP_VIT_LARGE_PATCH14_336)
    }

    vocab_size: int = 32064
    max_position_embeddings: int = 131072
    eos_token_id: int | list[int] | None = 2
    sliding_window: int | None = 262144
    embd_layer: dict | None = None
    img_processor: dict | None = None
    vision_config: dict | CLIPVisionConfig | None = None

    def __post_init__(self, **kwargs):
        # The official config.json asks for flash attention; honour it only where flash-attn is installed
        # (an explicit `attn_implementation=` from the caller is not affected and fails loudly instead).
        if kwargs.get("_attn_implementation") == "flash_attention_2" and not is_flash_attn_2_available():
            warnings.warn(
                "config.json requests flash_attention_2 but flash-attn is not installed; using sdpa. "
                "Install flash-attn (see README) for the faster kernel.",
                stacklevel=2,
            )
            kwargs.pop("_attn_implementation")
        self.embd_layer = {**DEFAULT_EMBD_LAYER, **(self.embd_layer or {})}
        self.img_processor = {**DEFAULT_IMG_PROCESSOR, **(self.img_processor or {})}
        super().__post_init__(**kwargs)
        self._validate_image_embedding()

    def convert_rope_params_to_dict(self, default_theta=10_000.0, ignore_keys=None, **kwargs):
        # Official files say `"type": "su"`; name it `longrope` before standardisation so that
        # `original_max_position_embeddings` is carried into the rope parameters.
        rope_scaling = kwargs.get("rope_scaling")
        if rope_scaling and rope_scaling.get("type", rope_scaling.get("rope_type")) == "su":
            rope_scaling = {k: v for k, v in rope_scaling.items() if k != "type"}
            kwargs["rope_scaling"] = {**rope_scaling, "rope_type": "longrope"}
        kwargs = super().convert_rope_params_to_dict(default_theta=default_theta, ignore_keys=ignore_keys, **kwargs)
        rope = self.rope_parameters
        if rope.get("rope_type") == "longrope" and rope.get("factor") is None and rope.get("original_max_position_embeddings"):
            # The factor the longrope code derives from the two lengths anyway, stated explicitly: without it
            # transformers warns at every config load. Not written back (the official format has no factor).
            rope["factor"] = self.max_position_embeddings / rope["original_max_position_embeddings"]
        return kwargs

    def _validate_image_embedding(self) -> None:
        problems = []
        layer = self.embd_layer
        if not (layer.get("use_hd_transform") and layer.get("with_learnable_separator")):
            problems.append("embd_layer: only use_hd_transform with with_learnable_separator is supported")
        if layer.get("projection_cls") != "mlp":
            problems.append(f"embd_layer.projection_cls must be 'mlp', got {layer.get('projection_cls')!r}")
        if layer.get("hd_transform_order") not in ("sub_glb", "glb_sub"):
            problems.append(
                f"embd_layer.hd_transform_order must be 'sub_glb' or 'glb_sub', got {layer.get('hd_transform_order')!r}"
            )
        if self.img_processor.get("type_feature", "patch") != "patch":
            problems.append("img_processor.type_feature: only 'patch' is supported")
        if self.img_processor["image_dim_out"] != self.vision_config.hidden_size:
            problems.append(
                f"img_processor.image_dim_out ({self.img_processor['image_dim_out']}) must equal the vision "
                f"tower's hidden_size ({self.vision_config.hidden_size})"
            )
        if problems:
            raise ValueError("Invalid Phi-3-V config:\n  " + "\n  ".join(problems))

    @property
    def vision_feature_layer(self) -> int:
        """Index into the CLIP `hidden_states` tuple (embeddings first) of the features fed to the projection."""
        layer_idx = self.img_processor.get("layer_idx", -2)
        return layer_idx if layer_idx >= 0 else self.vision_config.num_hidden_layers + 1 + layer_idx

    def to_dict(self) -> dict[str, Any]:
        """Serialise in the official format, which the original remote code and vLLM read."""
        output = super().to_dict()
        rope = output.pop("rope_parameters", None) or {}
        output["rope_theta"] = rope.get("rope_theta", 10000.0)
        if rope.get("rope_type", "default") != "default":
            output["rope_scaling"] = {
                "type": "su" if rope["rope_type"] == "longrope" else rope["rope_type"],
                **{k: v for k, v in rope.items() if k in ("short_factor", "long_factor")},
            }
        else:
            output["rope_scaling"] = None
        output.pop("partial_rotary_factor", None)
        default_tower = CLIPVisionConfig(**CLIP_VIT_LARGE_PATCH14_336).to_dict()
        default_tower.pop("transformers_version")
        if output.get("vision_config") == default_tower:
            output.pop("vision_config")
        return output

    def to_diff_dict(self) -> dict[str, Any]:
        """config.json also names the dtype `torch_dtype`, as the official files do (added after the diff, which
        reads every key back as an attribute and would trip over the deprecated alias)."""
        output = super().to_diff_dict()
        if "dtype" in output:
            output["torch_dtype"] = output["dtype"]
        return output


__all__ = ["Phi3VConfig"]
