"""The Trainer of a preference run: the DPO loss of each micro-batch's pairs, and the reward metrics logged
with the loss under TRL's names.

An optimizer step's loss is the mean of its pairs' losses: each batch's pair losses are summed and divided
by the step's pairs on all processes (`get_batch_samples`), so a pair weighs the same whatever the
micro-batch size, gradient accumulation or number of processes. The metrics logged with the loss are means
over the pairs of all processes since the previous log.
"""

from __future__ import annotations

import torch

from ..trainer import FinetuningTrainer
from .loss import METRICS, PreferenceObjective, pair_losses, sequence_logps


def pairs_in_batch(batch: dict) -> int:
    return (int(batch["answer_sequence"].max()) + 1) // 2


class PreferenceTrainer(FinetuningTrainer):
    """`reference`: common/preference/reference.py's AdaptersDisabled, FrozenCopy or Precomputed."""

    def __init__(self, *args, objective: PreferenceObjective, reference, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.reference = reference
        self.metric_sums = dict.fromkeys(METRICS, 0.0)
        self.metric_pairs = 0

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        count = sum(pairs_in_batch(batch) for batch in batches)
        return batches, torch.tensor(sum(self.distributed.gather(count)), device=device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        normalized = self.objective.length_normalized
        reference = self.reference.logps(self.accelerator.unwrap_model(model), inputs, normalized)
        policy, tokens = sequence_logps(model, inputs, normalized)
        losses, metrics = pair_losses(policy, reference.to(policy.dtype), self.objective, tokens)
        if num_items_in_batch is None:
            loss = losses.mean()
        else:  # the processes' gradients are averaged: each contributes its pairs' share of the step's sum
            loss = losses.sum() / num_items_in_batch * self.accelerator.num_processes
        self.check_finite(model, loss)
        if model.training:
            for name in METRICS:
                self.metric_sums[name] += float(metrics[name].sum())
            self.metric_pairs += len(losses)
        return (loss, {"losses": losses, **metrics}) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log (every rank logs): the metrics of the pairs since the last one
            gathered = self.distributed.gather((self.metric_sums, self.metric_pairs))
            pairs = sum(count for _, count in gathered)
            if pairs:
                logs.update({name: sum(sums[name] for sums, _ in gathered) / pairs for name in METRICS})
            self.metric_sums, self.metric_pairs = dict.fromkeys(METRICS, 0.0), 0
        super().log(logs, *args, **kwargs)
