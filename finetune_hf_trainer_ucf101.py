"""Finetune Phi-3.5-vision on UCF-101 video classification: 8 frames per video, answer = class name.

Convert the videos first (see convert_ucf101.py), then train and evaluate on the converted folder:

    python convert_ucf101.py --out_dir /path/to/converted_ucf101
    torchrun --nproc_per_node=4 finetune_hf_trainer_ucf101.py --data_dir /path/to/converted_ucf101
    python finetune_hf_trainer_ucf101.py --data_dir /path/to/converted_ucf101 --use_lora   # one process

Data: the generic jsonl format — `ucf101_train.jsonl` for training, `ucf101_val.jsonl` for evaluation,
frames under `images/`. Each turn's message is its own frames' tags then its text:
`<|image_1|>...<|image_8|>\nClassify the video into one of the following classes: ...`, the class name as
answer (`{answer}<|end|>\n<|endoftext|>`). Training encodes turn by turn, each turn numbering its images
from 1; evaluation prompts hold the whole conversation up to the last question, with every turn's images.
Metric: accuracy of the generated class name (both sides stripped of whitespace and periods, lowercased);
the report lists `{"id", "answer"}` and `{"id", "generated_text"}`.
Frames are many images per sample, so num_crops defaults to 4 (Phi-3.5-vision's multi-frame setting).
"""

from common.arguments import build_parser
from common.cli import main_guard
from common.metrics import ACCURACY_BY_ID
from common.task import Task, run_task

# its data is conversations (common/formats: --data_dir, required below); flash attention turns bf16 on, as the
# recipe's script
TASK = Task("UCF-101", ACCURACY_BY_ID, flash_attention_implies_bf16=True)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = build_parser(__doc__, num_crops=4)
    args = parser.parse_args(argv)
    if not (args.data_dir or args.train_file or args.dataset_path):
        parser.error("--data_dir is required: the output folder of convert_ucf101.py (or other conversation data: "
                     "--train_file, or a chat-messages --dataset_path)")
    return run_task(TASK, args)


if __name__ == "__main__":
    main_guard(main)
