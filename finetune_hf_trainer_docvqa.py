"""Finetune Phi-3.5-vision on DocVQA: answer a question about a scanned document; metric ANLS.

    torchrun --nproc_per_node=4 finetune_hf_trainer_docvqa.py                  # mini-train split
    torchrun --nproc_per_node=4 finetune_hf_trainer_docvqa.py --full_train \\
      --bf16 --use_flash_attention --batch_size 64 --output_dir <output_dir> \\
      --learning_rate <lr> --num_train_epochs <epochs>
    python finetune_hf_trainer_docvqa.py --dataset_path /data/docvqa_1200 --use_lora  # offline copy, one process
    python finetune_hf_trainer_docvqa.py --full_train --dataset_path /data/cauldron_docvqa \\
      --eval_dataset_path /data/docvqa_1200

Data: training on nielsr/docvqa_1200_examples `train` (1,000 rows: `image`, `query` {"en": question, ...},
`answers`: the accepted answers, one drawn at random every epoch), or with --full_train on the `docvqa`
subset of HuggingFaceM4/the_cauldron (`images`, `texts`: one question/answer pair drawn at random every
epoch). Evaluation always on nielsr/docvqa_1200_examples `test` (200 rows). --dataset_path takes the
training data's schema from disk (save_to_disk folder, or train*/test* parquet or jsonl files);
--eval_dataset_path the evaluation's, when it is another dataset (default: --dataset_path).
Prompt: `<|image_1|>\\n{question}\\nAnswer briefly.` (with --full_train, training uses `<|image_1|>\\n{question}`).
Metric: ANLS (the recipe's: predictions stripped of whitespace and periods, case kept, threshold 0.5, best
over the accepted answers); the DocVQA challenge's case-insensitive ANLS is reported beside it.
"""

import os
import random
from dataclasses import dataclass

from common.arguments import build_parser
from common.cli import main_guard
from common.config import DataConfig
from common.data import THE_CAULDRON, Sample, SampleDataset, Turn, base_dir_of, first_images, load_split
from common.errors import UserError
from common.metrics import ANLS
from common.task import Task, run_task

MINI = "nielsr/docvqa_1200_examples"
BRIEFLY = "\nAnswer briefly."


@dataclass(frozen=True)
class DocVQAOptions:
    full_train: bool  # --full_train: the_cauldron's docvqa subset instead of the mini-train split
    eval_dataset_path: str | None  # local copy of the evaluation dataset (default: --dataset_path)


def accepted_answers(row, sample_id: str) -> list[str]:
    if not row["answers"]:
        raise UserError(f"sample {sample_id}: no accepted answers")
    return list(row["answers"])


def mini_train_sample(row, index: int, draws: random.Random) -> Sample:
    sample_id = f"train-{index}"
    answer = draws.choice(accepted_answers(row, sample_id))
    return Sample(sample_id, [Turn(row["query"]["en"] + BRIEFLY, answer, [row["image"]])])


def cauldron_train_sample(row, index: int, draws: random.Random) -> Sample:
    sample_id = f"docvqa-{index}"
    text = draws.choice(row["texts"])
    return Sample(sample_id, [Turn(text["user"], text["assistant"], first_images(row, sample_id, 1))])


def eval_sample(row, index: int, draws: random.Random) -> Sample:
    sample_id = f"test-{index}"
    answers = accepted_answers(row, sample_id)
    return Sample(sample_id, [Turn(row["query"]["en"] + BRIEFLY, answers[0], [row["image"]])], references=answers)


def load_docvqa(data: DataConfig, options: DocVQAOptions) -> tuple[SampleDataset, SampleDataset]:
    eval_path = options.eval_dataset_path or data.dataset_path
    if eval_path and not os.path.exists(eval_path):
        raise UserError(f"--eval_dataset_path {eval_path} does not exist")
    if options.full_train:
        train_rows = load_split(THE_CAULDRON, "docvqa", "train", data.dataset_path)
        train = SampleDataset(train_rows, cauldron_train_sample, base_dir_of(data.dataset_path), data.seed)
    else:
        train_rows = load_split(MINI, None, "train", data.dataset_path)
        train = SampleDataset(train_rows, mini_train_sample, base_dir_of(data.dataset_path), data.seed)
    try:
        eval_rows = load_split(MINI, None, "test", eval_path)
    except UserError as error:
        raise UserError(f"{error}; evaluation reads the test split of {MINI} (--eval_dataset_path)") from None
    return train, SampleDataset(eval_rows, eval_sample, base_dir_of(eval_path))


def hub_datasets(options: DocVQAOptions) -> tuple[str, ...]:
    """The hub datasets of a run without local data; with a local evaluation copy the card names none."""
    if options.eval_dataset_path:
        return ()
    return (THE_CAULDRON, MINI) if options.full_train else (MINI,)


TASK = Task("DocVQA", ANLS, load_docvqa, DocVQAOptions, hub_datasets=hub_datasets)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = build_parser(__doc__, num_crops=16)
    parser.add_argument("--full_train", action="store_true",
                        help="train on the_cauldron's docvqa subset instead of the 1,000-row mini-train split")
    parser.add_argument("--eval_dataset_path", default=None,
                        help=f"local copy of {MINI} for evaluation (default: --dataset_path)")
    return run_task(TASK, parser.parse_args(argv))


if __name__ == "__main__":
    main_guard(main)
