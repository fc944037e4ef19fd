"""Training throughput and peak GPU memory of Phi-3.5-vision finetuning, per strategy, with and without flash attention.

Each configuration (strategy x flash attention) runs in a fresh process through the scripts' own code path:
the shared flags (`common.arguments.build_parser`, so every script flag works here too), `TrainingStrategy`
/ `build_model`, `training_arguments` (Trainer, DeepSpeed ZeRO-2 for full and frozen-vision finetuning,
DDP for LoRA/QLoRA) and `Phi3VTrainCollator`, on DocVQA-like synthetic documents (a 1700x2200 page of
black text-like rectangles, a question, a short answer) at num_crops 16 (about 2540 tokens per sample; the
recipe's DocVQA average is 2443). The Trainer runs --warmup_steps untimed optimizer steps, then --steps
timed ones; a callback times the window between them (the only CUDA synchronisations it adds).

    # one node with 8 GPUs (the launcher starts `torchrun --nproc_per_node 8` for every configuration)
    python benchmark.py --random_init --nproc_per_node 8 --strategies full,frozen,lora,qlora --flash both
    # one GPU
    python benchmark.py --random_init --strategies full,frozen,lora,qlora --flash both
    # CPU smoke test with the tiny model (the tests run this with --flash both: flash rows give their reason)
    OMP_NUM_THREADS=1 python benchmark.py --tiny --num_crops 1 --batch_size 1 --dataloader_num_workers 0 \
        --strategies full,lora --flash off --steps 2 --warmup_steps 1
    # one configuration under your own launcher, then the report from all rows in --output_dir
    torchrun --nproc_per_node 8 benchmark.py --worker --random_init --strategies lora --flash on
    python benchmark.py --collect --random_init

--random_init writes a random bf16 checkpoint of the full-size model (benchmarks/phi35v_config.json, the official
config) once into --cache_dir and loads it through from_pretrained like a real one (QLoRA quantises on load);
--tiny uses common.tiny_model; otherwise --model_name_or_path is benchmarked. Throughput does not depend on
the weights' values.

Outputs (default into --output_dir): benchmark.md (a table like the recipe's plus device, versions and the data
path) and benchmark.json (the same rows), rows/<config>.json per configuration and logs/<config>.log.

Metrics. Throughput = images per optimizer step (global batch size, one image per DocVQA sample) x timed steps /
timed seconds. Peak GPU memory = torch.cuda.max_memory_allocated (and _reserved in the JSON), GiB, max over
ranks, over the whole run. MFU = model FLOPs per second / (peak dense bf16 FLOPs x GPUs); model FLOPs per
sample (see `training_flops`): forward 2N per token for every weight matrix N that the token goes through,
plus 4 * layers * seq_len * hidden per token for attention (QK^T and AV, no causal discount, as PaLM);
backward 2x forward for trainable weights (activation and weight gradients), 1x forward for frozen weights
that gradients pass through (LoRA base weights), none for frozen parts below every trainable one (the frozen
vision tower), 2x the attention forward wherever gradients flow. Full finetuning is thus 6N per token plus
attention (PaLM's formula). HFU also counts the gradient-checkpointing recompute (one more forward of the
checkpointed decoder and CLIP layers that take part in the backward). Vision FLOPs use the crops actually
encoded (global view + tiles, 577 CLIP tokens each), the projection the image tokens.

The data path (dataset item with PNG decode + processor + collator, one process, one thread) is timed on its
own and reported as samples/s per core next to the GPU numbers; a row whose training samples/s exceed that
times the available cores is flagged. `Data wait` is the share of the timed window the Trainer's main loop
spent fetching the micro-batches of the next optimizer step (host time, an upper bound on data stalls).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib.util
import json
import logging
import math
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

REPO = Path(__file__).resolve().parent
if str(REPO) not in sys.path:  # `torchrun benchmark.py` from elsewhere
    sys.path.insert(0, str(REPO))

import common  # noqa: E402,F401  (registers phi3_v with the Auto classes)
from common.arguments import build_parser, validate_args  # noqa: E402
from common.collators import ConversationEncoder, Phi3VTrainCollator  # noqa: E402
from common.data import Sample, SampleDataset, Turn  # noqa: E402
from common.phi3v.image_processing_phi3_v import CROP_SIZE, num_image_tokens, padded_image_size  # noqa: E402
from common.precision import resolve_precision  # noqa: E402

logger = logging.getLogger("benchmark")

OFFICIAL_CONFIG = REPO / "benchmarks" / "phi35v_config.json"
RECIPE_TOKENS_PER_SAMPLE = 2443
GIB = 2**30

# name -> (label in the table, the script flags that select it)
STRATEGIES = {
    "full": ("full-finetuning", {}),
    "frozen": ("frozen image model", {"freeze_vision_model": True}),
    "lora": ("LoRA", {"use_lora": True}),
    "qlora": ("QLoRA", {"use_qlora": True}),
    "lora_frozen": ("LoRA (frozen image model)", {"use_lora": True, "freeze_vision_model": True}),
    "qlora_frozen": ("QLoRA (frozen image model)", {"use_qlora": True, "freeze_vision_model": True}),
}
DEFAULT_STRATEGIES = "full,frozen,lora,qlora"

# Dense bf16 tensor-core peak per GPU (no sparsity), matched in order against torch.cuda.get_device_name().
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
]

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


# ---- FLOPs and MFU ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelDims:
    """The matmul shapes of a Phi-3-V model (weight matrices only; norms, biases and embeddings are ignored)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    vision_hidden: int = 0
    vision_intermediate: int = 0
    vision_layers: int = 0  # layers of the CLIP tower as built
    vision_feature_layers: int = 0  # layers whose output feeds the projection (the rest is trimmed for LoRA)
    patch_size: int = 14
    image_size: int = CROP_SIZE

    @classmethod
    def from_config(cls, config) -> ModelDims:
        vision = config.vision_config
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads or config.num_attention_heads,
            vocab=config.vocab_size,
            vision_hidden=vision.hidden_size,
            vision_intermediate=vision.intermediate_size,
            vision_layers=vision.num_hidden_layers,
            vision_feature_layers=config.vision_feature_layer,
            patch_size=vision.patch_size,
            image_size=vision.image_size,
        )

    @property
    def decoder_linears(self) -> list[tuple[int, int]]:
        """(in, out) of one decoder layer's weights: qkv_proj, o_proj, gate_up_proj, down_proj."""
        h, kv = self.hidden, self.hidden // self.heads * self.kv_heads
        return [(h, h + 2 * kv), (h, h), (h, 2 * self.intermediate), (self.intermediate, h)]

    @property
    def vision_linears(self) -> list[tuple[int, int]]:
        """(in, out) of one CLIP layer's weights: q, k, v, out_proj, fc1, fc2."""
        v = self.vision_hidden
        return [(v, v)] * 4 + [(v, self.vision_intermediate), (self.vision_intermediate, v)]

    @property
    def projection_linears(self) -> list[tuple[int, int]]:
        """img_projection.0 (4 merged CLIP patches -> hidden) and img_projection.2."""
        return [(4 * self.vision_hidden, self.hidden), (self.hidden, self.hidden)]

    @property
    def vision_tokens_per_crop(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # patches + CLS

    def matmul_params(self) -> int:
        """Weight-matrix parameters that do matmuls (decoder, lm_head, CLIP layers, patch conv, projection)."""
        decoder = self.layers * sum(i * o for i, o in self.decoder_linears) + self.hidden * self.vocab
        vision = self.vision_layers * sum(i * o for i, o in self.vision_linears)
        conv = 3 * self.patch_size**2 * self.vision_hidden
        return decoder + vision + conv + sum(i * o for i, o in self.projection_linears)


def training_flops(
    dims: ModelDims,
    seq_len: float,
    crops: int,
    image_tokens: int,
    strategy: str,
    lora_rank: int = 64,
    gradient_checkpointing: bool = True,
) -> dict[str, float]:
    """FLOPs of one training sample (one image of `crops` encoded crops and `image_tokens` placeholder tokens in
    a sequence of `seq_len` tokens) -> {"forward", "model", "hardware"}; see the module docstring.

    Roles: "train" (weights trainable: backward 2x forward), "pass" (frozen, gradients flow through them to
    something trainable: 1x), "leaf" (frozen, nothing trainable below: 0). Attention backward is 2x its forward
    wherever gradients flow. `hardware` adds one forward of checkpointed layers that take part in the backward.
    """
    _, flags = STRATEGIES[strategy]
    lora = flags.get("use_lora") or flags.get("use_qlora")
    frozen_vision = flags.get("freeze_vision_model", False)
    decoder_role = "pass" if lora else "train"
    vision_role = "leaf" if frozen_vision else decoder_role
    totals = {"forward": 0.0, "model": 0.0, "hardware": 0.0}

    def add(linears, tokens, role, attention=0.0, checkpointed=False, lora_targets=False, count=1):
        matmul = 2 * sum(i * o for i, o in linears) * tokens
        backward = {"train": 2 * matmul, "pass": matmul, "leaf": 0.0}[role]
        backward += 2 * attention if role != "leaf" else 0.0
        forward = matmul + attention
        if lora and lora_targets and role != "leaf":
            adapter = 2 * sum(lora_rank * (i + o) for i, o in linears) * tokens
            forward += adapter
            backward += 2 * adapter
        totals["forward"] += count * forward
        totals["model"] += count * (forward + backward)
        totals["hardware"] += count * (forward + backward + (forward if checkpointed and role != "leaf" else 0.0))

    # Decoder layers and lm_head (logits for every position).
    add(dims.decoder_linears, seq_len, decoder_role, attention=4 * seq_len**2 * dims.hidden,
        checkpointed=gradient_checkpointing, lora_targets=True, count=dims.layers)
    add([(dims.hidden, dims.vocab)], seq_len, decoder_role, lora_targets=True)
    if crops and dims.vision_layers:
        vision_tokens = crops * dims.vision_tokens_per_crop
        vision_attention = 4 * crops * dims.vision_tokens_per_crop**2 * dims.vision_hidden
        # LoRA trims the CLIP layers after the feature layer; otherwise they run forward but get no gradient.
        built = dims.vision_feature_layers if lora else dims.vision_layers
        used = dims.vision_feature_layers
        add(dims.vision_linears, vision_tokens, vision_role, attention=vision_attention,
            checkpointed=gradient_checkpointing, lora_targets=True, count=used)
        add(dims.vision_linears, vision_tokens, "leaf", attention=vision_attention, count=built - used)
        # The patch convolution sees only pixels: trainable in full finetuning, never passed through.
        conv = [(3 * dims.patch_size**2, dims.vision_hidden)]
        add(conv, crops * (dims.vision_tokens_per_crop - 1), "train" if vision_role == "train" else "leaf")
        add(dims.projection_linears, image_tokens, vision_role, lora_targets=True)
    return totals


def peak_flops_for(device_name: str) -> float | None:
    """Dense bf16 peak FLOPs/s of one GPU from its name, or None when unknown."""
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def utilization(flops_per_sample: float, samples_per_s: float, peak_flops_per_gpu: float | None, gpus: int):
    """Achieved FLOPs/s over the peak of all GPUs; None without a known peak."""
    if not peak_flops_per_gpu or gpus < 1:
        return None
    return flops_per_sample * samples_per_s / (peak_flops_per_gpu * gpus)


# ---- synthetic DocVQA-like data ---------------------------------------------------------------------------


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


def _docvqa_sample(row: dict, index: int) -> Sample:
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
        sample = dataset.to_sample(dataset.rows[index], index)
        ids, _ = encoder.encode(sample, [tokens_per_image] * len(sample.images), with_last_answer=True)
        lengths.append(len(ids))
    return lengths


# ---- assets: pages and model folders, written once into the cache --------------------------------------


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
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s:.0f} s (written by local rank 0)")
        time.sleep(2)
    return path


