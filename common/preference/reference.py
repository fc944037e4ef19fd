"""The reference model of DPO: what the policy's log-probabilities are compared with. It is the starting model,
and costs, besides the policy:

- LoRA / QLoRA: nothing: the same model with its adapters disabled (a second forward pass per batch);
- full and frozen-vision finetuning: a frozen copy of the starting model (its weights again, in the load
  dtype: 8.3 GB in bf16 for Phi-3.5-vision), or with `--precompute_ref_log_probs` nothing at all during
  training: every pair's reference log-probabilities are computed once before training (any strategy) and
  stored with the run (`reference_logps.json`), so that a resumed run reads them back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..data import SampleDataset
from ..distributed import Distributed
from ..errors import UserError
from .loss import sequence_logps

logger = logging.getLogger(__name__)

STORED_FILE = "reference_logps.json"
Logps = dict[str, tuple[float, float]]  # pair id -> (chosen, rejected)


class AdaptersDisabled:
    """LoRA/QLoRA: the base model under the policy's adapters."""

    precomputed: dict[str, Logps] | None = None

    @torch.no_grad()
    def logps(self, policy, batch: dict, length_normalized: bool) -> torch.Tensor:
        with policy.disable_adapter():
            return sequence_logps(policy, batch, length_normalized)[0]


class FrozenCopy:
    """Full finetuning: the starting model loaded a second time, never trained."""

    precomputed: dict[str, Logps] | None = None

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval().requires_grad_(False)
        self.model.config.use_cache = False

    @torch.no_grad()
    def logps(self, policy, batch: dict, length_normalized: bool) -> torch.Tensor:
        dtype = next(policy.parameters()).dtype  # DeepSpeed may have cast the policy (bf16): compute as it does
        if next(self.model.parameters()).dtype != dtype:
            self.model.to(dtype)
        return sequence_logps(self.model, batch, length_normalized)[0]


class Precomputed:
    """--precompute_ref_log_probs: every batch carries its pairs' reference log-probabilities (`precomputed`:
    split -> pair id -> values, which the collators attach)."""

    def __init__(self, precomputed: dict[str, Logps]):
        self.precomputed = precomputed

    def logps(self, policy, batch: dict, length_normalized: bool) -> torch.Tensor:
        return batch["reference_logps"]


@torch.no_grad()
def pair_values(model, collate: Callable, dataset: SampleDataset, batch_size: int, num_workers: int,
                distributed: Distributed, values: Callable[[dict], torch.Tensor]) -> list[tuple[str, list[float]]]:
    """(pair id, `values(batch)` of the pair) for every pair in dataset order, on every rank: each rank computes
    its shard (pairs rank, rank + world, ...)."""
    shard = list(range(distributed.rank, len(dataset), distributed.world_size))
    loader = DataLoader(dataset.subset(shard), batch_size=batch_size, num_workers=num_workers, shuffle=False,
                        collate_fn=lambda pairs: ([pair.id for pair in pairs], collate(pairs)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = []
    for ids, batch in loader:
        computed = values({name: value.to(device) for name, value in batch.items()})
        rows += zip(ids, computed.float().cpu().tolist(), strict=True)
    model.train(was_training)
    indexed = [(index, row) for part in distributed.gather(list(zip(shard, rows, strict=True))) for index, row in part]
    return [row for _, row in sorted(indexed, key=lambda item: item[0])]


def by_id(rows: list[tuple[str, list[float]]], split: str) -> Logps:
    """{pair id: (chosen, rejected)}; ids must be unique, as the stored values are kept by id."""
    logps = {pair_id: tuple(values) for pair_id, values in rows}
    if len(logps) != len(rows):
        ids = [pair_id for pair_id, _ in rows]
        repeated = sorted({pair_id for pair_id in ids if ids.count(pair_id) > 1})
        raise UserError(f"--precompute_ref_log_probs: the {split} pairs repeat the ids {repeated[:5]}; the stored "
                        "log-probabilities are kept by pair id: give every pair its own id")
    return logps


def stored_logps(output_dir: Path, key: dict) -> dict[str, Logps] | None:
    """What this run stored before (`key`: the starting model, the data and its pair counts, the objective's
    normalization), else None."""
    path = output_dir / STORED_FILE
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    if stored.get("key") != key:
        return None
    return {split: {pair_id: tuple(values) for pair_id, values in logps.items()}
            for split, logps in stored.items() if split != "key"}


def store_logps(output_dir: Path, key: dict, logps: dict[str, Logps]) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / STORED_FILE
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps({"key": key, **logps}))
    temporary.replace(path)
    return path
