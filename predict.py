"""Answer questions about images with a finetuned (or the official) Phi-3.5-vision model.

    python predict.py --model output/ --image page.png --prompt "What is the total amount?"
    python predict.py --model output/ --data_file data/docs_val.jsonl --output predictions.jsonl --metric anls
    torchrun --nproc_per_node=4 predict.py --model output/checkpoint-500 --data_file questions.jsonl --output answers.jsonl
    python predict.py --model output/ --serve --port 8000   # OpenAI-compatible API and a chat page (docs/serving.md)

--model: a run's --output_dir (full weights, or a LoRA/QLoRA adapter on the base model its config names;
--base_model overrides), a checkpoint-N/ or merged/ folder, an official model folder or a hub id.
--data_file: a conversation file in any of the training formats (docs/data.md), the last question's answer
optional; a conversation is asked as the evaluation asks it. Writes {"id", "prediction", "reference"} per line in input
order, and prints the metric over the samples that have a reference. Beside --output it writes the evaluation
report of the answers (answers.jsonl -> answers.html; docs/evaluation-report.md). Run with the training run's
--bf16 / --fp16 / --dtype / --use_flash_attention to get its evaluation's answers exactly.
"""

import argparse
import logging
from pathlib import Path

from common.arguments import add_precision_flags
from common.cli import main_guard
from common.errors import UsageError
from common.metrics import METRICS
from common.serving.options import add_serving_flags, serving_config, serving_problems

logger = logging.getLogger("predict")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="run output folder, checkpoint-N/, merged/, model folder or hub id")
    parser.add_argument("--base_model", help="base model of a LoRA adapter (default: the one its config names)")
    parser.add_argument("--prompt", help="one question; its images come from --image, in order")
    parser.add_argument("--image", action="append", default=[], help="an image of --prompt (repeat for several)")
    parser.add_argument("--data_file", help="conversation file (generic jsonl, LLaVA JSON or chat messages)")
    parser.add_argument("--image_folder", help="folder of --data_file's relative image paths (default: the file's "
                        "folder, then its images/)")
    parser.add_argument("--output", help="where --data_file's answers go (jsonl)")
    parser.add_argument("--metric", choices=sorted(METRICS), default="accuracy", help="score of --data_file's answers")
    parser.add_argument("--num_crops", type=int, help="maximum crops per image (default: the model's saved processor)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="answer length limit in tokens")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per generation batch and process")
    add_precision_flags(parser)
    parser.add_argument("--use_flash_attention", action="store_true", help="flash_attention_2 (needs --bf16)")
    parser.add_argument("--no-tqdm", dest="tqdm", action="store_false", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="also show the libraries' log lines")
    add_serving_flags(parser)
    return parser


def usage_problems(args: argparse.Namespace) -> list[str]:
    problems = serving_problems(args)
    if not args.serve and (args.prompt is None) == (args.data_file is None):
        problems.append("give either --prompt (with its --image files) or --data_file")
    if args.data_file is not None and (args.image or not args.output):
        problems.append("--data_file takes --output (where the answers go), not --image")
    if args.prompt is not None and (args.output or args.image_folder):
        problems.append("--output and --image_folder go with --data_file; --prompt prints its answer")
    if args.num_crops is not None and not 1 <= args.num_crops <= 16:
        problems.append(f"--num_crops must be between 1 and 16, got {args.num_crops}")
    problems += [f"--{flag} must be at least 1, got {getattr(args, flag)}"
                 for flag in ("max_new_tokens", "batch_size") if getattr(args, flag) < 1]
    return problems


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    if problems := usage_problems(args):
        raise UsageError("invalid arguments:\n  " + "\n  ".join(problems))
    return predict(args)


def predict(args: argparse.Namespace):
    """The answers to checked flags; torch, transformers and peft load here (CONTRIBUTING.md, Commands)."""
    from common.distributed import Distributed
    from common.inference import (
        answer,
        file_dataset,
        load_for_inference,
        locate_model,
        prompt_dataset,
        score,
        write_answers,
    )
    from common.logging_setup import setup_logging
    from common.precision import resolve_precision
    from common.report.run import write_prediction_report

    distributed = Distributed.launched()
    setup_logging(distributed, args.verbose)
    precision = resolve_precision(args.bf16, args.use_flash_attention, local_rank=distributed.local_rank,
                                  fp16=args.fp16, dtype=args.dtype)
    source = locate_model(args.model, args.base_model)
    if args.serve:
        from common.serving.app import serve  # the web stack loads only to serve

        return serve(serving_config(args), source, precision, distributed)
    dataset = prompt_dataset(args.prompt, args.image) if args.prompt is not None else file_dataset(
        args.data_file, args.image_folder)
    distributed = distributed.started(uses_deepspeed=False)
    logger.info("model: %s, %d prompt(s) on %d process(es), %s", source.describe(), len(dataset),
                distributed.world_size, precision.describe())
    processor, model = load_for_inference(source, precision, distributed.device, args.num_crops)
    answers = answer(model, processor, dataset, args.batch_size, args.max_new_tokens, args.tqdm, distributed, precision)
    distributed.finished()
    if not distributed.is_main:
        return answers
    if args.prompt is not None:
        print(answers[0].prediction, flush=True)
        return answers
    write_answers(answers, Path(args.output))
    logger.info("%d answers written to %s", len(answers), args.output)
    if (value := score(answers, METRICS[args.metric])) is not None:
        scored = sum(item.reference is not None for item in answers)
        print(f"{args.metric.upper()}: {value:.4f} ({scored} samples with a reference)", flush=True)
    report = write_prediction_report(Path(args.output), dataset, answers, METRICS[args.metric], value,
                                     {"model": source.describe(), "data": args.data_file})
    logger.info("evaluation report: %s", report)
    return answers


if __name__ == "__main__":
    main_guard(main)
