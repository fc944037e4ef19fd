"""Finetune Phi-3.5-vision on Hateful Memes: is a meme hateful? (yes / no)

    torchrun --nproc_per_node=4 finetune_hf_trainer_hateful_memes.py
    torchrun --nproc_per_node=8 --nnodes=<num_nodes> \\
      --master_addr=$MASTER_ADDR --master_port=$MASTER_PORT --node_rank=$NODE_RANK \\
      finetune_hf_trainer_hateful_memes.py --output_dir <output_dir> --batch_size 64 --use_flash_attention --bf16
    torchrun --nproc_per_node=2 finetune_hf_trainer_hateful_memes.py --output_dir <output_dir> \\
      --batch_size 64 --use_lora [--use_qlora]
    python finetune_hf_trainer_hateful_memes.py --dataset_path /data/hateful_memes   # offline copy, one process

Data: the `hateful_memes` subset of HuggingFaceM4/the_cauldron (one `train` split; its first --eval_size
rows, 500 by default, are held out for evaluation). Rows hold `images` (one meme) and `texts`
([{"user": question, "assistant": "yes" | "no"}]); --dataset_path takes the same schema from disk.
Prompt: `<|image_1|>\\n{question}` in the chat template; answer `{yes|no}<|end|>\\n<|endoftext|>`.
Metric: accuracy of the generated answer (stripped of whitespace and periods, lowercased).
"""

from common.arguments import build_parser, resolve_run_config
from common.cli import main_guard
from common.data import load_cauldron_splits
from common.finetune import Task, run_finetuning
from common.metrics import ACCURACY

TASK = Task(
    "Hateful Memes", ACCURACY, lambda data, _: load_cauldron_splits("hateful_memes", data.dataset_path, data.eval_size)
)


def main(argv: list[str] | None = None) -> dict[str, float]:
    return run_finetuning(TASK, resolve_run_config(build_parser(__doc__, num_crops=16).parse_args(argv)))


if __name__ == "__main__":
    main_guard(main)