def write_pages(folder: Path, count: int, size: tuple[int, int], seed: int) -> None:
    folder.mkdir(parents=True)
    for index in range(count):
        synthetic_page(seed + index, size).save(folder / f"page_{index:03d}.png")


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


# ---- the data path on its own ----------------------------------------------------------------------------


def available_cores() -> int:
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


# ---- the worker: one configuration, under torchrun or alone ----------------------------------------------


class StepTimer(TrainerCallback):
    """Times optimizer steps warmup+1 .. warmup+steps; synchronises CUDA only at the two ends of the window."""

    def __init__(self, warmup_steps: int, steps: int):
        self.warmup_steps, self.steps = warmup_steps, steps
        self.start = self.end = self.last_step_end = None
        self.data_wait = 0.0

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def _in_window(self) -> bool:
        return self.start is not None and self.end is None

    def on_step_begin(self, args, state, control, **kwargs):
        # Called once the Trainer holds every micro-batch of this optimizer step: the gap since the last step
        # ended is (almost all) waiting for data.
        if self._in_window():
            self.data_wait += time.perf_counter() - self.last_step_end

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup_steps:
            self._sync()
            self.start = self.last_step_end = time.perf_counter()
        elif state.global_step == self.warmup_steps + self.steps and self._in_window():
            self._sync()
            self.end = time.perf_counter()
        elif self._in_window():
            self.last_step_end = time.perf_counter()

    @property
    def seconds(self) -> float:
        if self.start is None or self.end is None:
            raise RuntimeError(f"the timed window did not complete (start={self.start}, end={self.end})")
        return self.end - self.start


