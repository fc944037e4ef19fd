"""Every configuration in a fresh process (torchrun when > 1 process), with a timeout and a log, then the report."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.assets import prepare_assets
from benchmarks.configs import REPO, base_row, config_name, error_reason
from benchmarks.report import fmt, write_report
from benchmarks.synthetic import time_data_path
from benchmarks.worker import auto_workers
from common.errors import UsageError, UserError
from common.precision import resolve_precision
from common.strategy import STRATEGIES

ENTRY_POINT = REPO / "benchmark.py"  # the workers run the same command line with --worker


def flash_refusal(args) -> str | None:
    """Why flash attention cannot run here (no CUDA, pre-Ampere GPU, no flash-attn), or None."""
    try:
        resolve_precision(args.bf16, True)
    except UsageError as error:
        return error_reason(error)
    return None


def flash_settings(args) -> list[bool]:
    """--flash as the configurations to run; auto: flash attention where it can run, SDPA otherwise."""
    if args.flash == "auto":
        return [flash_refusal(args) is None]
    return {"both": [False, True], "on": [True], "off": [False]}[args.flash]


def precheck(args, strategy: str, flash: bool) -> str | None:
    """Why a configuration cannot run on this machine, found without starting it (None: try it)."""
    if strategy not in STRATEGIES:
        return f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}"
    if flash and (refusal := flash_refusal(args)) is not None:
        return refusal
    if STRATEGIES[strategy].quantize_4bit and importlib.util.find_spec("bitsandbytes") is None:
        return "QLoRA needs the bitsandbytes package (pip install bitsandbytes)"
    return None


def worker_command(args, argv: list[str], strategy: str, flash: bool, result: Path) -> list[str]:
    """This run's command line with --worker for one configuration: plain python for one process, else torchrun."""
    worker_argv = [*argv, "--worker", "--strategies", strategy, "--flash", "on" if flash else "off",
                   "--worker_result", str(result), "--dataloader_num_workers", str(args.dataloader_num_workers)]
    script = str(ENTRY_POINT)
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
    """One configuration in a fresh process (rows/<config>.json, logs/<config>.log): its row, or a row with the
    reason it was skipped, failed or timed out."""
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
    # Every process torchrun starts imports `common` and `benchmarks` from this checkout.
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


def measure_data_path(args, model_path: str, pages: list[Path]) -> dict:
    """`time_data_path` over --data_samples, or {"error": reason} (skipped, or failed)."""
    if args.data_samples < 1:
        return {"error": "skipped (--data_samples 0)"}
    try:
        return time_data_path(model_path, pages, args, args.data_samples)
    except Exception as error:  # noqa: BLE001  (a report without the data line beats no report)
        return {"error": error_reason(error)}


def run_all(args, argv: list[str]) -> dict:
    """Every configuration of --strategies x --flash, one after the other, and the report (rewritten after each)."""
    strategies = [s for s in args.strategies.split(",") if s]
    flashes = flash_settings(args)
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
                      f"MFU {fmt(row['mfu'], 3)}, peak {fmt(row['peak_mem_allocated_gib'], 1)} GiB", flush=True)
            else:
                print(f"  {row['status']}: {row.get('reason')}", flush=True)
            if args.node_rank == 0:  # partial results survive a later crash
                write_report(args, rows, data_path)
    return write_report(args, rows, data_path)


def collect(args) -> dict:
    """The report from every rows/*.json in --output_dir (configurations run with --worker under any launcher)."""
    rows = [json.loads(p.read_text()) for p in sorted((Path(args.output_dir) / "rows").glob("*.json"))]
    if not rows:
        raise UserError(f"no rows/*.json in {args.output_dir}")
    model_path, pages = prepare_assets(args)
    data_path = measure_data_path(args, model_path, pages)
    order = list(STRATEGIES)
    rows.sort(key=lambda r: (order.index(r["strategy"]) if r["strategy"] in order else 99, r["flash_attention"]))
    return write_report(args, rows, data_path)
