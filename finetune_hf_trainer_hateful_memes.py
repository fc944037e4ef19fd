"""Finetune Phi-3.5-vision on Hateful Memes: is a meme hateful? (yes / no)

    torchrun --nproc_per_node=4 finetune_hf_trainer_hateful_memes.py
    torchrun --nproc_per_node=8 --nnodes=<num_nodes> \\
      --master_addr=$MASTER_ADDR --master_port=$MASTER_PORT --node_rank=$NODE_RANK \\
      finetune_hf_trainer_hateful_memes.py --output_dir <output_dir> --batch_size 64 --use_flash_attention --bf16
    torchrun --nproc_per_node=2 finetune_hf_trainer_hateful_memes.py --output_dir <output_dir> \\
      --batch_size 64 --use_lora [--use_qlora]
    python finetune_hf_trainer_hateful_memes.py --dataset_path /data/hateful_memes   # offline copy, one process

Data: the `hateful_memes` subset of HuggingFaceM4/the_cauldron (one `train` split; its first --eval_size
rows, 500 by default, are held out for evaluation). Rows hold `images` (the meme first) and `texts`
([{"user": question, "assistant": "yes" | "no"}]); training and evaluation use the first pair.
--dataset_path takes the same schema from disk.
Prompt: `<|image_1|>\\n{question}` in the chat template; answer `{yes|no}<|end|>\\n<|endoftext|>`.
Metric: accuracy of the generated answer (both sides stripped of whitespace and periods, lowercased).
"""

import random

from common.arguments import build_parser
from common.cli import main_guard
from common.config import DataConfig
from common.data import THE_CAULDRON, Sample, Turn, first_images, load_cauldron_splits
from common.metrics import ACCURACY
from common.task import Task, run_task


def meme_sample(row, index: int, draws: random.Random) -> Sample:
    sample_id = f"hateful_memes-{index}"
    text = row["texts"][0]
    return Sample(sample_id, [Turn(text["user"], text["assistant"], first_images(row, sample_id, 1))])


def load_memes(data: DataConfig, options: None):
    return load_cauldron_splits("hateful_memes", data.dataset_path, data.eval_size, meme_sample, meme_sample)


TASK = Task("Hateful Memes", ACCURACY, load_memes, hub_datasets=lambda options: (THE_CAULDRON,))


def main(argv: list[str] | None = None) -> dict[str, float]:
    return run_task(TASK, build_parser(__doc__, num_crops=16).parse_args(argv))


if __name__ == "__main__":
    main_guard(main)
