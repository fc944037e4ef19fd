"""benchmark.md and benchmark.json from the configurations' rows, the data-path timing and the environment."""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import math
import platform
import socket
import sys
from pathlib import Path

import torch

from benchmarks.configs import REPO
from benchmarks.synthetic import RECIPE_TOKENS_PER_SAMPLE, available_cores


def fmt(value, digits: int = 2, suffix: str = "") -> str:
    """A table cell: `value` rounded, or n/a (no GPU, no known peak, not measured)."""
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
    """Python, torch with its CUDA and cuDNN, transformers and the optional packages that change the numbers,
    where installed."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    found = {"python": platform.python_version(), "torch": torch.__version__,
             "cuda": torch.version.cuda or "none (CPU build)", "cudnn": str(cudnn) if cudnn else "none"}
    for package in ("transformers", "deepspeed", "peft", "accelerate", "datasets", "bitsandbytes", "flash_attn"):
        with contextlib.suppress(Exception):
            if importlib.util.find_spec(package) is not None:
                from importlib.metadata import version

                found[package] = version(package.replace("_", "-"))
    return found


def describe_model(args) -> str:
    """The benchmarked model in words, for the report."""
    if args.tiny:
        return "tiny random Phi-3-V (common.tiny_model)"
    if args.random_init:
        layers = f" with num_hidden_layers={args.random_init_layers}" if args.random_init_layers else ""
        config = Path(args.model_config).resolve()
        shown = config.relative_to(REPO) if config.is_relative_to(REPO) else config
        return f"random init from {shown}{layers}"
    return args.model_name_or_path


def result_paths(args) -> tuple[Path, Path]:
    """(markdown, JSON) report files: --results_md / --results_json, else in --output_dir."""
    output = Path(args.output_dir)
    return (Path(args.results_md) if args.results_md else output / "benchmark.md",
            Path(args.results_json) if args.results_json else output / "benchmark.json")


def render_markdown(report: dict) -> str:
    """benchmark.md: the recipe's table plus device, versions, the data path and how the metrics are defined."""
    meta, rows = report["meta"], report["rows"]
    lines = [
        "# Phi-3.5-vision finetuning throughput",
        "",
        f"- Device: {meta['device']} · date {meta['date']} · host {meta['host']} ({meta['cores']} cores)",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- Model: {meta['model']} · precision {meta['precision']}",
        f"- Data: DocVQA-like synthetic pages {meta['page_size']} at num_crops {meta['num_crops']}, "
        f"{fmt(meta['mean_tokens_per_sample'], 0)} tokens/sample (recipe's DocVQA average: {RECIPE_TOKENS_PER_SAMPLE})",
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
            f"| {fmt(row['images_per_s'], 3)} | {fmt(row['images_per_s_per_gpu'], 3)} "
            f"| {fmt(row['mfu'] * 100 if row.get('mfu') is not None else None, 1, '%')} "
            f"| {fmt(row['peak_mem_allocated_gib'], 1)} | {fmt(row['data_wait_fraction'] * 100, 0, '%')} "
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
            verdict += f" ({fmt(fastest, 2)} samples/s)"
        lines.append(
            f"Data path (dataset item with PNG decode + processor + collator, 1 process, 1 thread): "
            f"{fmt(data['samples_per_s_per_core'], 2)} samples/s per core x {data['cores']} cores = "
            f"{fmt(data['capacity_samples_per_s'], 1)} samples/s{verdict}; "
            f"{fmt(data['mean_tokens_per_sample'], 0)} tokens/sample."
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


def write_report(args, rows: list[dict], data_path: dict | None) -> dict:
    """Flag data-bound rows, write benchmark.md and benchmark.json, and return the report."""
    results_md, results_json = result_paths(args)
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
            "model": describe_model(args),
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
