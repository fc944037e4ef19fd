"""Sequence log-probabilities of a batch of pairs, and the DPO objective on them.

A sequence's log-probability is the sum, over its answer tokens, of the token's log-probability given what
precedes it (for `ipo`, the mean over the answer's tokens, as TRL computes it). Only the positions that predict
an answer token go through the language-model head. Every pair's loss is its own (padding, packing and
batch-mates change nothing: common/phi3v/rotary.py, common/packing.py); a batch's loss is the sum of its
pairs' losses divided by the step's pairs (`PreferenceTrainer.get_batch_samples`).

With h = (policy chosen - reference chosen) - (policy rejected - reference rejected), beta and the label
smoothing e (published formulas, TRL's names):
    sigmoid (DPO, Rafailov et al. 2023; cDPO with e > 0):  -(1 - e) log s(beta h) - e log s(-beta h)
    ipo (Azar et al. 2023):                                (h - 1 / (2 beta))^2
    hinge (SLiC, Zhao et al. 2023):                        max(0, 1 - beta h)
    robust (rDPO, Chowdhury et al. 2024):                  (-(1 - e) log s(beta h) + e log s(-beta h)) / (1 - 2e)
`--rpo_alpha` a adds a times the chosen answer's mean token negative log-likelihood (RPO, Pang et al. 2024).
Rewards: beta (policy - reference) of each answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_sizes", "image_of_span")
# The metrics users know from TRL, in the order they are logged
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


@dataclass(frozen=True)
class PreferenceObjective:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float | None = None

    @property
    def length_normalized(self) -> bool:
        """IPO compares mean token log-probabilities (TRL's choice, after the IPO authors)."""
        return self.loss_type == "ipo"


def sequence_logps(model, batch: dict, length_normalized: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities (P, 2), answer tokens (P, 2)) of each pair's chosen and rejected sequence."""
    answer = batch["answer_sequence"]
    predicts = torch.zeros_like(answer, dtype=torch.bool)
    predicts[:, :-1] = answer[:, 1:] >= 0  # position t predicts token t + 1
    inputs = {name: batch[name] for name in MODEL_INPUTS if name in batch}
    logits = model(**inputs, logits_to_keep=predicts).logits  # (tokens predicted, vocabulary)
    targets = batch["input_ids"][:, 1:][predicts[:, :-1]]
    sequences = answer[:, 1:][predicts[:, :-1]]
    token_logps = logits.float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    count = int(answer.max()) + 1
    sums = token_logps.new_zeros(count).index_add(0, sequences, token_logps)
    tokens = token_logps.new_zeros(count).index_add(0, sequences, torch.ones_like(token_logps))
    if length_normalized:
        sums = sums / tokens
    return sums.view(-1, 2), tokens.view(-1, 2)


def pair_losses(policy: torch.Tensor, reference: torch.Tensor, objective: PreferenceObjective,
                tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """policy and reference log-probabilities (P, 2) [chosen, rejected] -> (loss per pair (P,), the metrics per
    pair {name: (P,)}). `tokens` (P, 2): the answers' token counts, for --rpo_alpha."""
    beta, smoothing = objective.beta, objective.label_smoothing
    h = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
    if objective.loss_type == "sigmoid":
        losses = -(1 - smoothing) * functional.logsigmoid(beta * h) - smoothing * functional.logsigmoid(-beta * h)
    elif objective.loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif objective.loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif objective.loss_type == "robust":
        losses = (-(1 - smoothing) * functional.logsigmoid(beta * h)
                  + smoothing * functional.logsigmoid(-beta * h)) / (1 - 2 * smoothing)
    else:
        raise ValueError(f"unknown loss type {objective.loss_type!r}")
    if objective.rpo_alpha is not None:
        losses = losses + objective.rpo_alpha * (-policy[:, 0] / (1 if objective.length_normalized else tokens[:, 0]))
    rewards = beta * (policy - reference).detach()
    metrics = {
        "rewards/chosen": rewards[:, 0],
        "rewards/rejected": rewards[:, 1],
        "rewards/accuracies": (rewards[:, 0] > rewards[:, 1]).float(),
        "rewards/margins": rewards[:, 0] - rewards[:, 1],
        "logps/chosen": policy[:, 0].detach(),
        "logps/rejected": policy[:, 1].detach(),
    }
    return losses, metrics
