"""`--preview_samples N`: the first N training samples and evaluation prompts exactly as a run would build
them, written to OUTPUT_DIR/data_preview.jsonl without loading model weights.

One JSON object per line: `{"split": "train", "id", "input_ids", "labels"}` for training samples (epoch 0's
random draws, dataset order) and `{"split": "eval", "id", "input_ids"}` for evaluation prompts; with
--packing also `{"split": "train_pack", "micro_batch", "ids", "input_ids", "labels", "position_ids"}` per
packed row of the first micro-batches. Image spans
are the processor's placeholder ids (`-N` for a turn's image N). Users check their own data with it; the
recipe's scripts give the same ids for the same rows.
"""

from __future__ import annotations

import json
from itertools import groupby
from pathlib import Path

from .collators import IGNORE_INDEX, ConversationEncoder
from .config import RunConfig
from .data import SampleDataset
from .distributed import Distributed
from .model_loading import load_processor
from .packing import describe_pack, pack_preview_records, train_collator

PREVIEW_FILE = "data_preview.jsonl"


def run_preview(config: RunConfig, train: SampleDataset, evaluation: SampleDataset, distributed: Distributed) -> None:
    """--preview_samples: the samples as training and evaluation would build them; no weights, no training."""
    processor = load_processor(config.model)
    records = preview_records(processor, train, evaluation, config.preview_samples)
    if config.training.packing:
        first = [train[index] for index in range(min(config.preview_samples, len(train)))]
        records += pack_preview_records(train_collator(processor, config.training), first,
                                        config.training.batch_size_per_gpu)
    if distributed.is_main:
        path = write_preview(records, Path(config.outputs.output_dir))
        print(describe(processor.tokenizer, records[0]), flush=True)
        for record in records:
            if record["split"] == "train_pack":
                print(describe_pack(record), flush=True)
        print(f"{len(records)} preview records written to {path}", flush=True)


def preview_records(processor, train: SampleDataset, evaluation: SampleDataset, count: int) -> list[dict]:
    encoder = ConversationEncoder(processor)
    records = []
    for index in range(min(count, len(train))):
        sample = train[index]
        (input_ids,), (labels,), _ = encoder.encode_batch([sample], training=True)
        records.append({"split": "train", "id": sample.id, "input_ids": input_ids, "labels": labels})
    for index in range(min(count, len(evaluation))):
        sample = evaluation[index]
        (input_ids,), _, _ = encoder.encode_batch([sample], training=False)
        records.append({"split": "eval", "id": sample.id, "input_ids": input_ids})
    return records


def write_preview(records: list[dict], output_dir: Path) -> Path:
    """Write the records as jsonl (replacing a previous preview whole); returns the file."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / PREVIEW_FILE
    temporary = path.with_suffix(".jsonl.tmp")
    temporary.write_text("".join(json.dumps(record) + "\n" for record in records))
    temporary.replace(path)
    return path


def _readable(tokenizer, input_ids: list[int]) -> str:
    """Decoded ids, special tokens shown, each image span collapsed to `[image N: K tokens]`."""
    parts = []
    for is_image, run in groupby(input_ids, key=lambda token: token < 0):
        run = list(run)
        if is_image:
            parts += [f"[image {-tag}: {len(list(span))} tokens]" for tag, span in groupby(run)]
        else:
            parts.append(tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False))
    return "".join(parts)


def describe(tokenizer, record: dict) -> str:
    """A readable view of one training record: the whole sequence, then each learnt (labelled) stretch."""
    targets = [
        _readable(tokenizer, [label for _, label in run])
        for learnt, run in groupby(zip(record["input_ids"], record["labels"], strict=True), key=lambda pair: pair[1] != IGNORE_INDEX)
        if learnt
    ]
    lines = [f"sample {record['id']} ({len(record['input_ids'])} tokens):", _readable(tokenizer, record["input_ids"]),
             "learnt targets:"]
    lines += [f"  {json.dumps(target, ensure_ascii=False)}" for target in targets]
    return "\n".join(lines)
