"""The flags of `predict.py --serve`, checked in one pass, and the frozen configuration the server gets."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # predict.py imports this module at start-up: no torch for --help
    from ..inference import ModelSource

API_KEY_VARIABLE = "PHI3V_API_KEY"  # the key without --api_key (not shown by `ps`, unlike a flag)
SERVE_ONLY_FLAGS = ("api_key", "allowed_local_media_path", "compare", "max_model_len")


@dataclass(frozen=True)
class ServingConfig:
    host: str
    port: int
    api_key: str | None  # None: no key asked for
    allowed_local_media_path: Path | None  # folder that file:// image URLs may point into; None: no local files
    compare: ModelSource | None  # a second model answering beside the first (chat page side by side)
    compare_name: str | None  # the second model's id, as given to --compare
    model_name: str  # the model's id in the API, as given to --model
    num_crops: int | None
    default_max_tokens: int  # a request without max_tokens gets this (--max_new_tokens)
    max_model_len: int | None  # prompt + answer tokens (None: the model's max_position_embeddings)
    max_images: int  # images per request, all messages together
    max_request_bytes: int


def add_serving_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("serving (--serve; docs/serving.md)")
    group.add_argument("--serve", action="store_true",
                       help="answer over HTTP: the OpenAI chat completions API under /v1 and a chat page at /")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    group.add_argument("--port", type=int, default=8000, help="port to listen on")
    group.add_argument("--api_key", help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_VARIABLE}, if set)")
    group.add_argument("--allowed_local_media_path", metavar="FOLDER",
                       help="requests may name images inside this folder as file:// URLs (default: none)")
    group.add_argument("--compare", metavar="BASE", help="a second model (e.g. the base model) that answers every "
                       "chat-page question beside --model; the API serves both")
    group.add_argument("--max_model_len", type=int, help="tokens of prompt (images included) plus answer "
                       "(default: the model's context length)")
    group.add_argument("--max_images", type=int, default=8, help="images per request, all messages together")
    group.add_argument("--max_request_mb", type=float, default=64, help="largest request body, in MiB")


def serving_problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with the serving flags (and, with --serve, with the one-shot flags given beside it)."""
    if not args.serve:
        given = [f"--{flag}" for flag in SERVE_ONLY_FLAGS if getattr(args, flag) is not None]
        return [f"only with --serve: {', '.join(given)}"] if given else []
    problems = []
    if args.prompt is not None or args.image or args.data_file is not None or args.output is not None:
        problems.append("--serve answers over HTTP: leave out --prompt, --image, --data_file and --output")
    if not 1 <= args.port <= 65535:
        problems.append(f"--port must be between 1 and 65535, got {args.port}")
    if args.allowed_local_media_path is not None and not Path(args.allowed_local_media_path).is_dir():
        problems.append(f"--allowed_local_media_path {args.allowed_local_media_path}: no such folder")
    if args.compare is not None and args.compare == args.model:
        problems.append("--compare names the same model as --model")
    if args.max_model_len is not None and args.max_model_len < 2:
        problems.append(f"--max_model_len must be at least 2, got {args.max_model_len}")
    if args.max_images < 0:
        problems.append(f"--max_images must be at least 0, got {args.max_images}")
    if not args.max_request_mb > 0:
        problems.append(f"--max_request_mb must be above 0, got {args.max_request_mb}")
    return problems


def serving_config(args: argparse.Namespace) -> ServingConfig:
    """The server's configuration from checked flags; a UserError names a --compare that holds no model."""
    from ..inference import locate_model

    folder = args.allowed_local_media_path
    return ServingConfig(
        host=args.host, port=args.port, api_key=args.api_key or os.environ.get(API_KEY_VARIABLE) or None,
        allowed_local_media_path=Path(folder).resolve() if folder else None,
        compare=locate_model(args.compare, flag="--compare") if args.compare else None, compare_name=args.compare,
        model_name=args.model, num_crops=args.num_crops, default_max_tokens=args.max_new_tokens,
        max_model_len=args.max_model_len, max_images=args.max_images,
        max_request_bytes=int(args.max_request_mb * 1024 * 1024),
    )
