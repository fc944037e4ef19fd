"""Phi-3-V (Phi-3.5-vision): transformers' Phi-3 decoder and CLIP vision tower, joined by the HD image embedding.

The module tree and parameter names are the official checkpoint's:

    model.embed_tokens, model.layers.*, model.norm, lm_head             <- transformers' Phi-3
    model.vision_embed_tokens.img_processor.vision_model.*              <- transformers' CLIP vision model
    model.vision_embed_tokens.{glb_GN, sub_GN, img_projection.0/.2}     <- HD layout and projection

Prompts mark image N of a sample with a span of `-N` token ids (see `Phi3VProcessor`). The forward pass
embeds the text, computes each image's features and writes them over those spans
(`Phi3VModel.merge_image_features`), then runs the Phi-3 decoder on the merged embeddings.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionModel
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.phi3.modeling_phi3 import Phi3ForCausalLM, Phi3Model, Phi3PreTrainedModel

from .configuration_phi3_v import Phi3VConfig
from .loss import full_loss, learnt_loss
from .rotary import PerSampleRotaryEmbedding


class Phi3VVisionTower(nn.Module):
    """Holds the CLIP model under the attribute name of the official checkpoints (`img_processor.vision_model`)."""

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        self.vision_model = CLIPVisionModel(config.vision_config)

    def forward(self, pixel_values: torch.Tensor, feature_layer: int) -> torch.Tensor:
        """(N, 3, S, S) crops -> (N, num_patches, C) patch features of CLIP hidden state `feature_layer`."""
        outputs = self.vision_model(pixel_values, output_hidden_states=True)
        return outputs.hidden_states[feature_layer][:, 1:]


class Phi3VImageEmbedding(nn.Module):
    """Turns HD-transformed images into decoder embeddings, as the original `vision_embed_tokens`.

    Each crop gives a 24x24 patch grid; 2x2 neighbouring patches are concatenated (12x12 tokens of 4C).
    The crops are tiled back into the image's (h x w) grid, a learnable `sub_GN` token closes every row,
    and the global 336x336 view gets the same treatment. The image's tokens are
    `[sub-image rows, glb_GN, global rows]` (`sub_glb`, Phi-3.5) or the reverse (`glb_sub`), then an MLP
    projects them to the decoder width: `(h*w + 1) * 144 + 1 + (h + 1) * 12` tokens per image.
    """

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        channels = config.img_processor["image_dim_out"]
        self.crop_size = config.vision_config.image_size
        self.feature_layer = config.vision_feature_layer
        self.hd_transform_order = config.embd_layer["hd_transform_order"]
        self.img_processor = Phi3VVisionTower(config)
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, channels * 4))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, channels * 4))
        self.img_projection = nn.Sequential(
            nn.Linear(channels * 4, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)
        )

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values (num_images, max_crops, 3, S, S), image_sizes (num_images, 2) [[h, w]] in pixels
        -> one (num_img_tokens_i, hidden_size) tensor per image."""
        grids = [(int(h) // self.crop_size, int(w) // self.crop_size) for h, w in image_sizes.tolist()]
        self._check_sizes(pixel_values, grids)
        # Only the global view and the real crops go through CLIP; the zero padding crops never matter.
        crops = torch.cat([pixel_values[i, : 1 + rows * cols] for i, (rows, cols) in enumerate(grids)])
        features = self._tower_features(crops)
        per_image = torch.split(features, [1 + rows * cols for rows, cols in grids])
        tokens = [
            self._hd_layout(image_features, rows, cols)
            for image_features, (rows, cols) in zip(per_image, grids, strict=True)
        ]
        # The bias, not the weight: a 4-bit (QLoRA) weight is stored as uint8; the bias keeps the compute dtype.
        projected = self.img_projection(torch.cat(tokens).to(self.img_projection[0].bias.dtype))
        return list(torch.split(projected, [len(t) for t in tokens]))

    def _check_sizes(self, pixel_values: torch.Tensor, grids: list[tuple[int, int]]) -> None:
        if len(grids) != len(pixel_values):
            raise ValueError(f"image_sizes has {len(grids)} rows but pixel_values hold {len(pixel_values)} images")
        for index, (rows, cols) in enumerate(grids):
            if rows < 1 or cols < 1 or 1 + rows * cols > pixel_values.shape[1]:
                raise ValueError(
                    f"image {index}: image_sizes {rows * self.crop_size}x{cols * self.crop_size} needs "
                    f"{1 + rows * cols} crops, pixel_values have room for {pixel_values.shape[1]}"
                )

    def _tower_features(self, crops: torch.Tensor) -> torch.Tensor:
        """CLIP features of the crops. A frozen tower runs without autograd: activation checkpointing makes
        every sub-model's input embeddings require grad (CLIP's patch embedding included), which would
        otherwise recompute and backpropagate all CLIP layers for no trainable parameter."""
        patch_embedding = self.img_processor.vision_model.embeddings.patch_embedding
        tower_trains = any(parameter.requires_grad for parameter in self.img_processor.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and tower_trains):
            return self.img_processor(crops.to(patch_embedding.weight.dtype), self.feature_layer)

    def _hd_layout(self, features: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """features (1 + rows*cols, P*P, C) of one image -> (num_img_tokens, 4C) token sequence."""
        side = int(features.shape[1] ** 0.5)
        half = side // 2
        merged = (
            features.reshape(-1, half, 2, half, 2, features.shape[-1])
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(-1, half, half, 4 * features.shape[-1])
        )
        global_grid = merged[0]
        sub_grid = merged[1:].reshape(rows, cols, half, half, -1).permute(0, 2, 1, 3, 4)
        sub_grid = sub_grid.reshape(rows * half, cols * half, -1)
        global_tokens = self._close_rows(global_grid)
        sub_tokens = self._close_rows(sub_grid)
        separator = self.glb_GN[0].to(features.dtype)
        if self.hd_transform_order == "sub_glb":
            return torch.cat([sub_tokens, separator, global_tokens])
        return torch.cat([global_tokens, separator, sub_tokens])

    def _close_rows(self, grid: torch.Tensor) -> torch.Tensor:
        """(R, W, 4C) grid -> (R * (W + 1), 4C): a `sub_GN` token after every row, as the original."""
        row_end = self.sub_GN[0].to(grid.dtype).expand(grid.shape[0], 1, -1)
        return torch.cat([grid, row_end], dim=1).reshape(-1, grid.shape[-1])


class Phi3VPreTrainedModel(Phi3PreTrainedModel):
    config: Phi3VConfig
    config_class = Phi3VConfig
    _no_split_modules = ["Phi3DecoderLayer", "CLIPEncoderLayer"]
    # Some finetuned copies carry the embedding twice, under the original's alias for the shared table.
    _keys_to_ignore_on_load_unexpected = [r"model\.vision_embed_tokens\.wte\.weight"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Phi3VImageEmbedding):
            nn.init.zeros_(module.glb_GN)
            nn.init.zeros_(module.sub_GN)
        if isinstance(module, PerSampleRotaryEmbedding):
            module.init_long_inv_freq()


class Phi3VModel(Phi3VPreTrainedModel, Phi3Model):
    """The Phi-3 decoder with the image embedding in front of it."""

    def __init__(self, config: Phi3VConfig):
        super().__init__(config)
        self.vision_embed_tokens = Phi3VImageEmbedding(config)
        self.rotary_emb = PerSampleRotaryEmbedding(config)  # LongRoPE factors per sample, not per batch
        self.post_init()

    def merge_image_features(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, image_features: list[torch.Tensor]
    ) -> torch.Tensor:
        """Write image features over the placeholder spans of `input_ids`, in the order the spans appear.

        As in the original model, the k-th span (row by row, left to right) takes the k-th image of
        `image_features` (the batch's images in sample order), whatever its `-N` number: a conversation whose
        turns each number their images from 1 gets every turn's images in place. A span is a run of equal
        negative ids; there must be one per image, each exactly as long as its image's features.
        """
        rows, cols = (input_ids < 0).nonzero(as_tuple=True)
        values = input_ids[rows, cols]
        starts_span = torch.ones_like(rows, dtype=torch.bool)
        starts_span[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1] + 1) | (values[1:] != values[:-1])
        span_id = starts_span.cumsum(0) - 1
        span_start = starts_span.nonzero().squeeze(1)
        if len(span_start) != len(image_features):
            raise ValueError(
                f"input_ids hold {len(span_start)} image placeholder spans (per sample: "
                f"{torch.bincount(rows[span_start], minlength=input_ids.shape[0]).tolist()}) but pixel_values hold "
                f"{len(image_features)} images"
            )
        lengths = torch.tensor([len(f) for f in image_features], device=rows.device)
        span_lengths = torch.bincount(span_id, minlength=len(image_features))
        if not torch.equal(span_lengths, lengths):
            bad = int((span_lengths != lengths).nonzero()[0])
            raise ValueError(
                f"sample {int(rows[span_start[bad]])}: image placeholder span {bad} (tag {-int(values[span_start[bad]])}) "
                f"has {int(span_lengths[bad])} tokens but its image has {int(lengths[bad])} features (image_sizes or "
                "num_crops do not match the prompt)"
            )
        offset_in_span = torch.arange(len(rows), device=rows.device) - span_start[span_id]
        feature_start = lengths.cumsum(0) - lengths
        # Each image in the embeddings' dtype before they are joined: QLoRA's projection answers in its compute dtype
        # (fp16), which autocast refuses to concatenate under bf16.
        flat_features = torch.cat([features.to(inputs_embeds.dtype) for features in image_features])
        return inputs_embeds.index_put((rows, cols), flat_features[feature_start[span_id] + offset_in_span])

    def embed_inputs(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_sizes: torch.Tensor | None,
        image_of_span: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features merged in; placeholder ids embed as token 0 before merging.
        `image_of_span`: the image (index into pixel_values) of each placeholder span, in the order the spans
        appear, for batches whose sequences share images (a preference pair's two answers): each image is
        encoded once. Default: the k-th span takes the k-th image."""
        has_placeholders = bool((input_ids < 0).any())
        if has_placeholders != (pixel_values is not None):
            raise ValueError(
                "input_ids contain image placeholders but no pixel_values were given"
                if has_placeholders
                else "pixel_values were given but input_ids contain no image placeholders (<|image_N|> tags)"
            )
        inputs_embeds = self.embed_tokens(input_ids.clamp(min=0))
        if pixel_values is None:
            return inputs_embeds
        if image_sizes is None:
            raise ValueError("pixel_values need image_sizes (the processor returns both)")
        image_features = self.vision_embed_tokens(pixel_values, image_sizes)
        if image_of_span is not None:
            image_features = [image_features[image] for image in image_of_span.tolist()]
        merged = self.merge_image_features(input_ids, inputs_embeds, image_features)
        return nn.functional.dropout(merged, p=self.config.embd_pdrop, training=self.training)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        image_of_span: torch.LongTensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if input_ids is not None and inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_sizes, image_of_span)
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = _positions_from_mask(kwargs.get("attention_mask"), kwargs.get("cache"), inputs_embeds)
        if _is_packed(kwargs):
            return self._forward_packed(inputs_embeds, **kwargs)
        return super().forward(inputs_embeds=inputs_embeds, **kwargs)

    def _forward_packed(self, inputs_embeds: torch.Tensor, **kwargs) -> BaseModelOutputWithPast:
        """Rows of several samples each (common/packing.py), told apart by their positions. transformers then
        masks block-diagonally (SDPA, eager) only without a cache, and runs flash attention's variable-length
        kernel only on a single row: several rows are laid end to end for it."""
        kwargs["use_cache"] = False
        rows, length = inputs_embeds.shape[:2]
        if rows == 1 or self.config._attn_implementation != "flash_attention_2":
            return super().forward(inputs_embeds=inputs_embeds, **kwargs)
        kwargs["position_ids"] = kwargs["position_ids"].expand(rows, length).reshape(1, rows * length)
        output = super().forward(inputs_embeds=inputs_embeds.reshape(1, rows * length, -1), **kwargs)
        output.last_hidden_state = output.last_hidden_state.view(rows, length, -1)
        return output

    @property
    def unused_vision_layers(self) -> range:
        """Indices of the CLIP layers after the feature layer: computed by CLIP, never used by the output."""
        return range(self.vision_embed_tokens.feature_layer, self.config.vision_config.num_hidden_layers)

    def unused_vision_layers_pattern(self) -> str | None:
        """Regex of the module names of the CLIP layers `trim_unused_vision_layers` drops (None if none)."""
        unused = self.unused_vision_layers
        if not unused:
            return None
        return rf".*\.vision_model\.encoder\.layers\.({'|'.join(map(str, unused))})\..*"

    def trim_unused_vision_layers(self) -> None:
        """Drop the CLIP layers after the feature layer and the final layer norm.

        They never influence the output, but DDP and ZeRO treat parameters without gradients as errors or
        waste; the original recipe deleted them before LoRA for the same reason.
        """
        clip = self.vision_embed_tokens.img_processor.vision_model
        del clip.encoder.layers[self.unused_vision_layers.start :]
        clip.post_layernorm = nn.Identity()


def _positions_from_mask(attention_mask, cache, inputs_embeds: torch.Tensor) -> torch.Tensor | None:
    """Each row's own positions in a padded batch without a cache (training, a forward without `generate`):
    real tokens count from 0 whatever the padding side, so the rotary scaling sees every sample's own length.
    None (transformers' default) otherwise."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[1] != inputs_embeds.shape[1]:
        return None
    if cache is not None and cache.get_seq_length() > 0:
        return None
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _is_packed(inputs: dict) -> bool:
    """A packed batch: positions that restart within a row, no attention mask, no cache."""
    position_ids = inputs.get("position_ids")
    if position_ids is None or inputs.get("attention_mask") is not None or inputs.get("cache") is not None:
        return False
    return bool((position_ids[:, 1:] != position_ids[:, :-1] + 1).any())


class Phi3VForCausalLM(Phi3VPreTrainedModel, Phi3ForCausalLM):
    """Phi-3-V with the language modelling head; `generate` works as for any transformers causal LM."""

    def __init__(self, config: Phi3VConfig):
        # Phi3ForCausalLM's constructor sets up the head and whatever else the family needs; the text-only
        # decoder it builds is replaced by the one with the image embedding, so it is built on the meta
        # device (no memory, no initialisation), and so is its head, which is built again for real.
        with torch.device("meta"):
            super().__init__(config)
        self.model = Phi3VModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        **kwargs,
    ):
        r"""
        pixel_values (`torch.FloatTensor` of shape `(num_images, num_crops + 1, 3, 336, 336)`, *optional*):
            All images of the batch in sample order, as returned by `Phi3VProcessor`.
        image_sizes (`torch.LongTensor` of shape `(num_images, 2)`, *optional*):
            Height and width of each image after the HD transform.
        """
        # The explicit signature matters: `generate` derives position_ids from the attention mask (left
        # padding) only for models whose forward names `position_ids`.
        if labels is not None:
            return self._forward_with_loss(
                labels, kwargs.pop("num_items_in_batch", None),
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                inputs_embeds=inputs_embeds, use_cache=use_cache, pixel_values=pixel_values, image_sizes=image_sizes,
                **kwargs,
            )
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            **kwargs,
        )

    def _forward_with_loss(self, labels: torch.Tensor, num_samples, **inputs) -> CausalLMOutputWithPast:
        """The recipe's loss (common/phi3v/loss.py), `num_samples` being the Trainer's `num_items_in_batch`.
        In training the head runs only where a token is learnt and `logits` is None."""
        position_ids = inputs["position_ids"]
        if not self.training:
            output = super().forward(**inputs)
            output.loss = full_loss(output.logits, labels, position_ids, num_samples)
            return output
        outputs = self.model(**{name: value for name, value in inputs.items() if name != "logits_to_keep"})
        loss = learnt_loss(outputs.last_hidden_state, self.lm_head, labels, position_ids, num_samples)
        return CausalLMOutputWithPast(loss=loss, logits=None, cache=outputs.cache)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        # The original keeps the KV cache when generation crosses `original_max_position_embeddings`;
        # transformers' Phi-3 would recompute everything then. Follow the original.
        return GenerationMixin.prepare_inputs_for_generation(self, *args, **kwargs)

    def trim_unused_vision_layers(self) -> None:
        self.model.trim_unused_vision_layers()

    def unused_vision_layers_pattern(self) -> str | None:
        return self.model.unused_vision_layers_pattern()


__all__ = ["Phi3VForCausalLM", "Phi3VModel", "Phi3VPreTrainedModel"]
