"""Packed batches train on exactly what their samples give one at a time: loss and every gradient, with
samples on both sides of `original_max_position_embeddings` (512 here), several images in a sample, a
text-only sample and a multi-turn one in one pack; padded batches likewise; and the lean loss (head and
cross-entropy only where learnt) equals the full one."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoProcessor

from common.collators import IGNORE_INDEX, Phi3VTrainCollator
from common.data import Sample, Turn
from common.packing import PackedTrainCollator, pack_rows
from common.phi3v.loss import samples_in_batch
from common.tiny_model import write_tiny_phi3v
from tests.scripts.e2e import COLOUR_QUESTION, colour_image

ROPE_LIMIT = 512
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def short_rope_model_dir(tmp_path_factory):
    return write_tiny_phi3v(tmp_path_factory.mktemp("short_rope") / "model", original_max_position_embeddings=ROPE_LIMIT)


@pytest.fixture(scope="module")
def processor(short_rope_model_dir):
    return AutoProcessor.from_pretrained(short_rope_model_dir, num_crops=1)


def samples() -> list[Sample]:
    return [
        Sample("two-images", [Turn("Which colours are these, left to right?", "red and blue",
                                   [colour_image("red", (700, 300)), colour_image("blue", (200, 500))])]),
        Sample("text-only", [Turn("Name a colour.", "blue")]),
        Sample("multi-turn", [Turn(COLOUR_QUESTION, "green", [colour_image("green", (40, 40))]),
                              Turn("Are you sure? Answer yes or no.", "yes, I am sure")]),
        Sample("one-image", [Turn(COLOUR_QUESTION, "red", [colour_image("red", (64, 48))])]),
    ]


def loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same(got: tuple, expected: tuple, what: str) -> None:
    (loss, grads), (expected_loss, expected_grads) = got, expected
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=TOLERANCE, msg=f"{what}: loss")
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=TOLERANCE, atol=TOLERANCE, msg=f"{what}: {name}")


def one_at_a_time(model, processor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The recipe's step over the samples: the mean of the per-sample losses and gradients."""
    results = [loss_and_grads(model, Phi3VTrainCollator(processor)([sample])) for sample in samples()]
    loss = sum(loss for loss, _ in results) / len(results)
    names = set().union(*(grads for _, grads in results))
    grads = {name: sum(g[name] for _, g in results if name in g) / len(results) for name in names}
    return loss, grads


def test_pack_rows_first_fit_longest_first():
    assert pack_rows([5, 3, 9, 2, 4], budget=10) == [[0, 4], [1, 3], [2]]
    assert pack_rows([12, 3], budget=10) == [[0], [1]]  # a longer sample takes a row alone
    assert pack_rows([3, 3, 3], budget=100) == [[0, 1, 2]]


def test_packed_rows_restart_positions_and_keep_each_sample_its_images(processor):
    batch_samples = samples()
    lengths = [len(ids) for ids in Phi3VTrainCollator(processor).encode(batch_samples)[0]]
    assert min(lengths) < ROPE_LIMIT < max(lengths)  # both sides of the su rope switch
    packed = PackedTrainCollator(processor, max_packed_tokens=max(lengths) + 50)(batch_samples)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] > 1  # several rows: one is padded
    assert samples_in_batch(packed["labels"], packed["position_ids"]) == len(batch_samples)
    padded = Phi3VTrainCollator(processor)(batch_samples)
    assert int((packed["labels"] != IGNORE_INDEX).sum()) == int((padded["labels"] != IGNORE_INDEX).sum())
    spans = (packed["input_ids"] < 0).sum().item()
    assert spans == (padded["input_ids"] < 0).sum().item() and len(packed["pixel_values"]) == 4


@pytest.fixture(scope="module")
def model_and_expected(short_rope_model_dir, processor):
    model = AutoModelForCausalLM.from_pretrained(short_rope_model_dir, attn_implementation="sdpa").train()
    return model, one_at_a_time(model, processor)


@pytest.mark.parametrize("layout", ["padded", "packed-one-row", "packed-rows", "packed-default"])
def test_batch_loss_and_gradients_equal_one_sample_at_a_time(model_and_expected, processor, layout):
    model, expected = model_and_expected
    collator = {
        "padded": Phi3VTrainCollator(processor),
        "packed-one-row": PackedTrainCollator(processor, max_packed_tokens=100_000),
        "packed-default": PackedTrainCollator(processor),
        "packed-rows": PackedTrainCollator(processor, max_packed_tokens=700),
    }[layout]
    assert_same(loss_and_grads(model, collator(samples())), expected, layout)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_lean_training_loss_equals_the_full_loss_and_gradients(short_rope_model_dir, processor, attn):
    model = AutoModelForCausalLM.from_pretrained(short_rope_model_dir, attn_implementation=attn)
    batch = PackedTrainCollator(processor, max_packed_tokens=700)(samples())
    lean = loss_and_grads(model.train(), batch)
    assert model(**batch).logits is None  # the head ran only where learnt
    full = loss_and_grads(model.eval(), batch)  # evaluation keeps the logits at every position
    assert_same(lean, full, f"lean vs full ({attn})")
