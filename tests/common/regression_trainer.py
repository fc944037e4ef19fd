"""A ResumableTrainer on a two-weight linear regression: the real Trainer save/resume/stop paths in a second,
without DeepSpeed or a process group (the end-to-end tests in tests/scripts cover those)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import TrainingArguments

from common.checkpoints import ResumableTrainer

NUM_SAMPLES = 8  # batches of 2: 4 optimizer steps per epoch


class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(2, 1)

    def forward(self, x, y):
        return {"loss": nn.functional.mse_loss(self.linear(x).squeeze(-1), y)}


def samples() -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(NUM_SAMPLES, 2, generator=generator)
    return [{"x": x[i], "y": x[i].sum() * 3 + 1} for i in range(NUM_SAMPLES)]


def regression_trainer(output_dir: Path, max_steps: int, save_steps: int = 0, keep: int | None = None,
                       callbacks=(), trainer_class=ResumableTrainer) -> ResumableTrainer:
    saving = {"save_strategy": "steps", "save_steps": save_steps} if save_steps else {"save_strategy": "no"}
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=0.1,
        lr_scheduler_type="linear", logging_steps=1, report_to="none", disable_tqdm=True, use_cpu=True,
        remove_unused_columns=False, seed=0, **saving,
    )
    return trainer_class(model=Regression(), args=args, train_dataset=samples(), keep_checkpoints=keep,
                         callbacks=list(callbacks))


def weights(trainer) -> torch.Tensor:
    return torch.cat([parameter.detach().flatten() for parameter in trainer.model.parameters()])