def peak_memory_gib(device) -> tuple[float | None, float | None]:
    """(max allocated, max reserved) over the run in GiB, max over ranks; (None, None) without CUDA."""
    if not torch.cuda.is_available():
        return None, None
    peaks = torch.tensor([torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)],
                         dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
    allocated, reserved = (value / GIB for value in peaks.tolist())
    return allocated, reserved


def auto_workers(processes_per_node: int) -> int:
    """Data-loader workers per process: the scripts' 4, more where the node has idle cores (at most 8)."""
    return max(4, min(8, available_cores() // max(processes_per_node, 1) - 1))


def config_name(strategy: str, flash: bool) -> str:
    return f"{strategy}_flash-{'on' if flash else 'off'}"


def _worker_config(args) -> tuple[str, bool]:
    strategies = [s for s in args.strategies.split(",") if s]
    if len(strategies) != 1 or args.flash not in ("on", "off"):
        raise SystemExit("error: --worker runs one configuration: --strategies NAME --flash on|off")
    return strategies[0], args.flash == "on"


def _error_reason(error: BaseException) -> str:
    if isinstance(error, SystemExit):
        text = str(error.code)
    elif isinstance(error, torch.cuda.OutOfMemoryError):
        text = "CUDA out of memory: " + str(error).split(".")[0]
    else:
        message, marker = str(error), f"{type(error).__name__}: "
        if "Original Traceback" in message and marker in message:  # re-raised from a DataLoader worker
            message = message[message.rfind(marker) + len(marker):]
        text = marker + message
    text = text.removeprefix("error: ").strip()
    return " ".join(text.split())[:500]


def base_row(args, strategy: str, flash: bool) -> dict:
    return {
        "config": config_name(strategy, flash),
        "strategy": strategy,
        "method": STRATEGIES[strategy][0],
        "flash_attention": flash,
        "effective_batch_size": args.batch_size,
        "batch_size_per_gpu": args.batch_size_per_gpu,
        "status": "error",
        "reason": None,
    }


def measure(args, strategy: str, flash: bool) -> dict:
    """Train warmup+steps optimizer steps through the scripts' path; the row of one configuration (rank 0)."""
    from transformers import AutoConfig, AutoProcessor, Trainer

    from common.arguments import world_size
    from common.finetune import training_arguments
    from common.strategy import TrainingStrategy, build_model

    for flag, value in STRATEGIES[strategy][1].items():
        setattr(args, flag, value)
    args.use_flash_attention = flash
    args.max_steps = args.warmup_steps + args.steps
    args.output_dir = str(Path(args.output_dir) / "runs" / config_name(strategy, flash))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    model_path, pages = prepare_assets(args, wait_only=local_rank != 0)
    args.model_name_or_path = model_path
    if args.dataloader_num_workers is None:
        args.dataloader_num_workers = auto_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))

    args = validate_args(args)
    train_strategy = TrainingStrategy.from_args(args)
    precision = resolve_precision(args.bf16, args.use_flash_attention)
    train_args = training_arguments(args, train_strategy, precision)
    accumulation = train_args.gradient_accumulation_steps
    if args.dataloader_num_workers > 0:
        # The Trainer fetches all micro-batches of an optimizer step before computing any: let the workers
        # prepare a whole step ahead (the scripts keep torch's default 2 per worker); 0 = the scripts' default.
        prefetch = args.prefetch_factor
        if prefetch is None:
            prefetch = min(16, max(2, math.ceil(accumulation / args.dataloader_num_workers)))
        train_args.dataloader_prefetch_factor = prefetch or None

    processor = AutoProcessor.from_pretrained(model_path, num_crops=args.num_crops)
    dataset = docvqa_dataset(pages, (args.max_steps + 1) * args.batch_size, seed=args.seed)
    lengths = sample_lengths(processor, dataset, tuple(args.page_size))
    model = build_model(args, train_strategy, precision)
    if not train_strategy.quantize_4bit:
        model.to(train_args.device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    timer = StepTimer(args.warmup_steps, args.steps)
    trainer = Trainer(
        model=model,
        args=train_args,
        data_collator=Phi3VTrainCollator(processor, args.max_length),
        train_dataset=dataset,
        callbacks=[timer],
    )
    trainer.train()
    allocated, reserved = peak_memory_gib(train_args.device)

    processes = world_size()
    gpus = processes if torch.cuda.is_available() else 0
    nodes = max(1, processes // int(os.environ.get("LOCAL_WORLD_SIZE", str(processes))))
    seconds = timer.seconds
    samples_per_s = args.batch_size * args.steps / seconds
    mean_tokens = sum(lengths) / len(lengths)
    dims = ModelDims.from_config(AutoConfig.from_pretrained(model_path))
    crops, image_tokens = image_layout(tuple(args.page_size), args.num_crops)
    flops = [training_flops(dims, n, crops, image_tokens, strategy, args.lora_rank) for n in lengths]
    model_flops = sum(f["model"] for f in flops) / len(flops)
    hardware_flops = sum(f["hardware"] for f in flops) / len(flops)
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops_for(device_name) if gpus else None
    row = base_row(args, strategy, flash)
    row.update(
        status="ok",
        device=device_name,
        nodes=nodes,
        processes=processes,
        gpus=gpus,
        gradient_accumulation=accumulation,
        dataloader_num_workers=args.dataloader_num_workers,
        dataloader_prefetch_factor=train_args.dataloader_prefetch_factor,
        precision="bf16" if precision.bf16 else "fp16 mixed" if precision.fp16 else "fp32",
        attn_implementation=precision.attn_implementation,
        deepspeed=bool(train_args.deepspeed),
        warmup_steps=args.warmup_steps,
        steps=args.steps,
        seconds=seconds,
        images_per_s=samples_per_s,  # one image per DocVQA sample
        images_per_s_per_gpu=samples_per_s / max(gpus, 1),
        samples_per_s=samples_per_s,
        tokens_per_s=samples_per_s * mean_tokens,
        mean_tokens_per_sample=mean_tokens,
        data_wait_fraction=timer.data_wait / seconds,
        trainable_params=trainable,
        total_params=total,
        model_flops_per_sample=model_flops,
        hardware_flops_per_sample=hardware_flops,
        model_tflops_per_s_per_gpu=model_flops * samples_per_s / max(gpus, 1) / 1e12,
        peak_tflops_per_gpu=peak / 1e12 if peak else None,
        mfu=utilization(model_flops, samples_per_s, peak, gpus),
        hfu=utilization(hardware_flops, samples_per_s, peak, gpus),
        peak_mem_allocated_gib=allocated,
        peak_mem_reserved_gib=reserved,
    )
    return row


def run_worker(args) -> int:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout)
    strategy, flash = _worker_config(args)
    if strategy not in STRATEGIES:
        raise SystemExit(f"error: unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    result = Path(args.worker_result or Path(args.output_dir) / "rows" / f"{config_name(strategy, flash)}.json")
    row = base_row(args, strategy, flash)
    code = 0
    try:
        row = measure(args, strategy, flash)
    except (Exception, SystemExit) as error:  # noqa: BLE001  (every failure becomes a row with its reason)
        traceback.print_exc()
        row["reason"] = _error_reason(error)
        code = 1
    if rank == 0:
        result.parent.mkdir(parents=True, exist_ok=True)
        result.write_text(json.dumps(row, indent=2))
        print(f"BENCHMARK ROW {json.dumps(row)}", flush=True)
    return code


# ---- the launcher: every configuration in a fresh process, then the report --------------------------------


def precheck(args, strategy: str, flash: bool) -> str | None:
    """Why a configuration cannot run on this machine, found without starting it (None: try it)."""
    if strategy not in STRATEGIES:
        return f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}"
    if flash:
        try:
            resolve_precision(args.bf16, True)
        except SystemExit as error:
            return _error_reason(error)
    if STRATEGIES[strategy][1].get("use_qlora") and importlib.util.find_spec("bitsandbytes") is None:
        return "QLoRA needs the bitsandbytes package (pip install bitsandbytes)"
    return None


def worker_command(args, argv: list[str], strategy: str, flash: bool, result: Path) -> list[str]:
    worker_argv = [*argv, "--worker", "--strategies", strategy, "--flash", "on" if flash else "off",
                   "--worker_result", str(result), "--dataloader_num_workers", str(args.dataloader_num_workers)]
    script = str(Path(__file__).resolve())
    if args.nproc_per_node == 1 and args.nnodes == 1:
        return [sys.executable, script, *worker_argv]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc_per_node)]
    if args.nnodes == 1:
        launcher += ["--standalone"]
    else:
        launcher += ["--nnodes", str(args.nnodes), "--node_rank", str(args.node_rank),
                     "--master_addr", args.master_addr, "--master_port", str(args.master_port)]
    return [*launcher, script, *worker_argv]


