"""A pair's two token sequences, and batches of pairs for the model.

A pair's prompt is the supervised prompt of its conversation (common/collators.py: `ConversationEncoder`, the
same chat template, system message, image spans and per-turn layout; earlier answers are part of the prompt
here and never learnt); its chosen and its rejected sequence are that prompt followed by the answer as an
answer is learnt, `{answer}<|end|>\\n<|endoftext|>`. `--max_prompt_length` keeps the end of a longer prompt
(the question and the answers' context, as TRL keeps it); a cut that would fall inside an image span refuses
the pair, naming it, and images cut off whole are dropped. `--max_length` refuses a longer sequence as
supervised training does.

A batch holds both sequences of each of its pairs, chosen then rejected, padded (rows) or packed (rows of
whole sequences, positions restarting at 0 for each: common/packing.py), and each pair's images once:
`image_of_span` tells the model which image fills each image span, so a pair's two sequences share the
images' features. `answer_sequence` marks each answer token with its sequence's number (2p for pair p's
chosen, 2p + 1 for its rejected answer; -1 elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..collators import END_OF_ANSWER, ConversationEncoder
from ..errors import UserError
from ..packing import pack_rows, packed_rows
from ..phi3v.processing_phi3_v import pad_sequences, split_counts
from .pairs import PreferencePair

NOT_AN_ANSWER = -1


@dataclass(frozen=True)
class EncodedPair:
    prompt: list[int]
    chosen: list[int]  # answer tokens
    rejected: list[int]
    images: list[int]  # indices into the batch's images of those the prompt keeps, in span order

    def sequences(self) -> list[tuple[list[int], list[int]]]:
        """(input ids, answer marks: 1 on answer tokens, 0 elsewhere) of the chosen and the rejected sequence."""
        return [(self.prompt + answer, [0] * len(self.prompt) + [1] * len(answer)) for answer in (self.chosen, self.rejected)]


def image_spans(ids: list[int]) -> list[int]:
    """The start of each image span (a run of equal negative ids) in `ids`."""
    return [i for i, token in enumerate(ids) if token < 0 and (i == 0 or ids[i - 1] != token)]


class PairEncoder:
    def __init__(self, processor, max_prompt_length: int | None = None, max_length: int | None = None):
        self.encoder = ConversationEncoder(processor)
        self.tokenizer = processor.tokenizer
        self.max_prompt_length = max_prompt_length
        self.max_length = max_length

    def answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer(answer + END_OF_ANSWER, add_special_tokens=False).input_ids

    def encode(self, pairs: list[PreferencePair]):
        """-> (EncodedPair per pair, the image inputs of all pairs' images or None)."""
        images = [image for pair in pairs for image in pair.images]
        image_inputs = self.encoder.processor.image_processor(images) if images else None
        counts = split_counts(image_inputs["num_img_tokens"] if image_inputs else [], [len(p.images) for p in pairs])
        encoded, first = [], 0
        for pair, own_counts in zip(pairs, counts, strict=True):
            encoded.append(self._encode(pair, own_counts, first))
            first += len(pair.images)
        return encoded, image_inputs

    def _encode(self, pair: PreferencePair, tokens_per_image: list[int], first_image: int) -> EncodedPair:
        chosen, rejected = self.answer_ids(pair.chosen), self.answer_ids(pair.rejected)
        try:
            supervised, _ = self.encoder.encode_training(pair.answered(pair.chosen), tokens_per_image)
        except ValueError as error:
            raise UserError(f"pair {pair.id}: {error}") from error
        prompt = supervised[: len(supervised) - len(chosen)]  # the answer closes the supervised sequence
        prompt, dropped = self._truncated(pair, prompt)
        for answer in (chosen, rejected):
            if self.max_length is not None and len(prompt) + len(answer) > self.max_length:
                raise UserError(
                    f"pair {pair.id} has {len(prompt) + len(answer)} tokens (images included), more than --max_length "
                    f"{self.max_length}; raise --max_length, set --max_prompt_length, lower --num_crops or remove the pair"
                )
        images = list(range(first_image + dropped, first_image + len(pair.images)))
        return EncodedPair(prompt, chosen, rejected, images)

    def _truncated(self, pair: PreferencePair, prompt: list[int]) -> tuple[list[int], int]:
        """The prompt's last --max_prompt_length tokens, and how many images were cut off whole."""
        if self.max_prompt_length is None or len(prompt) <= self.max_prompt_length:
            return prompt, 0
        cut = len(prompt) - self.max_prompt_length
        if prompt[cut] < 0 and prompt[cut - 1] == prompt[cut]:
            raise UserError(
                f"pair {pair.id}: --max_prompt_length {self.max_prompt_length} would cut its prompt of {len(prompt)} "
                f"tokens inside the span of image {-prompt[cut]}; raise --max_prompt_length or lower --num_crops"
            )
        return prompt[cut:], sum(1 for start in image_spans(prompt) if start < cut)


class PairCollator:
    """`PreferencePair`s -> a batch: input_ids (R, L), attention_mask (padded) or position_ids (packed),
    answer_sequence (R, L), pixel_values / image_sizes of the pairs' kept images and image_of_span (one per
    image span, in row order), and reference_logps (P, 2) when the pairs' reference log-probabilities were
    computed beforehand (`reference`: pair id -> (chosen, rejected))."""

    def __init__(self, encoder: PairEncoder, packing: bool = False, max_packed_tokens: int | None = None,
                 reference: dict[str, tuple[float, float]] | None = None):
        self.encoder = encoder
        self.pad_token_id = encoder.tokenizer.pad_token_id
        self.packing = packing
        self.max_packed_tokens = max_packed_tokens
        self.reference = reference

    def __call__(self, pairs: list[PreferencePair]) -> dict:
        encoded, image_inputs = self.encoder.encode(pairs)
        ids, marks, images = [], [], []
        for number, pair in enumerate(encoded):
            for side, (sequence, answer) in enumerate(pair.sequences()):
                ids.append(sequence)
                marks.append([2 * number + side if mark else NOT_AN_ANSWER for mark in answer])
                images.append(pair.images)
        batch = self._packed(ids, marks, images) if self.packing else self._padded(ids, marks, images)
        kept = [image for pair in encoded for image in pair.images]
        if kept:
            batch["pixel_values"] = image_inputs["pixel_values"][kept]
            batch["image_sizes"] = image_inputs["image_sizes"][kept]
            position = {image: index for index, image in enumerate(kept)}
            batch["image_of_span"] = torch.tensor([position[image] for image in batch.pop("span_images")], dtype=torch.long)
        else:
            batch.pop("span_images")
        if self.reference is not None:
            batch["reference_logps"] = torch.tensor([self.reference[pair.id] for pair in pairs], dtype=torch.float32)
        return batch

    def _padded(self, ids, marks, images) -> dict:
        return {
            "input_ids": pad_sequences(ids, self.pad_token_id, "right"),
            "attention_mask": pad_sequences([[1] * len(s) for s in ids], 0, "right"),
            "answer_sequence": pad_sequences(marks, NOT_AN_ANSWER, "right"),
            "span_images": [image for own in images for image in own],
        }

    def _packed(self, ids, marks, images) -> dict:
        rows = pack_rows([len(s) for s in ids], self.max_packed_tokens or max(len(s) for s in ids))
        batch = packed_rows(ids, {"answer_sequence": (marks, NOT_AN_ANSWER)}, rows, self.pad_token_id)
        batch["span_images"] = [image for row in rows for i in row for image in images[i]]
        return batch
