"""LongRoPE per sample: a sample's logits and greedy generation do not depend on its batch-mates, also when
the batch holds samples on both sides of `original_max_position_embeddings` (512 in the reference fixture)
and when a row crosses it while it generates."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoProcessor

from common.phi3v.rotary import sample_lengths

FILLER = "Answer the question with a short phrase. "
NEW_TOKENS = 32


def test_sample_lengths_of_padded_packed_and_generating_rows():
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2], [1, 1, 0, 1, 2, 3, 4, 5, 6]])
    assert sample_lengths(positions).tolist() == [[4, 4, 4, 4, 2, 2, 3, 3, 3], [2, 2, 7, 7, 7, 7, 7, 7, 7]]
    assert sample_lengths(torch.tensor([[700], [20]])).tolist() == [[701], [21]]  # one new token per row


@pytest.fixture(scope="module")
def model_and_processor(fixture_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixture's flash_attention_2 request
        model = AutoModelForCausalLM.from_pretrained(fixture_dir / "tiny_phi3v", attn_implementation="sdpa",
                                                     dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(fixture_dir / "tiny_phi3v")


def _prompt(processor, at_most: int) -> str:
    """The longest prompt of repeated filler with at most `at_most` tokens."""
    def prompt(repeats: int) -> str:
        return f"<|user|>\n{FILLER * repeats}What is it?<|end|>\n<|assistant|>\n"

    repeats = 0
    while len(processor.tokenizer(prompt(repeats + 1)).input_ids) <= at_most:
        repeats += 1
    return prompt(repeats)


def _straddling(processor, limit: int) -> list[str]:
    """One short prompt, one that crosses the limit while generating, one past it."""
    prompts = [_prompt(processor, at_most) for at_most in (limit // 3, limit, limit + 120)]
    lengths = [len(processor.tokenizer(p).input_ids) for p in prompts]
    assert lengths[0] < limit - NEW_TOKENS and limit - NEW_TOKENS < lengths[1] <= limit < lengths[2], lengths
    return prompts


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_batch_logits_equal_single_sample_logits_across_the_rope_limit(model_and_processor, padding_side):
    model, processor = model_and_processor
    prompts = _straddling(processor, model.config.original_max_position_embeddings)
    batch = processor(text=prompts, padding_side=padding_side)
    with torch.no_grad():
        batched = model(**batch).logits
        for index, prompt in enumerate(prompts):
            alone = model(**processor(prompt)).logits[0]
            rows = batched[index, : len(alone)] if padding_side == "right" else batched[index, -len(alone):]
            torch.testing.assert_close(rows, alone, rtol=1e-4, atol=1e-4)


def test_batched_generation_equals_one_prompt_at_a_time_across_the_rope_limit(model_and_processor):
    model, processor = model_and_processor
    prompts = _straddling(processor, model.config.original_max_position_embeddings)
    pad = processor.tokenizer.pad_token_id
    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad)
    with torch.no_grad():
        batch = processor(text=prompts, padding_side="left")
        batched = model.generate(**batch, **settings)[:, batch["input_ids"].shape[1]:]
        for index, prompt in enumerate(prompts):
            single = processor(prompt)
            alone = model.generate(**single, **settings)[0, single["input_ids"].shape[1]:]
            assert batched[index].tolist() == alone.tolist(), f"prompt {index}"
