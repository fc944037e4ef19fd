"""The report of `scripts/gpu_check.sh`: device, versions, set-up steps, the GPU tests' results and the short
benchmark's figures, as gpu_check.json and gpu_check.md in one folder.

    python -m benchmarks.gpu_check --out OUT --work WORK --mode gpu --step "environment=ok:95" \
        --step "flash-attn=not installed:3:reason"

It reads WORK/gpu_tests.xml (pytest's JUnit XML), WORK/benchmark/benchmark.json and WORK/batching/batching.json
(padded vs packed batches), whichever exist; a missing
one is reported as not run. Nothing here invents a figure: a value that was not measured is absent.
"""

from __future__ import annotations

import argparse
import datetime
import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

from benchmarks.batching import render_batching
from benchmarks.report import fmt, versions


def device_info() -> dict:
    if not torch.cuda.is_available():
        return {"cuda": False, "name": "CPU (no CUDA GPU)", "count": 0}
    properties = torch.cuda.get_device_properties(0)
    return {
        "cuda": True,
        "name": properties.name,
        "count": torch.cuda.device_count(),
        "compute_capability": f"{properties.major}.{properties.minor}",
        "memory_gib": round(properties.total_memory / 2**30, 1),
        "cuda_runtime": torch.version.cuda,
    }


# The benchmark's attention shapes (the official config: 32 decoder heads of 96, a CLIP ViT-L/14 at 336 px with
# 16 heads of 64 over 577 positions); the decoder length is the benchmark's mean tokens per sample.
DECODER_HEADS, DECODER_HEAD_DIM = 32, 96
VISION_HEADS, VISION_HEAD_DIM, VISION_POSITIONS = 16, 64, 577
DOCVQA_TOKENS = 2540


def sdpa_kernels(decoder_tokens: int) -> dict:
    """{attention call: the SDPA kernel torch picks for it} on this device in the benchmark's dtype, as
    transformers calls SDPA: a padded batch with a boolean mask, an unpadded one causal without a mask."""
    from torch.nn.attention import SDPBackend

    names = {backend.value: backend.name for backend in SDPBackend.__members__.values()}
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    calls = {
        f"decoder, padded batch ({decoder_tokens} tokens, mask)": (DECODER_HEADS, decoder_tokens, DECODER_HEAD_DIM, True, False),
        f"decoder, no padding ({decoder_tokens} tokens, causal)": (DECODER_HEADS, decoder_tokens, DECODER_HEAD_DIM, False, True),
        f"vision tower ({VISION_POSITIONS} positions)": (VISION_HEADS, VISION_POSITIONS, VISION_HEAD_DIM, False, False),
    }
    found = {}
    for label, (heads, length, head_dim, masked, causal) in calls.items():
        try:
            query = torch.zeros(1, heads, length, head_dim, dtype=dtype, device="cuda" if cuda else "cpu")
            mask = torch.ones(length, length, dtype=torch.bool, device=query.device).tril() if masked else None
            # torch's own dispatch decision (private, but the only place the choice is exposed)
            choice = int(torch._fused_sdp_choice(query, query, query, mask, 0.0, causal))
            found[label] = f"{names.get(choice, choice)} ({str(dtype).removeprefix('torch.')})"
        except Exception as err:  # an older or newer torch without this entry point: say so, keep the report
            found[label] = f"unknown ({type(err).__name__}: {err})"[:200]
    return found


def parse_step(text: str) -> dict:
    """`NAME=STATUS:SECONDS[:DETAIL]` (the shell script's record of one set-up step)."""
    name, _, rest = text.partition("=")
    status, _, rest = rest.partition(":")
    seconds, _, detail = rest.partition(":")
    return {"name": name, "status": status, "seconds": int(seconds) if seconds.isdigit() else None,
            "detail": detail or None}


def read_test_results(junit_xml: Path) -> dict:
    """{"ran": bool, "counts": {...}, "tests": [{"name", "outcome", "message"}]} from pytest's JUnit XML."""
    if not junit_xml.exists():
        return {"ran": False, "counts": {}, "tests": []}
    tests = []
    for case in ElementTree.parse(junit_xml).getroot().iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = " ".join((element.get("message") or element.text or "").split())[:300]
                break
        tests.append({"name": case.get("name"), "outcome": outcome, "message": message})
    counts = {outcome: sum(t["outcome"] == outcome for t in tests) for outcome in ("passed", "failed", "error", "skipped")}
    return {"ran": True, "counts": counts, "tests": tests}


def benchmark_rows(benchmark_json: Path) -> dict:
    if not benchmark_json.exists():
        return {"ran": False, "rows": []}
    report = json.loads(benchmark_json.read_text())
    keys = ("config", "method", "flash_attention", "status", "reason", "precision", "effective_batch_size",
            "images_per_s", "images_per_s_per_gpu", "mfu", "hfu", "peak_mem_allocated_gib", "mean_tokens_per_sample")
    return {"ran": True, "model": report.get("meta", {}).get("model"),
            "rows": [{key: row.get(key) for key in keys if key in row} for row in report.get("rows", [])]}


