"""`--packing`: padding-free training batches. A micro-batch's samples are concatenated into rows of at most
`--max_packed_tokens` tokens (by default as many as its longest sample) instead of each being padded to the
longest.

Each sample keeps its own positions (0, 1, 2, ...), which is all the model needs to keep samples apart: the
restart of the positions marks where a sample begins, so attention stays within each sample (a block-diagonal
mask with SDPA or eager attention, flash attention's variable-length kernel), the rotary scaling is chosen
from each sample's own length, and the loss gives every sample the weight it has alone. Rows are filled first
fit, longest sample first; a sample longer than the budget takes a row of its own, and rows shorter than the
longest are completed by a padding run that attends only to itself and is never learnt. Rows no longer than
the longest sample keep SDPA and eager attention, which compute the whole row's square under the block-diagonal
mask, at the cost of padded batches; flash attention lays all rows end to end and computes each sample's own
attention only, so a larger budget only changes how rows are cut. The micro-batches
themselves are those of padded training (the same samples, steps and resume points): an optimizer step still
consumes --batch_size samples.
"""

from __future__ import annotations

import torch

from .collators import IGNORE_INDEX, Phi3VTrainCollator
from .config import TrainingConfig
from .data import Sample


def pack_rows(lengths: list[int], budget: int) -> list[list[int]]:
    """Sample indices per row, each row at most `budget` tokens unless it holds one longer sample: first fit,
    longest first; rows and the samples within them in the order of their first sample."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = next((r for r, free in enumerate(room) if lengths[index] <= free), None)
        if row is None:
            rows.append([index])
            room.append(budget - lengths[index])
        else:
            rows[row].append(index)
            room[row] -= lengths[index]
    return sorted(sorted(row) for row in rows)


class PackedTrainCollator(Phi3VTrainCollator):
    """`Sample`s -> packed training batch: input_ids, labels and position_ids (R, L) for R rows of whole
    samples (no attention_mask: positions separate the samples), pixel_values / image_sizes of the images in
    row order, so that every image lands in its own sample's span."""

    def __init__(self, processor, max_length: int | None = None, max_packed_tokens: int | None = None):
        super().__init__(processor, max_length)
        self.max_packed_tokens = max_packed_tokens

    def rows(self, ids: list[list[int]]) -> list[list[int]]:
        lengths = [len(sample_ids) for sample_ids in ids]
        return pack_rows(lengths, self.max_packed_tokens or max(lengths))

    def __call__(self, samples: list[Sample]) -> dict:
        ids, labels, image_inputs = self.encode(samples)
        rows = self.rows(ids)
        batch = packed_rows(ids, {"labels": (labels, IGNORE_INDEX)}, rows, self.pad_token_id)
        if image_inputs is not None:
            order = _images_in_row_order(samples, [i for row in rows for i in row])
            batch["pixel_values"] = image_inputs["pixel_values"][order]
            batch["image_sizes"] = image_inputs["image_sizes"][order]
        return batch


def packed_rows(ids: list[list[int]], marks: dict[str, tuple[list[list[int]], int]], rows: list[list[int]],
                pad_token_id: int) -> dict[str, torch.Tensor]:
    """input_ids, position_ids and each of `marks` ({name: (per-sample values, padding value)}, labels say) as
    (R, L) tensors of the sequences `rows`, each row completed by a padding run."""
    width = max(sum(len(ids[i]) for i in row) for row in rows)
    columns = {"input_ids": [], "position_ids": [], **{name: [] for name in marks}}
    for row in rows:
        row_ids = [token for i in row for token in ids[i]]
        positions = [position for i in row for position in range(len(ids[i]))]
        padding = width - len(row_ids)
        columns["input_ids"].append(row_ids + [pad_token_id] * padding)
        columns["position_ids"].append(positions + list(range(padding)))
        for name, (values, fill) in marks.items():
            columns[name].append([value for i in row for value in values[i]] + [fill] * padding)
    return {name: torch.tensor(values, dtype=torch.long) for name, values in columns.items()}


def concatenate(ids: list[list[int]], labels: list[list[int]], row: list[int]):
    """The row of samples `row`: (input ids, labels, positions restarting at 0 for each sample)."""
    return (
        [token for i in row for token in ids[i]],
        [label for i in row for label in labels[i]],
        [position for i in row for position in range(len(ids[i]))],
    )


def pack_preview_records(collator: PackedTrainCollator, samples: list[Sample], batch_size_per_gpu: int) -> list[dict]:
    """--preview_samples with --packing: the packed rows of the first micro-batches (dataset order), one
    record per row: the micro-batch, its samples' ids, input_ids, labels and position_ids (no padding run)."""
    records = []
    for start in range(0, len(samples), batch_size_per_gpu):
        micro_batch = samples[start : start + batch_size_per_gpu]
        ids, labels, _ = collator.encode(micro_batch)
        for row in collator.rows(ids):
            row_ids, row_labels, positions = concatenate(ids, labels, row)
            records.append({"split": "train_pack", "micro_batch": start // batch_size_per_gpu,
                            "ids": [micro_batch[i].id for i in row], "input_ids": row_ids, "labels": row_labels,
                            "position_ids": positions})
    return records


def describe_pack(record: dict) -> str:
    return (f"micro-batch {record['micro_batch']}: packed row of {len(record['input_ids'])} tokens, samples "
            f"{', '.join(record['ids'])}")


def _images_in_row_order(samples: list[Sample], sample_order: list[int]) -> torch.Tensor:
    """Indices into the batch's images (in sample order) that put them in the order of `sample_order`."""
    first = [0]
    for sample in samples:
        first.append(first[-1] + len(sample.images))
    return torch.tensor([image for i in sample_order for image in range(first[i], first[i + 1])], dtype=torch.long)


def train_collator(processor, training: TrainingConfig) -> Phi3VTrainCollator:
    """The run's training collator: packed rows with --packing, padded samples otherwise."""
    if training.packing:
        return PackedTrainCollator(processor, training.max_length, training.max_packed_tokens)
    return Phi3VTrainCollator(processor, training.max_length)
