"""Preference tuning as a run's objective (common/objective.py): what a preference run does where a supervised
run generates and learns answers.

- before training (`start`): dropout is switched off (as TRL does: the policy and the reference must compute
  the same function at the start), the reference is set up (common/preference/reference.py), with
  `--precompute_ref_log_probs` its log-probabilities computed or read back from the run;
- evaluation before, during and after training: the DPO loss and reward metrics of the evaluation pairs
  (`eval_before.json`, `eval_after.json`; `eval_rewards/...` in the log history during training), the headline
  score being `rewards/accuracies`;
- training: `PreferenceTrainer` on batches of pairs (common/preference/batches.py);
- `--preview_samples`: each pair's prompt, chosen and rejected token ids.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import writing
from ..collators import IGNORE_INDEX
from ..config import EvaluationConfig, RunConfig, TrainingConfig
from ..data import SampleDataset
from ..distributed import Distributed
from ..metrics import Metric
from ..model_loading import load_model, load_processor
from ..precision import Precision
from ..preview import describe, write_preview
from ..report.run import NoReport
from ..task import Task
from ..trainer import make_trainer
from .batches import PairCollator, PairEncoder
from .flags import flag_problems
from .loss import METRICS, PreferenceObjective, pair_losses, sequence_logps
from .reference import (
    STORED_FILE,
    AdaptersDisabled,
    FrozenCopy,
    Precomputed,
    by_id,
    pair_values,
    store_logps,
    stored_logps,
)
from .sources import load_preference_pairs
from .trainer import PreferenceTrainer

logger = logging.getLogger(__name__)

HEADLINE = "rewards/accuracies"
SPLITS = ("train", "evaluation")


def _scored_by_rewards(ids, predictions, references) -> dict:
    raise RuntimeError("a preference run is scored by its rewards (common/preference/objective.py), not by generating")


REWARD_ACCURACY = Metric(HEADLINE, _scored_by_rewards)


@dataclass(frozen=True)
class PreferenceOptions:
    """The flags of finetune_hf_trainer_dpo.py."""

    beta: float
    loss_type: str
    label_smoothing: float
    rpo_alpha: float | None
    precompute_ref_log_probs: bool
    max_prompt_length: int | None

    @property
    def objective(self) -> PreferenceObjective:
        return PreferenceObjective(self.beta, self.loss_type, self.label_smoothing, self.rpo_alpha)


def encoder(processor, options: PreferenceOptions, training: TrainingConfig) -> PairEncoder:
    return PairEncoder(processor, options.max_prompt_length, training.max_length)


class PreferenceTuning:
    """The objective a preference task names; `start` gives the run's `PreferenceRun`."""

    @staticmethod
    def run_report(output_dir, identity, metric, evaluation, distributed) -> NoReport:
        """No evaluation.html: the evaluations score rewards, they generate no answers to show."""
        return NoReport()

    def preview(self, config: RunConfig, train: SampleDataset, evaluation: SampleDataset, distributed: Distributed):
        """--preview_samples: each pair's prompt, chosen and rejected ids, as training builds them."""
        processor = load_processor(config.model)
        pairs = encoder(processor, config.task_options, config.training)
        records = []
        for split, dataset in (("train", train), ("eval", evaluation)):
            for index in range(min(config.preview_samples, len(dataset))):
                pair = dataset[index]
                (encoded,), _ = pairs.encode([pair])
                records.append({"split": split, "id": pair.id, "prompt_ids": encoded.prompt,
                                "chosen_ids": encoded.chosen, "rejected_ids": encoded.rejected})
        if distributed.is_main:
            path = write_preview(records, Path(config.outputs.output_dir))
            first = records[0]
            print(describe(processor.tokenizer, {
                "id": first["id"], "input_ids": first["prompt_ids"] + first["chosen_ids"],
                "labels": [IGNORE_INDEX] * len(first["prompt_ids"]) + first["chosen_ids"],
            }), flush=True)
            print(f"rejected: {json.dumps(processor.tokenizer.decode(first['rejected_ids']), ensure_ascii=False)}",
                  flush=True)
            print(f"{len(records)} preview records written to {path}", flush=True)

    def start(self, config: RunConfig, processor, model, train: SampleDataset, evaluation: SampleDataset,
              distributed: Distributed) -> PreferenceRun:
        options = config.task_options
        _without_dropout(model)
        if options.precompute_ref_log_probs:
            reference = Precomputed(_reference_logps(config, processor, model, {"train": train, "evaluation": evaluation},
                                                     distributed))
        elif config.strategy.lora:
            reference = AdaptersDisabled()
        else:
            logger.info("reference: a frozen copy of %s", config.model.name_or_path)
            reference = FrozenCopy(load_model(config.model.name_or_path, config.precision, distributed.device))
        return PreferenceRun(options, reference, config.training)


