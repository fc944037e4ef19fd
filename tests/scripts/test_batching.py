"""A padded batch trains on exactly what its samples give one at a time: batching samples with two images,
one image and none (padded tokens, padded crops, images from different samples in one tensor) leaves the
loss unchanged. The model's loss is the recipe's: the mean over the batch's samples of each sample's mean token
loss, whatever their answer lengths."""

import torch
from transformers import AutoModelForCausalLM, AutoProcessor

from common.collators import IGNORE_INDEX, Phi3VTrainCollator
from common.data import Sample, Turn
from tests.scripts.e2e import COLOUR_QUESTION, colour_image


def loss_and_tokens(model, batch: dict) -> tuple[float, int]:
    with torch.no_grad():
        loss = model(**batch).loss
    return loss.double().item(), int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # labels shift by one


def test_padded_batch_loss_equals_the_mean_of_single_losses(tiny_model_dir):
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
    assert len({tokens for _, tokens in singles}) > 1  # answers of different lengths weigh the same
    mean = sum(loss for loss, _ in singles) / len(singles)
    assert abs(batch_loss - mean) < 1e-5, (batch_loss, mean, singles)
