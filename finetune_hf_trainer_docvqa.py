"""Finetune Phi-3.5-vision on DocVQA: answer a question about a scanned document; metric ANLS.

    torchrun --nproc_per_node=4 finetune_hf_trainer_docvqa.py                  # mini-train split
    torchrun --nproc_per_node=4 finetune_hf_trainer_docvqa.py --full_train \\
      --bf16 --use_flash_attention --batch_size 64 --output_dir <output_dir> \\
      --learning_rate <lr> --num_train_epochs <epochs>
    python finetune_hf_trainer_docvqa.py --dataset_path /data/docvqa --use_lora  # offline copy, one process

Data: HuggingFaceM4/DocumentVQA — rows with `image`, `question` and `answers` (all accepted answers).
Training uses the `train` split (without --full_train only its first 1%, the mini-train split) with one
of the accepted answers per question (a fixed choice per question and seed); evaluation uses the
`validation` split. --dataset_path takes the same schema from disk (save_to_disk folder with both splits,
or train*/validation* parquet or jsonl files). Prompt: `<|image_1|>\\n{question}` in the chat template.
Metric: ANLS (average normalised Levenshtein similarity, threshold 0.5, best over all answers).
"""

import random
from dataclasses import dataclass
from functools import partial

from common.arguments import build_parser, resolve_run_config
from common.cli import main_guard
from common.config import DataConfig
from common.data import Sample, SampleDataset, Turn, base_dir_of, load_split
from common.finetune import Task, run_finetuning
from common.metrics import ANLS

MINI_TRAIN_FRACTION = 0.01


@dataclass(frozen=True)
class DocVQAOptions:
    full_train: bool  # --full_train: the whole train split instead of the mini-train split


def train_sample(seed: int, row, index: int) -> Sample:
    # The recipe draws a random accepted answer; seeding by question keeps runs (and resumes) reproducible.
    answer = random.Random(f"{seed}-{index}").choice(row["answers"])
    return Sample(id=f"train-{index}", turns=[Turn(row["question"], answer, [row["image"]])])


def eval_sample(row, index: int) -> Sample:
    return Sample(
        id=f"validation-{index}", turns=[Turn(row["question"], row["answers"][0], [row["image"]])],
        references=list(row["answers"]),
    )


def load_docvqa(data: DataConfig, options: DocVQAOptions) -> tuple[SampleDataset, SampleDataset]:
    train_rows = load_split("HuggingFaceM4/DocumentVQA", None, "train", data.dataset_path)
    eval_rows = load_split("HuggingFaceM4/DocumentVQA", None, "validation", data.dataset_path)
    if not options.full_train:
        train_rows = train_rows.select(range(max(1, round(len(train_rows) * MINI_TRAIN_FRACTION))))
    base_dir = base_dir_of(data.dataset_path)
    return (
        SampleDataset(train_rows, partial(train_sample, data.seed), base_dir),
        SampleDataset(eval_rows, eval_sample, base_dir),
    )


TASK = Task("DocVQA", ANLS, load_docvqa, DocVQAOptions)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = build_parser(__doc__, num_crops=16)
    parser.add_argument("--full_train", action="store_true", help="train on the full train split (default: 1%%)")
    return run_finetuning(TASK, resolve_run_config(parser.parse_args(argv), TASK.options))


if __name__ == "__main__":
    main_guard(main)
