"""Finetune Phi-3.5-vision on NLVR2: is a statement about a pair of images true? (two images per sample)

    torchrun --nproc_per_node=8 finetune_hf_trainer_nlvr2.py
    torchrun --nproc_per_node=4 finetune_hf_trainer_nlvr2.py --bf16 --use_flash_attention \\
      --batch_size 64 --output_dir <output_dir> --learning_rate <lr> --num_train_epochs <epochs>
    python finetune_hf_trainer_nlvr2.py --dataset_path /data/nlvr2 --use_lora   # offline copy, one process

Data: the `nlvr2` subset of HuggingFaceM4/the_cauldron (one `train` split; its first --eval_size rows,
500 by default, are held out for evaluation). Rows hold `images` (the left and right image) and `texts`
([{"user": statement + question, "assistant": answer}, ...]); --dataset_path takes the same schema from disk.
Training: every pair of a row, as one conversation — the first turn `<|image_1|><|image_2|>\\n{user}` with
both images, later turns `{user}` alone, each answer `{answer}<|end|>\\n<|endoftext|>`.
Evaluation: the first pair, `<|image_1|><|image_2|>\\n{user}`. Metric: accuracy of the generated answer
(both sides stripped of whitespace and periods, lowercased). num_crops defaults to 16, as the recipe.

Recipe results (4 GPUs, bf16, flash attention, batch 64): full finetuning lr 1e-5, 3 epochs: 89.40;
frozen vision lr 2e-5, 2 epochs: 89.20.
"""

import random

from common.arguments import build_parser
from common.cli import main_guard
from common.config import DataConfig
from common.data import THE_CAULDRON, Sample, Turn, first_images, load_cauldron_splits
from common.metrics import ACCURACY
from common.task import Task, run_task


def conversation(row, index: int, draws: random.Random) -> Sample:
    """Training: all of the row's pairs, the images with the first."""
    sample_id = f"nlvr2-{index}"
    pair = first_images(row, sample_id, 2, exact=True)
    turns = [Turn(text["user"], text["assistant"], pair if number == 0 else []) for number, text in enumerate(row["texts"])]
    return Sample(sample_id, turns, bare_text_turns=True)


def first_question(row, index: int, draws: random.Random) -> Sample:
    sample_id = f"nlvr2-{index}"
    text = row["texts"][0]
    return Sample(sample_id, [Turn(text["user"], text["assistant"], first_images(row, sample_id, 2, exact=True))])


def load_nlvr2(data: DataConfig, options: None):
    return load_cauldron_splits("nlvr2", data.dataset_path, data.eval_size, conversation, first_question)


TASK = Task("NLVR2", ACCURACY, load_nlvr2, flash_attention_implies_bf16=True,  # as the recipe's NLVR2 script
            hub_datasets=lambda options: (THE_CAULDRON,))


def main(argv: list[str] | None = None) -> dict[str, float]:
    return run_task(TASK, build_parser(__doc__, num_crops=16).parse_args(argv))


if __name__ == "__main__":
    main_guard(main)
