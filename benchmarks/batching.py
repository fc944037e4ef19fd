"""`benchmark.py --batching`: padded vs packed micro-batches of the same samples, in this process.

Two sets: the DocVQA shape (synthetic pages, ~2,500 tokens each at num_crops 16) and a mixed-length set in the
proportions the recipe's tasks span — UCF-101-like clips (8 frames of 320x240, ~6,000 tokens at num_crops 16),
DocVQA pages and text-only turns. Every layout trains on the same micro-batches of --batch_size_per_gpu
samples (forward and backward through the scripts' model and collators; the optimizer step is the same for
all and left out): padded (the recipe's layout), padded with the language-model head at every position (the
loss before the lean one), packed, and packed without gradient checkpointing. --steps rounds, each timing
every layout once, after one warm-up micro-batch of each; the fastest round of each layout counts. Per row: tokens/s (real tokens,
padding excluded), the padding fraction of the rows computed, peak GPU memory (CUDA only), and the tokens/s
ratio to the padded row of the same set, from one run.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

from benchmarks.assets import prepare_assets
from benchmarks.synthetic import QUESTIONS
from common.collators import Phi3VTrainCollator
from common.data import Sample, Turn
from common.packing import PackedTrainCollator
from common.phi3v.loss import full_loss

GIB = 2**30
CLIP_FRAMES = 8
FRAME_SIZE = (320, 240)
LAYOUTS = {
    # name: (packed, lean loss, gradient checkpointing)
    "padded": (False, True, True),
    "padded, head at every position": (False, False, True),
    "packed": (True, True, True),
    "packed, no gradient checkpointing": (True, True, False),
}


def _frame(clip: int, index: int) -> Image.Image:
    """A moving disc on a plain background: a stand-in for a video frame."""
    from PIL import ImageDraw

    frame = Image.new("RGB", FRAME_SIZE, (40 + 30 * clip, 90, 120))
    x = 20 + index * (FRAME_SIZE[0] - 60) // CLIP_FRAMES
    ImageDraw.Draw(frame).ellipse([x, 100, x + 40, 140], fill=(230, 40, 40))
    return frame


def sample_sets(pages: list[Path], seed: int) -> dict[str, list[Sample]]:
    rng = random.Random(seed)
    page_images = [Image.open(page).convert("RGB") for page in pages]

    def page(index: int) -> Sample:
        question, answer = QUESTIONS[rng.randrange(len(QUESTIONS))]
        return Sample(f"page-{index}", [Turn(question, answer, [page_images[index % len(page_images)]])])

    def clip(index: int) -> Sample:
        frames = [_frame(index, i) for i in range(CLIP_FRAMES)]
        return Sample(f"clip-{index}", [Turn("Classify the video into one of the 101 UCF actions.", "Archery", frames)])

    def text(index: int) -> Sample:
        question, answer = QUESTIONS[rng.randrange(len(QUESTIONS))]
        return Sample(f"text-{index}", [Turn(f"Answer briefly. {question}", answer)])

    mixed = [clip(0), clip(1), page(0), page(1), page(2), text(0), text(1), text(2)]
    rng.shuffle(mixed)
    return {"DocVQA pages": [page(i) for i in range(8)], "mixed lengths": mixed}


def _set_checkpointing(model, on: bool) -> None:
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _loss(model, batch: dict, lean: bool) -> torch.Tensor:
    """The training loss; without `lean`, as before it: the head at every position, then the same reduction."""
    if lean:
        return model(**batch).loss
    logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits
    return full_loss(logits, batch["labels"], batch.get("position_ids"))


def _seconds(model, batches: list[dict], lean: bool, checkpointing: bool) -> float:
    _set_checkpointing(model, checkpointing)
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        _loss(model, batch, lean).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def _measure_set(model, processor, samples: list[Sample], per_gpu: int, max_packed_tokens, rounds: int) -> list[dict]:
    """Every layout on the same micro-batches; rounds interleave the layouts and the fastest round counts (a
    shared machine's load moves single timings)."""
    device = next(model.parameters()).device
    micro_batches = [samples[i : i + per_gpu] for i in range(0, len(samples), per_gpu)]
    real_tokens = sum(len(ids) for ids in Phi3VTrainCollator(processor).encode(samples)[0])
    collators = {False: Phi3VTrainCollator(processor), True: PackedTrainCollator(processor, None, max_packed_tokens)}
    batches = {packed: [{key: value.to(device) for key, value in collator(group).items()} for group in micro_batches]
               for packed, collator in collators.items()}
    for packed, lean, checkpointing in LAYOUTS.values():  # warm-up: one micro-batch of each layout
        with contextlib.suppress(torch.OutOfMemoryError):
            _seconds(model, batches[packed][:1], lean, checkpointing)
    rows = {layout: {"seconds": float("inf"), "peak_memory_gib": None} for layout in LAYOUTS}
    for _round in range(rounds):
        for layout, (packed, lean, checkpointing) in LAYOUTS.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                seconds = _seconds(model, batches[packed], lean, checkpointing)
            except torch.OutOfMemoryError:  # a row without checkpointing may not fit: reported, not fatal
                model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                rows[layout]["out_of_memory"] = True
                continue
            rows[layout]["seconds"] = min(rows[layout]["seconds"], seconds)
            if device.type == "cuda":
                rows[layout]["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    result = []
    for layout, (packed, _, _) in LAYOUTS.items():
        computed = sum(batch["input_ids"].numel() for batch in batches[packed])
        seconds = rows[layout]["seconds"]
        if rows[layout].get("out_of_memory"):
            result.append({"layout": layout, "tokens_per_s": None, "padding_fraction": 1 - real_tokens / computed,
                           "peak_memory_gib": None, "tokens": real_tokens, "seconds": None, "speedup": None,
                           "reason": "out of GPU memory"})
            continue
        result.append({"layout": layout, "tokens_per_s": real_tokens / seconds,
                       "padding_fraction": 1 - real_tokens / computed, "peak_memory_gib": rows[layout]["peak_memory_gib"],
                       "tokens": real_tokens, "seconds": seconds,
                       "speedup": rows["padded"]["seconds"] / seconds})
    return result


def run_batching(args) -> dict:
    model_path, pages = prepare_assets(args)
    processor = AutoProcessor.from_pretrained(model_path, num_crops=args.num_crops)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" and args.bf16 else torch.float32
    attention = "flash_attention_2" if args.use_flash_attention else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=attention).to(device)
    model.config.use_cache = False
    model.train()
    rows = []
    for set_name, samples in sample_sets(pages, args.seed).items():
        for row in _measure_set(model, processor, samples, args.batch_size_per_gpu, args.max_packed_tokens, args.steps):
            rows.append({"set": set_name, **row})
            print(json.dumps(rows[-1]), flush=True)
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU", "model": model_path,
            "attention": attention, "num_crops": args.num_crops, "batch_size_per_gpu": args.batch_size_per_gpu,
            "rounds": args.steps, "rows": rows}


def render_batching(report: dict) -> str:
    lines = [
        f"Padded vs packed micro-batches of {report['batch_size_per_gpu']} samples, num_crops {report['num_crops']}, "
        f"{report['device']}, {report['attention']}, forward + backward, fastest of {report['rounds']} interleaved rounds",
        "",
        "| set | layout | tokens/s | vs padded | padding | peak memory (GiB) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in report["rows"]:
        memory = f"{row['peak_memory_gib']:.2f}" if row["peak_memory_gib"] is not None else "n/a"
        speed = (f"{row['tokens_per_s']:.0f} | {row['speedup']:.2f}x" if row["tokens_per_s"] is not None
                 else f"{row['reason']} | -")
        lines.append(f"| {row['set']} | {row['layout']} | {speed} | {row['padding_fraction']:.1%} | {memory} |")
    return "\n".join(lines)
