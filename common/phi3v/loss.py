"""The training loss, the recipe's way and computed only where something is learnt.

The recipe trains one sample per micro-batch: an optimizer step's loss is the mean, over the step's samples,
of each sample's mean token loss. Here every sample of a padded or packed batch keeps that weight, whatever
its batch-mates: the loss of a batch is the sum of its samples' mean token losses divided by `num_samples`
(the step's samples on all processes, given by the Trainer; the batch's own samples otherwise).

In training only the positions whose next token is learnt go through the language-model head and the
cross-entropy (a few dozen of ~2,500 per DocVQA sample); the value and gradients are those of the full
computation, which evaluation keeps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .rotary import position_runs

IGNORE_INDEX = -100


def token_samples(labels: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """(B, L) index of the sample each token belongs to: a row of a padded batch, or one run of positions of
    a packed row (positions restart at 0 for each sample)."""
    if position_ids is None:
        rows = torch.arange(labels.shape[0], device=labels.device)
        return rows[:, None].expand_as(labels)
    return position_runs(position_ids.expand_as(labels))


def learnt_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: positions whose next token is learnt (the causal shift: position t predicts label t+1)."""
    learnt = torch.zeros_like(labels, dtype=torch.bool)
    learnt[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return learnt


def per_sample_mean_loss(
    logits: torch.Tensor, targets: torch.Tensor, samples: torch.Tensor, num_samples: torch.Tensor | int | None
) -> torch.Tensor:
    """logits (N, V) at learnt positions, their targets (N,) and sample index (N,) -> the sum of each sample's
    mean token loss, divided by `num_samples` (default: the samples present)."""
    token_loss = nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    _, sample = torch.unique(samples, return_inverse=True)
    count = int(sample.max()) + 1 if len(sample) else 0
    sums = token_loss.new_zeros(count).index_add(0, sample, token_loss)
    tokens = token_loss.new_zeros(count).index_add(0, sample, torch.ones_like(token_loss))
    divisor = count if num_samples is None else num_samples
    return (sums / tokens).sum() / divisor


def learnt_loss(
    hidden_states: torch.Tensor,
    lm_head: nn.Module,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None,
    num_samples: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """The loss from the decoder's last hidden states (B, L, H), with the head applied only where learnt."""
    return _loss_where_learnt(lambda learnt: lm_head(hidden_states[learnt]), labels, position_ids, num_samples)


def full_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None,
    num_samples: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """The same loss from logits at every position (B, L, V)."""
    return _loss_where_learnt(lambda learnt: logits[learnt], labels, position_ids, num_samples)


def _loss_where_learnt(logits_at: Callable[[torch.Tensor], torch.Tensor], labels, position_ids, num_samples):
    learnt = learnt_positions(labels)
    targets = labels[:, 1:][learnt[:, :-1]]
    return per_sample_mean_loss(logits_at(learnt), targets, token_samples(labels, position_ids)[learnt], num_samples)


def samples_in_batch(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> int:
    """How many samples of a padded or packed batch have a learnt token: the count `num_samples` adds up."""
    learnt = learnt_positions(labels)
    return len(torch.unique(token_samples(labels, position_ids)[learnt]))
