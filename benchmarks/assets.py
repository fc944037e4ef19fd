"""The page images and the model folder, written once into the cache and shared by every configuration."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import time
from pathlib import Path

import torch

from benchmarks.synthetic import write_pages


def _publish(final: Path, write) -> Path:
    """Write into a private temporary folder, then rename it into place (safe against concurrent writers)."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.{socket.gethostname()}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    write(staging)
    try:
        staging.rename(final)
    except OSError:  # someone else published first
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _wait_for(path: Path, timeout_s: float = 3600) -> Path:
    """Poll until another process has published `path` (local rank 0 writes, the other ranks wait)."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s:.0f} s (written by local rank 0)")
        time.sleep(2)
    return path


def write_random_init(folder: Path, config_path: Path, num_crops: int, layers: int | None = None) -> None:
    """The full-size model from `config_path` with random bf16 weights, plus a processor (the tiny byte-level
    tokenizer: its ids fit in the 32064-entry vocabulary), as an official-format folder."""
    from common.phi3v import Phi3VConfig, Phi3VForCausalLM, Phi3VImageProcessor, Phi3VProcessor
    from common.tiny_model import build_tokenizer

    config = Phi3VConfig.from_json_file(str(config_path))
    if layers is not None:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Phi3VForCausalLM._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.save_pretrained(folder)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    Phi3VProcessor(image_processor=Phi3VImageProcessor(num_crops=num_crops), tokenizer=build_tokenizer()).save_pretrained(
        folder
    )


def asset_paths(args) -> tuple[Path, Path | None]:
    """(folder of the page images, model folder or None for --model_name_or_path) in the cache."""
    cache = Path(args.cache_dir).expanduser()
    width, height = args.page_size
    pages_dir = cache / f"pages_{width}x{height}_n{args.num_pages}_seed{args.seed}"
    if args.tiny:
        return pages_dir, cache / "tiny_phi3v"
    if args.random_init:
        # A new folder whenever the config or the depth changes, never a stale model.
        config_bytes = Path(args.model_config).read_bytes() + str(args.random_init_layers).encode()
        return pages_dir, cache / f"random_init_{hashlib.sha1(config_bytes).hexdigest()[:12]}"
    return pages_dir, None


def prepare_assets(args, wait_only: bool = False) -> tuple[str, list[Path]]:
    """(model folder or hub id, page files); written on first use. With `wait_only`, wait for another process."""
    pages_dir, model_dir = asset_paths(args)
    if wait_only:
        _wait_for(pages_dir)
        if model_dir is not None:
            _wait_for(model_dir)
    else:
        _publish(pages_dir, lambda d: write_pages(d, args.num_pages, args.page_size, args.seed))
        if args.tiny:
            from common.tiny_model import write_tiny_phi3v

            _publish(model_dir, lambda d: write_tiny_phi3v(d, seed=0, num_crops=args.num_crops))
        elif args.random_init and not model_dir.exists():
            print(f"writing a random-init model from {args.model_config} to {model_dir} (once)", flush=True)
            _publish(model_dir, lambda d: write_random_init(d, Path(args.model_config), args.num_crops,
                                                            args.random_init_layers))
    pages = sorted(pages_dir.glob("page_*.png"))
    return (str(model_dir) if model_dir is not None else args.model_name_or_path), pages
