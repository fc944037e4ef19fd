"""Preference tuning (DPO) of Phi-3.5-vision on image preference pairs: a better and a worse answer to the same
image and question, learnt so that the better one becomes likelier relative to the starting model.

    python finetune_hf_trainer_dpo.py --train_file pairs.jsonl --use_lora --bf16 --output_dir runs/dpo-lora
    torchrun --nproc_per_node=4 finetune_hf_trainer_dpo.py --data_dir pairs/ --model_name_or_path runs/sft/merged \\
      --use_qlora --bf16 --output_dir runs/dpo-qlora
    torchrun --nproc_per_node=8 finetune_hf_trainer_dpo.py --data_dir pairs/ --bf16 --use_flash_attention \\
      --precompute_ref_log_probs --output_dir runs/dpo-full             # full finetuning under ZeRO-2
    torchrun --nproc_per_node=8 finetune_hf_trainer_dpo.py --dataset_path RLAIF-V-Dataset/ --freeze_vision_model \\
      --bf16 --output_dir runs/dpo-frozen                                # a frozen copy as the reference

Data (--train_file/--eval_file, --data_dir split by file name as for conversations, --dataset_path; each file in its own
format): TRL's preference records (`prompt`, `chosen`, `rejected`, `images`), LLaMA-Factory's sharegpt
preference records (`conversations`, `chosen`/`rejected` as {from, value}, `images`) or RLAIF-V's rows
(`question`, `chosen`, `rejected`, `image`); see docs/preference-tuning.md.
Prompt: the supervised prompt of the conversation up to its last question; each answer is learnt as
`{answer}<|end|>\\n<|endoftext|>`. The reference is the starting model (--model_name_or_path, which may be a
supervised run's output).
Metric: rewards/accuracies, the share of evaluation pairs whose chosen answer gains more reward than the
rejected one; eval_before.json / eval_after.json hold every reward metric.
"""

import argparse

from common.arguments import build_parser, check_flags
from common.cli import main_guard
from common.preference.flags import add_preference_flags, flag_problems


def dpo_parser() -> argparse.ArgumentParser:
    parser = build_parser(__doc__, num_crops=16, learning_rate=1e-6)  # TRL's DPO learning rate; LoRA: ~5e-5
    add_preference_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = dpo_parser().parse_args(argv)
    check_flags(args, flag_problems)
    from common.finetune import (
        run_script,  # torch, transformers, peft, DeepSpeed: only once the flags are good
    )
    from common.preference.objective import PREFERENCE_TASK

    return run_script(PREFERENCE_TASK, args)


if __name__ == "__main__":
    main_guard(main)
