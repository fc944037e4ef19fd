"""Phi-3.5-vision processor: chat text with `<|image_N|>` tags plus images -> model inputs.

Reimplements the hub remote code (`processing_phi3_v.py`, transformers 4.45): the text is split on the image
tags, every chunk is tokenized on its own with the tokenizer's defaults (so each chunk, including an empty
leading one, starts with BOS), and each tag `<|image_N|>` becomes `num_img_tokens[N - 1]` copies of `-N`, the
placeholder the model replaces with image features. Beyond the original, `text` may be a list of prompts with
one image list per prompt; the batch is padded with the tokenizer's pad id.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import BatchFeature, TokenizersBackend
from transformers.processing_utils import ProcessorMixin

from .image_processing_phi3_v import Phi3VImageProcessor

# An image tag in a prompt. One capturing group: `split` alternates text chunk, tag number, text chunk, ...
IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
# The output must be rectangular, so every `padding` value but "max_length" pads to the longest prompt.
_PAD_TO_LONGEST = (False, True, None, "longest", "do_not_pad")


def pad_sequences(sequences: list[list[int]], value: int, side: str, length: int | None = None) -> torch.Tensor:
    """B id lists -> (B, length) long tensor, `value` on `side` ("right" or "left"); length: the longest."""
    length = max(map(len, sequences)) if length is None else length
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        start = 0 if side == "right" else length - len(sequence)
        out[row, start : start + len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return out


def split_counts(counts: list[int], sizes: list[int]) -> list[list[int]]:
    """`counts` (one per image, in order) cut into consecutive runs of `sizes`: each prompt's, sample's or
    turn's own images' token counts."""
    runs, first = [], 0
    for size in sizes:
        runs.append(counts[first : first + size])
        first += size
    return runs


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _split_prompt(prompt: str, num_images: int) -> tuple[list[str], list[int]]:
    """Prompt -> (text chunks, image number of each tag); len(chunks) == len(tags) + 1.

    Tags may repeat, but their distinct numbers must be exactly 1..num_images.
    """
    parts = IMAGE_TAG.split(prompt)
    chunks, image_ids = parts[::2], [int(number) for number in parts[1::2]]
    distinct = sorted(set(image_ids))
    if distinct != list(range(1, len(distinct) + 1)):
        raise ValueError(f"image tags must be numbered 1..n without gaps, got {distinct}")
    if len(distinct) != num_images:
        verb = "was" if num_images == 1 else "were"
        raise ValueError(
            f"prompt has {_plural(len(distinct), 'image tag')} but {_plural(num_images, 'image')} {verb} given"
        )
    return chunks, image_ids


def _batch_layout(text: str | list[str], images: Any) -> tuple[list[str], list[list[Any]]]:
    """Normalise the two call forms to (prompts, per-prompt image lists).

    `text` str: `images` is None, one image or a list of images. `text` list: `images` is None or one image
    list per prompt.
    """
    if isinstance(text, str):
        if images is None:
            return [text], [[]]
        return [text], [list(images) if isinstance(images, (list, tuple)) else [images]]
    if not isinstance(text, (list, tuple)) or not text or not all(isinstance(t, str) for t in text):
        raise ValueError("text must be a string or a non-empty list of strings")
    if images is None:
        return list(text), [[] for _ in text]
    if (
        not isinstance(images, (list, tuple))
        or len(images) != len(text)
        or not all(isinstance(sample, (list, tuple)) for sample in images)
    ):
        raise ValueError(
            f"with a list of {len(text)} texts, images must be a list of {len(text)} per-text image lists "
            "(use [] for a text without images)"
        )
    return list(text), [list(sample) for sample in images]


class Phi3VProcessor(ProcessorMixin):
    """Wraps a `Phi3VImageProcessor` and the checkpoint's tokenizer (its tokenizer.json pipeline, unchanged)."""

    def __init__(self, image_processor: Phi3VImageProcessor, tokenizer: Any) -> None:
        super().__init__(image_processor, tokenizer)

    @property
    def num_img_tokens(self) -> int:
        return self.image_processor.num_img_tokens

    def calc_num_image_tokens(self, images: Any) -> list[int]:
        """Image token count per image (see `Phi3VImageProcessor.calc_num_image_tokens`)."""
        return self.image_processor.calc_num_image_tokens(images)

    def calc_num_image_tokens_from_image_size(self, width: int, height: int) -> int:
        """Image token count for a `width x height` image."""
        return self.image_processor.calc_num_image_tokens_from_image_size(width, height)

    def __call__(
        self,
        text: str | list[str],
        images: Any = None,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str = "pt",
        padding_side: str = "right",
    ) -> BatchFeature:
        """Prompt(s) with `<|image_N|>` tags and their images -> BatchFeature.

        Returns `input_ids` / `attention_mask` (B, L) long, B = number of prompts, plus, when any image is
        given, `pixel_values` (total images, num_crops + 1, 3, 336, 336) float32 in prompt order and
        `image_sizes` (total images, 2). Prompts are always padded to a common length (to `max_length` with
        `padding="max_length"`) with the tokenizer's pad id on `padding_side`; with `truncation` and
        `max_length` (default: the tokenizer's model_max_length) longer prompts are cut on the right,
        which must not cut image tokens.
        """
        if return_tensors != "pt":
            raise ValueError(f"only return_tensors='pt' is supported, got {return_tensors!r}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if padding not in _PAD_TO_LONGEST and not (padding == "max_length" and max_length is not None):
            raise ValueError(
                f"padding must be a bool, 'longest' or 'max_length' with max_length, got {padding!r}"
            )
        prompts, images_per_prompt = _batch_layout(text, images)
        batched = not isinstance(text, str)

        splits = []
        for index, (prompt, prompt_images) in enumerate(zip(prompts, images_per_prompt, strict=True)):
            try:
                splits.append(_split_prompt(prompt, len(prompt_images)))
            except ValueError as err:
                raise ValueError(f"text[{index}]: {err}" if batched else str(err)) from None

        flat_images = [image for prompt_images in images_per_prompt for image in prompt_images]
        image_inputs = self.image_processor(flat_images) if flat_images else None
        tokens_per_image = image_inputs["num_img_tokens"] if image_inputs else []

        per_prompt = split_counts(tokens_per_image, [len(prompt_images) for prompt_images in images_per_prompt])
        sequences = [
            self._interleave(chunks, image_ids, counts)
            for (chunks, image_ids), counts in zip(splits, per_prompt, strict=True)
        ]
        if truncation not in (None, False, "do_not_truncate"):
            limit = max_length if max_length is not None else self.tokenizer.model_max_length
            sequences = [_truncate(sequence, limit) for sequence in sequences]

        target = max(map(len, sequences))
        if padding == "max_length":
            target = max(target, max_length)
        input_ids, attention_mask = self._pad(sequences, target, padding_side)
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if image_inputs:
            data.update(pixel_values=image_inputs["pixel_values"], image_sizes=image_inputs["image_sizes"])
        return BatchFeature(data=data)

    def encode_prompt(self, prompt: str, tokens_per_image: list[int]) -> list[int]:
        """Ids of one prompt whose k-th `<|image_N|>` tag stands for the k-th of the given images.

        Unlike `__call__`, tags are matched to images by position, not by number: the recipe numbers every
        turn's images from 1, so a conversation's prompt may repeat numbers. Each tag still emits `-N`, as the
        original processor does; the model fills the spans with the images in the order the spans appear.
        """
        parts = IMAGE_TAG.split(prompt)
        chunks, image_ids = parts[::2], [int(number) for number in parts[1::2]]
        if len(image_ids) != len(tokens_per_image):
            raise ValueError(
                f"prompt has {_plural(len(image_ids), 'image tag')} but {_plural(len(tokens_per_image), 'image')} "
                f"{'was' if len(tokens_per_image) == 1 else 'were'} given"
            )
        return self._join(self.tokenizer(chunks).input_ids, image_ids, tokens_per_image)

    def _interleave(self, chunks: list[str], image_ids: list[int], tokens_per_image: list[int]) -> list[int]:
        """Tokenize each chunk separately and put `[-N] * tokens_per_image[N - 1]` between consecutive chunks."""
        counts = [tokens_per_image[image_id - 1] for image_id in image_ids]
        return self._join(self.tokenizer(chunks).input_ids, image_ids, counts)

    @staticmethod
    def _join(chunk_ids: list[list[int]], image_ids: list[int], span_lengths: list[int]) -> list[int]:
        """Chunk ids with a span of `span_lengths[k]` copies of `-image_ids[k]` after chunk k."""
        input_ids = list(chunk_ids[0])
        for image_id, length, next_chunk in zip(image_ids, span_lengths, chunk_ids[1:], strict=True):
            input_ids += [-image_id] * length
            input_ids += next_chunk
        return input_ids

    def _pad(self, sequences: list[list[int]], length: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """B id lists -> (input_ids, attention_mask), both (B, length) long, padded on `side`."""
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None and any(len(sequence) < length for sequence in sequences):
            raise ValueError("the tokenizer has no pad_token_id; set tokenizer.pad_token to pad a batch")
        input_ids = pad_sequences(sequences, pad_id if pad_id is not None else 0, side, length)
        attention_mask = pad_sequences([[1] * len(sequence) for sequence in sequences], 0, side, length)
        return input_ids, attention_mask

    def apply_chat_template(self, conversation: Any, tokenize: bool = False, **kwargs) -> Any:
        """The tokenizer's chat template (the checkpoint's lives in tokenizer_config.json); by default returns
        the prompt string to pass to `__call__` together with the images, like the original processor."""
        return self.tokenizer.apply_chat_template(conversation, tokenize=tokenize, **kwargs)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> list[str]:
        """v5 layout (processor_config.json + tokenizer files) plus the official preprocessor_config.json, so
        the folder also loads where the original layout is expected."""
        files = self.image_processor.save_pretrained(save_directory)
        return files + super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> Phi3VProcessor:
        """Load the image processor and the tokenizer from a folder or hub id, without remote code.

        Image-processor settings among the kwargs (e.g. `num_crops=16`, as the original scripts pass to
        `AutoProcessor.from_pretrained`) go to the image processor only, so they do not end up in the
        tokenizer's saved config; the rest (cache_dir, revision, ...) go to both. The loading is ours rather
        than `ProcessorMixin`'s because transformers routes these kwargs differently from one minor release
        to the next (5.25 hands every kwarg to `AutoTokenizer`). Remote code is never run: official folders'
        `auto_map` names the hub's `.py` files, which these classes replace (they need not even be present).
        """
        kwargs.pop("trust_remote_code", None)
        image_keys = Phi3VImageProcessor.valid_kwargs.__annotations__
        image_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in image_keys}
        image_processor = Phi3VImageProcessor.from_pretrained(
            pretrained_model_name_or_path, **kwargs, **image_kwargs
        )
        # The tokenizer.json pipeline as serialized, as the recipe's stack (transformers 4.4x) ran it. The
        # Llama class of transformers 5 rebuilds it with another prefix-space rule: "<|user|>\n" would lose
        # the "▁" token the model was trained with (Phi-3.5-vision: 29871 before every "\n" after a tag).
        tokenizer = TokenizersBackend.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls(image_processor=image_processor, tokenizer=tokenizer)

def _truncate(sequence: list[int], limit: int) -> list[int]:
    """Keep the first `limit` ids; refuse to drop image placeholder ids (negative), which would desync the
    prompt from pixel_values."""
    if len(sequence) > limit and min(sequence[limit:]) < 0:
        raise ValueError(
            f"truncating to max_length={limit} would cut image tokens; raise max_length or use fewer images"
        )
    return sequence[:limit]
