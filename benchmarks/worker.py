"""One configuration, in this process (under torchrun or alone): train through the scripts' path and time it."""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch
from transformers import TrainerCallback

import common.phi3v  # noqa: F401  (registers phi3_v with the Auto classes)
from benchmarks.assets import prepare_assets
from benchmarks.configs import base_row, config_name, error_reason
from benchmarks.flops import ModelDims, peak_flops_for, training_flops, utilization
from benchmarks.synthetic import available_cores, docvqa_dataset, image_layout, sample_lengths
from common.arguments import resolve_run_config
from common.config import RunConfig
from common.distributed import Distributed, start_distributed
from common.errors import UsageError
from common.logging_setup import setup_logging
from common.strategy import STRATEGIES

GIB = 2**30


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


def peak_memory_gib(distributed: Distributed) -> tuple[float | None, float | None]:
    """(max allocated, max reserved) over the run in GiB, max over ranks; (None, None) without CUDA."""
    if not torch.cuda.is_available():
        return None, None
    device = distributed.device
    peaks = [torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)]
    allocated, reserved = (value / GIB for value in distributed.all_max(peaks))
    return allocated, reserved


def auto_workers(processes_per_node: int) -> int:
    """Data-loader workers per process: the scripts' 4, more where the node has idle cores (at most 8)."""
    return max(4, min(8, available_cores() // max(processes_per_node, 1) - 1))


def _worker_config(args) -> tuple[str, bool]:
    """(strategy, flash) of the single configuration a worker runs."""
    strategies = [s for s in args.strategies.split(",") if s]
    if len(strategies) != 1 or args.flash not in ("on", "off"):
        raise UsageError("--worker runs one configuration: --strategies NAME --flash on|off")
    return strategies[0], args.flash == "on"


def run_config(
    args: argparse.Namespace, strategy: str, flash: bool, model_path: str, workers: int, distributed: Distributed
) -> RunConfig:
    """The configuration a script would resolve from the benchmark's flags with this strategy's and flash
    attention's flags on, training warmup + timed steps, into its own output folder."""
    flags = {
        **vars(args),
        **STRATEGIES[strategy].flags,
        "use_flash_attention": flash,
        "max_steps": args.warmup_steps + args.steps,
        "output_dir": str(Path(args.output_dir) / "runs" / config_name(strategy, flash)),
        "model_name_or_path": model_path,
        "dataloader_num_workers": workers,
    }
    return resolve_run_config(argparse.Namespace(**flags), distributed=distributed)


def measure(args, strategy: str, flash: bool, distributed: Distributed) -> dict:
    """Train warmup+steps optimizer steps through the scripts' path; the row of one configuration (rank 0)."""
    from transformers import AutoConfig

    from common.model_loading import load_processor_and_model, parameter_counts
    from common.packing import train_collator
    from common.trainer import make_trainer
    from common.training_arguments import training_arguments

    model_path, pages = prepare_assets(args, wait_only=distributed.local_rank != 0)
    workers = args.dataloader_num_workers
    config = run_config(
        args, strategy, flash, model_path, auto_workers(distributed.local_world_size) if workers is None else workers,
        distributed,
    )
    training, precision = config.training, config.precision
    train_args = training_arguments(
        training, config.outputs, config.strategy, precision, distributed, prefetch_factor=args.prefetch_factor
    )

    processor, model = load_processor_and_model(config.model, config.strategy, config.lora, precision, distributed.device)
    dataset = docvqa_dataset(pages, (training.max_steps + 1) * training.batch_size, seed=training.seed)
    lengths = sample_lengths(processor, dataset, tuple(args.page_size))
    trainable, total = parameter_counts(model)

    timer = StepTimer(args.warmup_steps, args.steps)
    make_trainer(
        model, processor, train_args, dataset, train_collator(processor, training), callbacks=[timer],
        distributed=distributed,
    ).train()
    allocated, reserved = peak_memory_gib(distributed)

    processes = distributed.world_size
    gpus = processes if torch.cuda.is_available() else 0
    nodes = max(1, processes // distributed.local_world_size)
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
        gradient_accumulation=train_args.gradient_accumulation_steps,
        dataloader_num_workers=training.dataloader_num_workers,
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
    """`benchmark.py --worker`: measure the one configuration of --strategies/--flash and write its row (rank 0),
    with the reason when it fails; the exit code is then 1."""
    strategy, flash = _worker_config(args)
    if strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    distributed = start_distributed(STRATEGIES[strategy].uses_deepspeed)
    setup_logging(distributed, args.verbose)
    result = Path(args.worker_result or Path(args.output_dir) / "rows" / f"{config_name(strategy, flash)}.json")
    row = base_row(args, strategy, flash)
    code = 0
    try:
        row = measure(args, strategy, flash, distributed)
    except Exception as error:  # noqa: BLE001  (every failure becomes a row with its reason)
        traceback.print_exc()
        row["reason"] = error_reason(error)
        code = 1
    if distributed.is_main:
        result.parent.mkdir(parents=True, exist_ok=True)
        result.write_text(json.dumps(row, indent=2))
        print(f"BENCHMARK ROW {json.dumps(row)}", flush=True)
    return code
