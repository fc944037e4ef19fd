"""common/preference/loss.py and batches.py: the DPO losses and metrics equal the published formulas, and a
batch's sequence log-probabilities equal a forward of each sequence alone, padded or packed, with each pair's
images encoded once."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoProcessor

from common.preference.batches import PairCollator, PairEncoder
from common.preference.loss import PreferenceObjective, pair_losses, sequence_logps
from common.preference.sources import read_preference_file
from tests.common.formats.same_conversations import write_images, write_jsonl
from tests.common.preference.same_pairs import FORMATS
from tests.common.preference.test_sources import opened

POLICY = [[-12.0, -15.5], [-30.25, -29.0], [-7.0, -7.0]]
REFERENCE = [[-13.0, -14.0], [-31.0, -30.5], [-7.5, -6.0]]
TOKENS = [[4.0, 6.0], [10.0, 9.0], [2.0, 2.0]]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def published(loss_type: str, h: float, beta: float, smoothing: float) -> float:
    """The papers' per-pair losses, written out in plain floats."""
    if loss_type == "sigmoid":
        return -(1 - smoothing) * log_sigmoid(beta * h) - smoothing * log_sigmoid(-beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return max(0.0, 1 - beta * h)
    return (-(1 - smoothing) * log_sigmoid(beta * h) + smoothing * log_sigmoid(-beta * h)) / (1 - 2 * smoothing)


@pytest.mark.parametrize(("loss_type", "smoothing", "rpo_alpha"), [
    ("sigmoid", 0.0, None), ("sigmoid", 0.2, None), ("ipo", 0.0, None), ("hinge", 0.0, None), ("robust", 0.1, None),
    ("sigmoid", 0.0, 0.5),
])
def test_losses_and_metrics_are_the_published_formulas(loss_type, smoothing, rpo_alpha):
    beta = 0.3
    objective = PreferenceObjective(beta, loss_type, smoothing, rpo_alpha)
    losses, metrics = pair_losses(torch.tensor(POLICY), torch.tensor(REFERENCE), objective, torch.tensor(TOKENS))
    for index, ((pc, pr), (rc, rr), (tc, _)) in enumerate(zip(POLICY, REFERENCE, TOKENS, strict=True)):
        h = (pc - rc) - (pr - rr)
        expected = published(loss_type, h, beta, smoothing) + (rpo_alpha * -pc / tc if rpo_alpha else 0.0)
        assert losses[index].item() == pytest.approx(expected, rel=1e-6)
        assert metrics["rewards/chosen"][index].item() == pytest.approx(beta * (pc - rc))
        assert metrics["rewards/rejected"][index].item() == pytest.approx(beta * (pr - rr))
        assert metrics["rewards/margins"][index].item() == pytest.approx(beta * h)
        assert metrics["rewards/accuracies"][index].item() == float(beta * (pc - rc) > beta * (pr - rr))
        assert (metrics["logps/chosen"][index].item(), metrics["logps/rejected"][index].item()) == (pc, pr)


def test_policy_equal_to_reference_costs_ln_2():
    losses, metrics = pair_losses(torch.tensor(POLICY), torch.tensor(POLICY), PreferenceObjective())
    assert torch.equal(losses, torch.full((3,), math.log(2), dtype=torch.float32))
    assert not metrics["rewards/accuracies"].any() and not metrics["rewards/margins"].any()


@pytest.fixture(scope="module")
def model_and_pairs(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    write_images(folder)
    pairs = [opened(pair) for pair in read_preference_file(write_jsonl(folder / "p.jsonl", FORMATS["trl_messages"]))]
    processor = AutoProcessor.from_pretrained(tiny_model_dir, num_crops=1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return processor, model, pairs


@pytest.fixture(scope="module")
def alone(model_and_pairs) -> list[list[float]]:
    """Per pair, [chosen, rejected]: a forward of each sequence alone, with its own images and every logit, the
    answer tokens' log-probabilities summed."""
    processor, model, pairs = model_and_pairs
    encoded, _ = PairEncoder(processor).encode(pairs)
    logps = []
    for pair, one in zip(pairs, encoded, strict=True):
        batch = PairCollator(PairEncoder(processor))([pair])
        images = {name: batch[name] for name in ("pixel_values", "image_sizes") if name in batch}
        logps.append([])
        for answer in (one.chosen, one.rejected):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([one.prompt + answer]), **images).logits[0].log_softmax(-1)
            logps[-1].append(sum(logits[len(one.prompt) + i - 1, token].item() for i, token in enumerate(answer)))
    return logps


@pytest.mark.parametrize("packing", [False, True])
def test_sequence_logps_equal_a_forward_of_each_sequence_alone(model_and_pairs, alone, packing):
    processor, model, pairs = model_and_pairs
    batch = PairCollator(PairEncoder(processor), packing=packing)(pairs)
    assert len(batch["pixel_values"]) == sum(len(pair.images) for pair in pairs)  # each image once
    assert len(batch["image_of_span"]) == 2 * len(batch["pixel_values"])  # in both sequences of its pair
    with torch.no_grad():
        logps, tokens = sequence_logps(model, batch)
    encoded, _ = PairEncoder(processor).encode(pairs)
    for index, one in enumerate(encoded):
        assert logps[index].tolist() == pytest.approx(alone[index], abs=1e-4)
        assert tokens[index].tolist() == [len(one.chosen), len(one.rejected)]