def _reason_from_log(log: Path, returncode: int) -> str:
    """The most telling line of a failed configuration's log: an out-of-memory error, else the last exception
    (not torchrun's own ChildFailedError), else the exit code and the last line."""
    lines = [" ".join(line.split()) for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for pattern in ("OutOfMemoryError", "out of memory", "Error:", "Exception:", "error:"):
        for line in reversed(lines):
            if pattern in line and "ChildFailedError" not in line:
                return line[:500]
    return f"exit code {returncode}" + (f": {lines[-1][:400]}" if lines else "")


def _run_logged(command: list[str], log: Path, env: dict, timeout: float) -> int | None:
    """Run a configuration in its own process group, output into `log`; on timeout end the whole group (torchrun
    and its workers), so that no process keeps holding a GPU. None when it timed out."""
    with open(log, "w") as log_file:
        log_file.write(" ".join(command) + "\n")
        log_file.flush()
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            return None
        except BaseException:  # Ctrl-C: do not leave the configuration running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            raise


def run_configuration(args, argv: list[str], strategy: str, flash: bool) -> dict:
    name = config_name(strategy, flash)
    output = Path(args.output_dir)
    result, log = output / "rows" / f"{name}.json", output / "logs" / f"{name}.log"
    result.parent.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    reason = precheck(args, strategy, flash)
    if reason is not None:
        row = {**base_row(args, strategy, flash), "status": "skipped", "reason": reason}
        result.write_text(json.dumps(row, indent=2))
        return row
    command = worker_command(args, argv, strategy, flash, result)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    returncode = _run_logged(command, log, env, args.config_timeout)
    if result.exists():
        row = json.loads(result.read_text())
    else:
        row = base_row(args, strategy, flash)
        row["reason"] = (f"timed out after {args.config_timeout} s" if returncode is None
                         else _reason_from_log(log, returncode))
    row["wall_seconds"] = time.perf_counter() - start
    row["log"] = str(log)
    return row


def _fmt(value, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}{suffix}"


def flag_data_bound(rows: list[dict], data_path: dict | None) -> None:
    """Mark rows whose training samples/s per node exceed what the node's cores can prepare (`data_limited`),
    and record what the run's data-loader workers alone could prepare (`data_worker_capacity_samples_per_s`)."""
    for row in rows:
        if row.get("status") != "ok" or not data_path or "capacity_samples_per_s" not in data_path:
            continue
        nodes = max(row.get("nodes") or 1, 1)
        per_node = row["samples_per_s"] / nodes
        row["data_capacity_samples_per_s"] = data_path["capacity_samples_per_s"]
        row["data_limited"] = data_path["capacity_samples_per_s"] < per_node
        workers = (row.get("dataloader_num_workers") or 0) * max(row.get("processes", 1) // nodes, 1)
        if workers:
            row["data_worker_capacity_samples_per_s"] = data_path["samples_per_s_per_core"] * min(workers, data_path["cores"])


def versions() -> dict:
    import transformers

    found = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    for package in ("deepspeed", "peft", "accelerate", "bitsandbytes", "flash_attn"):
        with contextlib.suppress(Exception):
            if importlib.util.find_spec(package) is not None:
                from importlib.metadata import version

                found[package] = version(package.replace("_", "-"))
    return found


def render_markdown(report: dict) -> str:
    meta, rows = report["meta"], report["rows"]
    lines = [
        "# Phi-3.5-vision finetuning throughput",
        "",
        f"- Device: {meta['device']} · date {meta['date']} · host {meta['host']} ({meta['cores']} cores)",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- Model: {meta['model']} · precision {meta['precision']}",
        f"- Data: DocVQA-like synthetic pages {meta['page_size']} at num_crops {meta['num_crops']}, "
        f"{_fmt(meta['mean_tokens_per_sample'], 0)} tokens/sample (recipe's DocVQA average: {RECIPE_TOKENS_PER_SAMPLE})",
        f"- Steps: {meta['warmup_steps']} warm-up + {meta['steps']} timed optimizer steps per configuration",
        "",
        "| Training method | # nodes | GPUs | flash attention | Effective batch size | Throughput (img/s) "
        "| img/s per GPU | MFU | Peak GPU mem (GB) | Data wait | Notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        flash = "✓" if row["flash_attention"] else ""
        if row.get("status") != "ok":
            lines.append(
                f"| {row['method']} | | | {flash} | {row['effective_batch_size']} | | | | | "
                f"| {row['status']}: {row.get('reason') or 'unknown'} |"
            )
            continue
        notes = []
        if row.get("data_limited"):
            notes.append("⚠ data path slower than training (see below)")
        elif row.get("data_worker_capacity_samples_per_s", math.inf) < row["samples_per_s"] / max(row["nodes"], 1):
            notes.append("⚠ too few --dataloader_num_workers for this rate")
        if row["precision"] != "bf16":
            notes.append(row["precision"])
        lines.append(
            f"| {row['method']} | {row['nodes']} | {row['gpus'] or '0 (CPU)'} | {flash} | {row['effective_batch_size']} "
            f"| {_fmt(row['images_per_s'], 3)} | {_fmt(row['images_per_s_per_gpu'], 3)} "
            f"| {_fmt(row['mfu'] * 100 if row.get('mfu') is not None else None, 1, '%')} "
            f"| {_fmt(row['peak_mem_allocated_gib'], 1)} | {_fmt(row['data_wait_fraction'] * 100, 0, '%')} "
            f"| {'; '.join(notes)} |"
        )
    data = meta.get("data_path")
    lines.append("")
    if data and "samples_per_s_per_core" in data:
        fastest = max((r["samples_per_s"] / max(r.get("nodes") or 1, 1) for r in rows if r.get("status") == "ok"),
                      default=None)
        verdict = ""
        if fastest is not None:
            verdict = (" — ⚠ below the fastest training rate per node" if data["capacity_samples_per_s"] < fastest
                       else " — above every training rate per node")
            verdict += f" ({_fmt(fastest, 2)} samples/s)"
        lines.append(
            f"Data path (dataset item with PNG decode + processor + collator, 1 process, 1 thread): "
            f"{_fmt(data['samples_per_s_per_core'], 2)} samples/s per core x {data['cores']} cores = "
            f"{_fmt(data['capacity_samples_per_s'], 1)} samples/s{verdict}; "
            f"{_fmt(data['mean_tokens_per_sample'], 0)} tokens/sample."
        )
    elif data:
        lines.append(f"Data path: not measured ({data.get('error')})")
    lines += [
        "",
        "Throughput = global batch x timed steps / time (one image per sample). Peak GPU memory: "
        "torch.cuda.max_memory_allocated, GiB, max over ranks. Data wait: share of the timed window spent "
        "fetching the next step's micro-batches. MFU: model FLOPs (forward 2N per token per weight matrix + "
        "attention 4·L·s·d; backward 2x forward for trainable weights, 1x for frozen weights gradients pass "
        "through, 0 for the frozen vision tower; no recompute) / (peak dense bf16 FLOPs x GPUs); HFU (with "
        "gradient-checkpointing recompute) is in the JSON.",
        "",
    ]
    return "\n".join(lines)


def write_report(args, rows: list[dict], data_path: dict | None, model_desc: str, results_md: Path,
                 results_json: Path) -> dict:
    flag_data_bound(rows, data_path)
    ok = [r for r in rows if r.get("status") == "ok"]
    devices = sorted({r["device"] for r in ok})
    gpus = max((r["gpus"] for r in ok), default=0)
    precision = sorted({r["precision"] for r in ok}) or ["bf16" if args.bf16 else "fp16 mixed"]
    tokens = ok[0]["mean_tokens_per_sample"] if ok else (data_path or {}).get("mean_tokens_per_sample")
    report = {
        "meta": {
            "device": (", ".join(devices) or "none") + (f" x {gpus}" if gpus else ""),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": socket.gethostname(),
            "cores": available_cores(),
            "versions": versions(),
            "model": model_desc,
            "precision": ", ".join(precision),
            "page_size": "x".join(map(str, args.page_size)),
            "num_crops": args.num_crops,
            "mean_tokens_per_sample": tokens,
            "recipe_tokens_per_sample": RECIPE_TOKENS_PER_SAMPLE,
            "warmup_steps": ok[0]["warmup_steps"] if ok else args.warmup_steps,
            "steps": ok[0]["steps"] if ok else args.steps,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "data_path": data_path,
        },
        "rows": rows,
    }
    results_md.parent.mkdir(parents=True, exist_ok=True)
    results_json.parent.mkdir(parents=True, exist_ok=True)
    results_json.write_text(json.dumps(report, indent=2))
    results_md.write_text(render_markdown(report))
    return report


def describe_model(args) -> str:
    if args.tiny:
        return "tiny random Phi-3-V (common.tiny_model)"
    if args.random_init:
        layers = f" with num_hidden_layers={args.random_init_layers}" if args.random_init_layers else ""
        config = Path(args.model_config).resolve()
        shown = config.relative_to(REPO) if config.is_relative_to(REPO) else config
        return f"random init from {shown}{layers}"
    return args.model_name_or_path


def measure_data_path(args, model_path: str, pages: list[Path]) -> dict:
    if args.data_samples < 1:
        return {"error": "skipped (--data_samples 0)"}
    try:
        return time_data_path(model_path, pages, args, args.data_samples)
    except Exception as error:  # noqa: BLE001  (a report without the data line beats no report)
        return {"error": _error_reason(error)}


def run_all(args, argv: list[str]) -> dict:
    strategies = [s for s in args.strategies.split(",") if s]
    flashes = {"both": [False, True], "on": [True], "off": [False]}[args.flash]
    if args.dataloader_num_workers is None:
        args.dataloader_num_workers = auto_workers(args.nproc_per_node)
    model_path, pages = prepare_assets(args)
    print(f"timing the data path ({args.data_samples} samples, 1 thread) ...", flush=True)
    data_path = measure_data_path(args, model_path, pages)
    if "samples_per_s_per_core" in data_path:
        print(f"  {data_path['samples_per_s_per_core']:.2f} samples/s per core x {data_path['cores']} cores, "
              f"{data_path['mean_tokens_per_sample']:.0f} tokens/sample", flush=True)
    rows = []
    for strategy in strategies:
        for flash in flashes:
            print(f"{config_name(strategy, flash)} ...", flush=True)
            row = run_configuration(args, argv, strategy, flash)
            rows.append(row)
            if row.get("status") == "ok":
                print(f"  {row['images_per_s']:.3f} img/s ({row['images_per_s_per_gpu']:.3f} per GPU), "
                      f"MFU {_fmt(row['mfu'], 3)}, peak {_fmt(row['peak_mem_allocated_gib'], 1)} GiB", flush=True)
            else:
                print(f"  {row['status']}: {row.get('reason')}", flush=True)
            if args.node_rank == 0:  # partial results survive a later crash
                write_report(args, rows, data_path, describe_model(args), *result_paths(args))
    return write_report(args, rows, data_path, describe_model(args), *result_paths(args))


def collect(args) -> dict:
    """The report from every rows/*.json in --output_dir (configurations run with --worker under any launcher)."""
    rows = [json.loads(p.read_text()) for p in sorted((Path(args.output_dir) / "rows").glob("*.json"))]
    if not rows:
        raise SystemExit(f"error: no rows/*.json in {args.output_dir}")
    model_path, pages = prepare_assets(args)
    data_path = measure_data_path(args, model_path, pages)
    order = list(STRATEGIES)
    rows.sort(key=lambda r: (order.index(r["strategy"]) if r["strategy"] in order else 99, r["flash_attention"]))
    return write_report(args, rows, data_path, describe_model(args), *result_paths(args))


def result_paths(args) -> tuple[Path, Path]:
    output = Path(args.output_dir)
    return (Path(args.results_md) if args.results_md else output / "benchmark.md",
            Path(args.results_json) if args.results_json else output / "benchmark.json")


def _page_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from error
    return width, height


def build_benchmark_parser() -> argparse.ArgumentParser:
    """The scripts' parser (DocVQA defaults: num_crops 16; the recipe's global batch 64, bf16) plus benchmark flags."""
    parser = build_parser(__doc__, num_crops=16, batch_size=64, warmup_steps=2, bf16=True, output_dir="output/benchmark",
                          dataloader_num_workers=None)
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                       help=f"comma-separated, from {', '.join(STRATEGIES)} (default {DEFAULT_STRATEGIES})")
    bench.add_argument("--flash", choices=["both", "on", "off"], default="both",
                       help="with and/or without flash attention (--use_flash_attention)")
    bench.add_argument("--steps", type=int, default=5,
                       help="timed optimizer steps, after --warmup_steps untimed ones (which also set the LR warm-up)")
    model = bench.add_mutually_exclusive_group()
    model.add_argument("--tiny", action="store_true", help="the tiny random model (CPU smoke test)")
    model.add_argument("--random_init", action="store_true",
                       help="the full-size model from --model_config with random weights (no download)")
    bench.add_argument("--model_config", default=str(OFFICIAL_CONFIG), help="config.json for --random_init")
    bench.add_argument("--random_init_layers", type=int, default=None,
                       help="override the decoder depth of --random_init (quick checks only)")
    bench.add_argument("--no_bf16", dest="bf16", action="store_false", help="fp16 mixed precision instead of bf16")
    bench.add_argument("--cache_dir", default=os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "phi35v_benchmark"),
                       help="where the random-init/tiny model and the page images are written once")
    bench.add_argument("--page_size", type=_page_size, default=(1700, 2200), help="synthetic page WIDTHxHEIGHT")
    bench.add_argument("--num_pages", type=int, default=8, help="distinct synthetic pages, cycled over")
    bench.add_argument("--data_samples", type=int, default=8, help="samples for the data-path timing (0: skip)")
    bench.add_argument("--prefetch_factor", type=int, default=None,
                       help="batches prefetched per data-loader worker (default: one optimizer step ahead; "
                            "0: the scripts' torch default of 2)")
    bench.add_argument("--peak_tflops", type=float, default=None,
                       help="peak dense bf16 TFLOPs per GPU for MFU (default: from the device name)")
    bench.add_argument("--results_md", default=None, help="markdown table (default OUTPUT_DIR/benchmark.md)")
    bench.add_argument("--results_json", default=None, help="JSON rows (default OUTPUT_DIR/benchmark.json)")
    bench.add_argument("--config_timeout", type=int, default=3600, help="seconds before a configuration is abandoned")
    launch = parser.add_argument_group("launch (torchrun is started for every configuration when > 1 process)")
    launch.add_argument("--nproc_per_node", type=int, default=1, help="GPUs (processes) per node")
    launch.add_argument("--nnodes", type=int, default=1, help="nodes; run the same command on each")
    launch.add_argument("--node_rank", type=int, default=0, help="this node's rank (multi-node)")
    launch.add_argument("--master_addr", default="127.0.0.1", help="rank-0 node address (multi-node)")
    launch.add_argument("--master_port", type=int, default=29500, help="rendezvous port (multi-node)")
    launch.add_argument("--collect", action="store_true",
                        help="only write the report from the rows/*.json already in --output_dir")
    launch.add_argument("--worker", action="store_true", help="run one configuration in this process (torchrun)")
    launch.add_argument("--worker_result", default=None, help=argparse.SUPPRESS)
    launch.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)  # write the assets and exit
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_benchmark_parser().parse_args(argv)
    problems = []
    if args.steps < 1:
        problems.append(f"--steps must be at least 1, got {args.steps}")
    if args.warmup_steps < 1:
        problems.append(f"--warmup_steps must be at least 1 (the first step is never timed), got {args.warmup_steps}")
    if args.random_init and not Path(args.model_config).is_file():
        problems.append(f"--model_config {args.model_config} does not exist")
    if problems:
        raise SystemExit("error: invalid arguments:\n  " + "\n  ".join(problems))
    if args.worker:
        return run_worker(args)
    if args.prepare:
        prepare_assets(args)
        return 0
    model_dir = asset_paths(args)[1]
    if args.random_init and not model_dir.exists():
        # Built on the GPU when there is one: in a separate process, so that this launcher holds no CUDA
        # context (nor memory) while the configurations run.
        subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--prepare"], check=True)
    report = collect(args) if args.collect else run_all(args, argv)
    md, js = result_paths(args)
    print(render_markdown(report))
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