def verdict(steps: list[dict], tests: dict, bench: dict) -> str:
    """pass: set-up went through, no test failed, every benchmark configuration measured; else fail."""
    required = [step for step in steps if step["name"] != "flash-attn"]  # optional: the tests skip without it
    if any(step["status"] != "ok" for step in required) or not tests["ran"] or not bench["ran"]:
        return "fail"
    if tests["counts"].get("failed") or tests["counts"].get("error"):
        return "fail"
    if not bench["rows"] or any(row.get("status") != "ok" for row in bench["rows"]):
        return "fail"
    return "pass"


def render_markdown(report: dict) -> str:
    device = report["device"]
    lines = [
        f"# GPU check ({report['mode']}): {report['verdict'].upper()}",
        "",
        f"- Date: {report['date']}",
        f"- Device: {device['name']}"
        + (f" x{device['count']}, compute capability {device['compute_capability']}, {device['memory_gib']} GiB, "
           f"CUDA {device['cuda_runtime']}" if device["cuda"] else ""),
        "- Versions: " + ", ".join(f"{name} {version}" for name, version in report["versions"].items()),
        *(f"- SDPA kernel, {call}: {kernel}" for call, kernel in report["sdpa_kernels"].items()),
        "",
        "## Set-up",
        "",
        "| Step | Status | Seconds | Detail |",
        "|---|---|---|---|",
    ]
    for step in report["setup"]:
        lines.append(f"| {step['name']} | {step['status']} | {step['seconds'] if step['seconds'] is not None else 'n/a'} "
                     f"| {step['detail'] or ''} |")
    tests = report["tests"]
    lines += ["", "## GPU tests (`pytest -m gpu`)", ""]
    if not tests["ran"]:
        lines.append("Not run.")
    else:
        lines.append(", ".join(f"{count} {outcome}" for outcome, count in tests["counts"].items() if count) or "none")
        lines += ["", "| Test | Outcome | Message |", "|---|---|---|"]
        lines += [f"| {t['name']} | {t['outcome']} | {t['message'] or ''} |" for t in tests["tests"]]
    bench = report["benchmark"]
    lines += ["", "## Benchmark (DocVQA shape, a few steps per strategy)", ""]
    if not bench["ran"]:
        lines.append("Not run.")
    else:
        lines += [f"Model: {bench.get('model')}", "",
                  "| Method | Flash attention | Status | img/s | img/s per GPU | MFU | Peak memory (GiB) | Reason |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in bench["rows"]:
            lines.append(
                f"| {row.get('method')} | {'yes' if row.get('flash_attention') else 'no'} | {row.get('status')} | "
                f"{fmt(row.get('images_per_s'), 2)} | {fmt(row.get('images_per_s_per_gpu'), 2)} | "
                f"{fmt(row.get('mfu'), 3)} | {fmt(row.get('peak_mem_allocated_gib'), 1)} | {row.get('reason') or ''} |"
            )
    lines += ["", "## Padded vs packed batches (`benchmark.py --batching`)", ""]
    lines.append(render_batching(report["batching"]) if report["batching"] else "Not run.")
    return "\n".join(lines) + "\n"


def build_report(work: Path, mode: str, steps: list[dict]) -> dict:
    tests = read_test_results(work / "gpu_tests.xml")
    bench = benchmark_rows(work / "benchmark" / "benchmark.json")
    batching = work / "batching" / "batching.json"
    measured_tokens = [row["mean_tokens_per_sample"] for row in bench["rows"] if row.get("mean_tokens_per_sample")]
    return {
        "mode": mode,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_info(),
        "versions": versions(),
        "sdpa_kernels": sdpa_kernels(round(measured_tokens[0]) if measured_tokens else DOCVQA_TOKENS),
        "setup": steps,
        "tests": tests,
        "benchmark": bench,
        "batching": json.loads(batching.read_text()) if batching.exists() else None,
        "verdict": verdict(steps, tests, bench),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the report's folder")
    parser.add_argument("--work", help="the folder with gpu_tests.xml and benchmark/ (default: --out)")
    parser.add_argument("--mode", choices=["gpu", "dry-run"], required=True)
    parser.add_argument("--step", action="append", default=[], help="NAME=STATUS:SECONDS[:DETAIL], repeatable")
    args = parser.parse_args(argv)
    out = Path(args.out)
    report = build_report(Path(args.work or args.out), args.mode, [parse_step(step) for step in args.step])
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report)
    (out / "gpu_check.md").write_text(markdown)
    print(markdown)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
