"""Batches of `Sample`s for training (prompt + answers, labelled) and for evaluation (prompts to complete).

Token layout, as the recipe's collators build it with the checkpoint's processor:
- training: every turn on its own — the chat-templated user message (`Sample.user_message`: the turn's image
  tags numbered from 1, a newline, the text) ending in `<|assistant|>\n`, encoded by the processor (each
  text chunk tokenized with BOS: at the start and after every image), then the answer
  `{answer}<|end|>\n<|endoftext|>` tokenized without special tokens. Labels are the answer tokens; prompts,
  image spans and padding are -100. Labels come from this layout, never from comparing ids with the pad id,
  so an `<|endoftext|>` that doubles as pad is still learnt.
- evaluation: one chat-templated prompt of the whole conversation up to the last user message (earlier
  answers as assistant messages `{answer}<|end|>\n<|endoftext|>`), encoded in one processor pass with the
  images of all turns; the model fills the image spans in the order they appear.
A sample's system message (custom data) opens the first turn's prompt as the chat template writes it,
`<|system|>\n{text}<|end|>\n`, so it is part of a prompt and never learnt.
"""

from __future__ import annotations

from .data import Sample
from .errors import UserError
from .phi3v.loss import IGNORE_INDEX  # the label the loss skips
from .phi3v.processing_phi3_v import pad_sequences, split_counts

END_OF_ANSWER = "<|end|>\n<|endoftext|>"


class ConversationEncoder:
    """Turns one sample into token ids (and labels); shared by the training and evaluation collators."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer

    def _template(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @staticmethod
    def _opening(sample: Sample) -> list[dict]:
        return [] if sample.system is None else [{"role": "system", "content": sample.system}]

    def encode_training(self, sample: Sample, tokens_per_image: list[int]) -> tuple[list[int], list[int]]:
        input_ids, labels = [], []
        per_turn = split_counts(tokens_per_image, [len(turn.images) for turn in sample.turns])
        for number, (turn, counts) in enumerate(zip(sample.turns, per_turn, strict=True)):
            opening = self._opening(sample) if number == 0 else []
            prompt = self._template([*opening, {"role": "user", "content": sample.user_message(turn)}])
            prompt_ids = self.processor.encode_prompt(prompt, counts)
            answer_ids = self.tokenizer(turn.assistant + END_OF_ANSWER, add_special_tokens=False).input_ids
            input_ids += prompt_ids + answer_ids
            labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        return input_ids, labels

    def encode_prompt(self, sample: Sample, tokens_per_image: list[int]) -> list[int]:
        messages = self._opening(sample)
        for turn in sample.turns[:-1]:
            messages.append({"role": "user", "content": sample.user_message(turn)})
            messages.append({"role": "assistant", "content": turn.assistant + END_OF_ANSWER})
        messages.append({"role": "user", "content": sample.user_message(sample.turns[-1])})
        return self.processor.encode_prompt(self._template(messages), tokens_per_image)

    def encode_batch(self, samples: list[Sample], training: bool):
        """-> (per-sample ids, per-sample labels (None for prompts), image inputs of all samples or None)."""
        images = [image for sample in samples for image in sample.images]
        image_inputs = self.processor.image_processor(images) if images else None
        counts = image_inputs["num_img_tokens"] if image_inputs else []
        ids, labels = [], []
        per_sample = split_counts(counts, [len(sample.images) for sample in samples])
        for sample, own_counts in zip(samples, per_sample, strict=True):
            try:
                if training:
                    sample_ids, sample_labels = self.encode_training(sample, own_counts)
                else:
                    sample_ids, sample_labels = self.encode_prompt(sample, own_counts), None
            except ValueError as error:
                raise UserError(f"sample {sample.id}: {error}") from error
            ids.append(sample_ids)
            labels.append(sample_labels)
        return ids, labels, image_inputs


def _with_images(batch: dict, image_inputs) -> dict:
    if image_inputs is not None:
        batch["pixel_values"] = image_inputs["pixel_values"]
        batch["image_sizes"] = image_inputs["image_sizes"]
    return batch


class Phi3VTrainCollator:
    """`Sample`s -> training batch.

    Returns input_ids, attention_mask and labels (B, L) long, right-padded (pad id, mask 0, label -100), and,
    when any sample has images, pixel_values (N, num_crops+1, 3, 336, 336) and image_sizes (N, 2) for the
    batch's N images in sample order. Samples with and without images may share a batch.
    """

    def __init__(self, processor, max_length: int | None = None):
        self.encoder = ConversationEncoder(processor)
        self.pad_token_id = processor.tokenizer.pad_token_id
        self.max_length = max_length

    def encode(self, samples: list[Sample]):
        """-> per-sample ids and labels and the image inputs of all samples, each sample within --max_length."""
        ids, labels, image_inputs = self.encoder.encode_batch(samples, training=True)
        if self.max_length is not None:
            for sample, sample_ids in zip(samples, ids, strict=True):
                if len(sample_ids) > self.max_length:
                    raise UserError(
                        f"sample {sample.id} has {len(sample_ids)} tokens (images included), more than "
                        f"--max_length {self.max_length}; raise --max_length, lower --num_crops or remove the sample"
                    )
        return ids, labels, image_inputs

    def __call__(self, samples: list[Sample]) -> dict:
        ids, labels, image_inputs = self.encode(samples)
        batch = {
            "input_ids": pad_sequences(ids, self.pad_token_id, "right"),
            "attention_mask": pad_sequences([[1] * len(s) for s in ids], 0, "right"),
            "labels": pad_sequences(labels, IGNORE_INDEX, "right"),
        }
        return _with_images(batch, image_inputs)


class Phi3VEvalCollator:
    """`Sample`s -> generation batch: the conversation up to the last answer, left-padded.

    Returns input_ids and attention_mask (B, L), pixel_values / image_sizes as the training collator, and the
    python lists `ids` and `references` (pop them before calling `generate`).
    """

    def __init__(self, processor):
        self.encoder = ConversationEncoder(processor)
        self.pad_token_id = processor.tokenizer.pad_token_id

    def __call__(self, samples: list[Sample]) -> dict:
        ids, _, image_inputs = self.encoder.encode_batch(samples, training=False)
        batch = {
            "input_ids": pad_sequences(ids, self.pad_token_id, "left"),
            "attention_mask": pad_sequences([[1] * len(s) for s in ids], 0, "left"),
            "ids": [sample.id for sample in samples],
            "references": [sample.references for sample in samples],
        }
        return _with_images(batch, image_inputs)