class PreferenceRun:
    """A preference run's objective once its model and reference are known."""

    def __init__(self, options: PreferenceOptions, reference, training: TrainingConfig):
        self.options = options
        self.objective = options.objective
        self.reference = reference
        self.training = training

    def collator(self, processor, split: str) -> PairCollator:
        stored = self.reference.precomputed[split] if self.reference.precomputed is not None else None
        return PairCollator(encoder(processor, self.options, self.training), self.training.packing,
                            self.training.max_packed_tokens, stored)

    def report(self, model, processor, dataset: SampleDataset, batch_size: int, num_workers: int,
               distributed: Distributed) -> dict:
        """The loss and reward metrics of the pairs (means), on every rank."""
        normalized = self.objective.length_normalized

        def values(batch: dict) -> torch.Tensor:
            policy, tokens = sequence_logps(model, batch, normalized)
            return torch.cat([policy, self.reference.logps(model, batch, normalized).to(policy.dtype), tokens], dim=1)

        rows = pair_values(model, self.collator(processor, "evaluation"), dataset, batch_size, num_workers,
                           distributed, values)
        table = torch.tensor([row for _, row in rows])
        losses, metrics = pair_losses(table[:, 0:2], table[:, 2:4], self.objective, table[:, 4:6])
        return {**{name: float(metrics[name].mean()) for name in METRICS}, "loss": float(losses.mean()),
                "pairs": len(rows)}

    def evaluate(self, model, processor, dataset: SampleDataset, metric: Metric, path: Path,
                 evaluation: EvaluationConfig, distributed: Distributed) -> dict:
        report = self.report(model, processor, dataset, evaluation.batch_size, evaluation.dataloader_num_workers,
                             distributed)
        if distributed.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(".json.tmp")
            temporary.write_text(json.dumps(report, indent=1))
            temporary.replace(path)
        return report

    def during_training(self, processor, dataset: SampleDataset, metric: Metric, evaluation: EvaluationConfig,
                        precision: Precision, distributed: Distributed):
        def evaluate(model) -> dict[str, float]:
            device = distributed.device
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), precision.autocast(device):
                report = self.report(model, processor, dataset, evaluation.batch_size,
                                     evaluation.dataloader_num_workers, distributed)
            return {f"eval_{name}": report[name] for name in (*METRICS, "loss")}

        return evaluate

    def make_trainer(self, model, processor, train_args, dataset: SampleDataset, training: TrainingConfig, **options):
        return make_trainer(model, processor, train_args, dataset, self.collator(processor, "train"),
                            trainer_class=PreferenceTrainer, objective=self.objective, reference=self.reference,
                            **options)


def _without_dropout(model: nn.Module) -> None:
    """Dropout off (LoRA dropout included): the policy must compute what the reference computes."""
    dropped = [module for module in model.modules() if isinstance(module, nn.Dropout) and module.p > 0]
    for module in dropped:
        module.p = 0.0
    if dropped:
        logger.info("dropout switched off in %d modules: the policy starts equal to the reference", len(dropped))


def _reference_logps(config: RunConfig, processor, model, datasets: dict[str, SampleDataset],
                     distributed: Distributed) -> dict:
    """Every pair's reference log-probabilities: read back when this run stored them, else computed with the
    starting model (before any training) and stored."""
    output_dir = Path(config.outputs.output_dir)
    options = config.task_options
    key = {"model": config.model.name_or_path, "num_crops": config.model.num_crops,
           "data": dataclasses.asdict(config.data), "pairs": {split: len(datasets[split]) for split in SPLITS},
           "max_prompt_length": options.max_prompt_length, "length_normalized": options.objective.length_normalized}
    stored = stored_logps(output_dir, key)
    if stored is not None:
        logger.info("reference log-probabilities read from %s (computed by this run before)", output_dir / STORED_FILE)
        return stored
    normalized = options.objective.length_normalized
    collate = PairCollator(encoder(processor, options, config.training), config.training.packing,
                           config.training.max_packed_tokens)
    logps = {}
    with config.precision.autocast(distributed.device):
        for split in SPLITS:
            rows = pair_values(model, collate, datasets[split], config.training.batch_size_per_gpu,
                               config.training.dataloader_num_workers, distributed,
                               lambda batch: sequence_logps(model, batch, normalized)[0])
            logps[split] = by_id(rows, split)
    if distributed.is_main:
        with writing("the reference log-probabilities", output_dir / STORED_FILE, output_dir):
            path = store_logps(output_dir, key, logps)
        logger.info("reference log-probabilities of %d pairs computed before training, stored in %s",
                    sum(map(len, logps.values())), path)
    distributed.barrier()
    return logps


def load_pairs(data, options: PreferenceOptions) -> tuple[SampleDataset, SampleDataset]:
    return load_preference_pairs(data)


PREFERENCE_TASK = Task("Preference tuning (DPO)", REWARD_ACCURACY, load_pairs, PreferenceOptions,
                       reads_conversations=False, objective=PreferenceTuning(), flag_problems=flag_problems)
