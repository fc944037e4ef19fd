"""A padded batch trains on exactly what its samples give one at a time: batching samples with two images,
one image and none (padded tokens, padded crops, images from different samples in one tensor) leaves the
loss unchanged. The model's loss is the mean over all label tokens of the batch, so it is compared with
the per-sample losses weighted by their label-token counts."""

import torch
from transformers import AutoModelForCausalLM, AutoProcessor

from common.collators import IGNORE_INDEX, Phi3VTrainCollator
from common.data import Sample, Turn
from tests.scripts.e2e import COLOUR_QUESTION, colour_image


def loss_and_tokens(model, batch: dict) -> tuple[float, int]:
    with torch.no_grad():
        loss = model(**batch).loss
    return loss.double().item(), int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # labels shift by one


def test_padded_batch_loss_equals_token_weighted_single_losses(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir, num_crops=4)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    collator = Phi3VTrainCollator(processor)
    samples = [
        Sample("two-images", [Turn("Which colours are these, left to right?", "red and blue",
                                   [colour_image("red", (700, 300)), colour_image("blue", (200, 500))])]),
        Sample("one-image", [Turn(COLOUR_QUESTION, "green", [colour_image("green", (40, 40))]),
                             Turn("Are you sure? Answer yes or no.", "yes")]),
        Sample("no-image", [Turn("Name a colour.", "blue")]),
    ]

    batch = collator(samples)
    assert batch["pixel_values"].shape[0] == 3  # the batch's images, in sample order
    crops = [1 + int(h) // 336 * (int(w) // 336) for h, w in batch["image_sizes"].tolist()]
    assert len(set(crops)) > 1 and max(crops) == batch["pixel_values"].shape[1]  # crops are padded
    lengths = batch["attention_mask"].sum(dim=1)
    assert len(set(lengths.tolist())) == 3  # and so are the token sequences

    batch_loss, batch_tokens = loss_and_tokens(model, batch)
    singles = [loss_and_tokens(model, collator([sample])) for sample in samples]
    assert sum(tokens for _, tokens in singles) == batch_tokens
    weighted = sum(loss * tokens for loss, tokens in singles) / batch_tokens
    assert abs(batch_loss - weighted) < 1e-5, (batch_loss, weighted, singles)
