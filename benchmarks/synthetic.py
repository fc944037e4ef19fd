"""DocVQA-like synthetic data: the page images, the dataset, crop and token counts, and the data path's speed."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import torch

import common.phi3v  # noqa: F401  (registers phi3_v with the Auto classes)
from common.collators import ConversationEncoder, Phi3VTrainCollator
from common.data import Sample, SampleDataset, Turn
from common.phi3v.image_processing_phi3_v import CROP_SIZE, num_image_tokens, padded_image_size

# The recipe's average DocVQA sample at num_crops 16; the synthetic pages come close (about 2540 tokens).
RECIPE_TOKENS_PER_SAMPLE = 2443

QUESTIONS = [
    ("What is the date mentioned in this letter?", "March 15, 1985"),
    ("What is the total amount due?", "$1,234.56"),
    ("Who is the sender of this memo?", "J. R. Smith"),
    ("What is the title of the document?", "Quarterly Sales Report"),
    ("What is the invoice number?", "INV-20417"),
    ("Which company is mentioned in the header?", "Brown & Williamson"),
    ("What is the phone number given?", "(212) 555-0187"),
    ("How many units were shipped in total?", "1,250"),
    ("What is the name of the research project?", "Project Alpha"),
    ("To whom is the letter addressed?", "Dr. Elaine Carter"),
    ("What is the page number?", "14"),
    ("What percentage is shown for 1990?", "37%"),
]


def synthetic_page(seed: int, size: tuple[int, int] = (1700, 2200)):
    """A white letter-size page at 200 dpi with black text-like rectangles: a header, paragraphs, a table."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    width, height = size
    page = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(page)
    margin = width // 12
    y = margin
    # Header: a few large words.
    x = margin
    for _ in range(rng.randint(2, 4)):
        w = rng.randint(width // 12, width // 5)
        draw.rectangle([x, y, x + w, y + height // 60], fill="black")
        x += w + width // 40
    y += height // 20
    while y < height - margin:
        if rng.random() < 0.15:  # a small table
            rows, cols = rng.randint(3, 6), rng.randint(2, 5)
            cell_w, cell_h = (width - 2 * margin) // cols, height // 45
            for r in range(rows + 1):
                draw.line([margin, y + r * cell_h, width - margin, y + r * cell_h], fill="black", width=2)
            for c in range(cols + 1):
                draw.line([margin + c * cell_w, y, margin + c * cell_w, y + rows * cell_h], fill="black", width=2)
            for r in range(rows):
                for c in range(cols):
                    w = rng.randint(cell_w // 5, cell_w * 3 // 4)
                    x0, y0 = margin + c * cell_w + 8, y + r * cell_h + cell_h // 4
                    draw.rectangle([x0, y0, x0 + w, y0 + cell_h // 2], fill="black")
            y += rows * cell_h + height // 40
            continue
        for _ in range(rng.randint(3, 9)):  # a paragraph of text lines made of words
            line_height = rng.randint(14, 22)
            x = margin
            end = width - margin - rng.randint(0, width // 4)
            while x < end:
                w = rng.randint(20, 120)
                draw.rectangle([x, y, min(x + w, end), y + line_height], fill="black")
                x += w + rng.randint(10, 24)
            y += line_height + rng.randint(12, 20)
            if y >= height - margin:
                break
        y += height // 50
    return page


def write_pages(folder: Path, count: int, size: tuple[int, int], seed: int) -> None:
    folder.mkdir(parents=True)
    for index in range(count):
        synthetic_page(seed + index, size).save(folder / f"page_{index:03d}.png")


def _docvqa_sample(row: dict, index: int, draws: random.Random) -> Sample:
    return Sample(id=f"synthetic-{index}", turns=[Turn(row["question"], row["answer"], [row["image"]])])


def docvqa_dataset(pages: list[Path], size: int, seed: int = 0) -> SampleDataset:
    """`size` DocVQA-like samples cycling over the page files (decoded by the dataset, as the scripts' data)."""
    rng = random.Random(seed)
    rows = []
    for index in range(size):
        question, answer = QUESTIONS[rng.randrange(len(QUESTIONS))]
        rows.append({"image": str(pages[index % len(pages)]), "question": question, "answer": answer})
    return SampleDataset(rows, _docvqa_sample)


def image_layout(page_size: tuple[int, int], num_crops: int) -> tuple[int, int]:
    """(crops encoded by CLIP incl. the global view, image tokens) of one page at num_crops."""
    h, w = padded_image_size(*page_size, num_crops)
    return 1 + (h // CROP_SIZE) * (w // CROP_SIZE), num_image_tokens(h, w)


def sample_lengths(processor, dataset: SampleDataset, page_size: tuple[int, int], limit: int = 256) -> list[int]:
    """Token counts of the first `limit` samples from the text and the image size alone (no pixels)."""
    encoder = ConversationEncoder(processor)
    tokens_per_image = processor.calc_num_image_tokens_from_image_size(*page_size)
    lengths = []
    for index in range(min(limit, len(dataset))):
        sample = dataset.to_sample(dataset.rows[index], index, dataset.draws(index))
        ids, _ = encoder.encode_training(sample, [tokens_per_image] * len(sample.images))
        lengths.append(len(ids))
    return lengths


# ---- the data path on its own ----------------------------------------------------------------------------


def available_cores() -> int:
    """Cores this process may run on (its affinity: containers and taskset give fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def time_data_path(model_path: str, pages: list[Path], args, samples: int) -> dict:
    """Dataset item (PNG decode) + processor + collator, one process, one torch thread -> samples/s per core."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path, num_crops=args.num_crops)
    collator = Phi3VTrainCollator(processor, args.max_length)
    per_batch = args.batch_size_per_gpu
    dataset = docvqa_dataset(pages, samples + per_batch, seed=args.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        collator([dataset[i] for i in range(per_batch)])  # warm-up (imports, allocator)
        lengths, start = [], time.perf_counter()
        for first in range(per_batch, per_batch + samples, per_batch):
            batch = collator([dataset[i] for i in range(first, first + per_batch)])
            lengths += batch["attention_mask"].sum(dim=1).tolist()
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    per_core = len(lengths) / elapsed
    cores = available_cores()
    return {
        "samples_per_s_per_core": per_core,
        "seconds_per_sample": 1 / per_core,
        "cores": cores,
        "capacity_samples_per_s": per_core * cores,
        "samples_timed": len(lengths),
        "mean_tokens_per_sample": sum(lengths) / len(lengths),
        "num_crops": args.num_crops,
    }
