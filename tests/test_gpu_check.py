"""scripts/gpu_check.sh: its CPU dry run goes through every stage (the GPU tests skip, a tiny benchmark trains)
and writes the report; the report's reading of test results and its verdict."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from benchmarks.gpu_check import parse_step, read_test_results, render_markdown, sdpa_kernels, verdict

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"out": out, "json": json.loads((out / "gpu_check.json").read_text()),
            "md": (out / "gpu_check.md").read_text(), "stdout": done.stdout}


def test_a_spent_budget_runs_no_stage_and_reports_no_earlier_figures(tmp_path):
    """With nothing left of the budget every stage is reported as timed out without running (never `timeout 0`, which
    means no limit, nor a negative one), and the figures an earlier run left in OUT.work are not reported as new."""
    out = tmp_path / "out"
    stale = tmp_path / "out.work" / "batching" / "batching.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"rows": [{"layout": "packed", "tokens_per_s": 1.0}]}))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--budget", "0", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    report = json.loads((out / "gpu_check.json").read_text())
    steps = {step["name"]: step["status"] for step in report["setup"]}
    assert steps == {"environment": "ok", "gpu-tests": "timed out", "benchmark": "timed out",
                     "batching": "timed out"}, done.stdout[-3000:] + done.stderr[-3000:]
    assert report["batching"] is None and not stale.exists()


def test_dry_run_report_has_every_stage(dry_run):
    report = dry_run["json"]
    assert report["mode"] == "dry-run" and report["device"]["cuda"] is False
    assert {"python", "torch", "cuda", "cudnn", "transformers", "deepspeed", "peft", "accelerate"} <= set(report["versions"])
    assert sorted(path.name for path in dry_run["out"].iterdir()) == [
        "gpu_check.json", "gpu_check.md", "gpu_check_logs.tar.gz"]  # working files go to OUT.work
    steps = {step["name"]: step for step in report["setup"]}
    assert steps["environment"]["status"] == "ok"
    assert steps["gpu-tests"]["status"] == "ok" and steps["benchmark"]["status"] == "ok"
    assert all(isinstance(step["seconds"], int) for step in report["setup"])


def test_dry_run_collects_the_gpu_tests_which_skip_without_cuda(dry_run):
    tests = dry_run["json"]["tests"]
    assert tests["ran"] and tests["counts"]["skipped"] == len(tests["tests"]) >= 10
    assert not tests["counts"]["failed"] and not tests["counts"]["error"]
    names = {test["name"] for test in tests["tests"]}
    assert any(name.startswith("test_flash_matches_sdpa_on_a_padded_batch") for name in names)
    assert any(name.startswith("test_qlora_trains_with_finite_loss") for name in names)
    reasons = {test["name"]: test["message"] for test in tests["tests"]}
    assert reasons["test_bf16_logits_track_fp32_reference"] == "needs a CUDA GPU"
    assert all(reason in ("needs a CUDA GPU", "needs the flash-attn package", "needs two GPUs")
               for reason in reasons.values())


def test_dry_run_benchmark_row_is_measured(dry_run):
    rows = dry_run["json"]["benchmark"]["rows"]
    assert [(row["method"], row["status"]) for row in rows] == [("LoRA", "ok")]
    assert rows[0]["images_per_s"] > 0 and rows[0]["mfu"] is None  # no GPU: no utilisation figure
    assert dry_run["json"]["verdict"] == "pass"


def test_dry_run_measures_padded_and_packed_batches(dry_run):
    assert {step["name"]: step["status"] for step in dry_run["json"]["setup"]}["batching"] == "ok"
    rows = dry_run["json"]["batching"]["rows"]
    assert {row["layout"] for row in rows} >= {"padded", "packed"}
    assert all(row["tokens_per_s"] > 0 for row in rows)
    assert "## Padded vs packed batches (`benchmark.py --batching`)" in dry_run["md"]
    assert "| mixed lengths | packed |" in dry_run["md"]


def test_dry_run_markdown(dry_run):
    md = dry_run["md"]
    assert md.startswith("# GPU check (dry-run): PASS")
    assert "| environment | ok |" in md and "| LoRA | no | ok |" in md
    assert "## GPU tests (`pytest -m gpu`)" in md and "skipped" in md
    assert "- SDPA kernel, vision tower (577 positions): " in md
    assert md in dry_run["stdout"]


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_gpu" name="test_a" time="1.0"/>
<testcase classname="tests.test_gpu" name="test_b" time="1.0"><failure message="assert 1 == 2">trace</failure></testcase>
<testcase classname="tests.test_gpu" name="test_c" time="0.0"><skipped message="needs the flash-attn package"/></testcase>
</testsuite></testsuites>"""


def test_test_results_and_verdict(tmp_path):
    (tmp_path / "gpu_tests.xml").write_text(JUNIT)
    tests = read_test_results(tmp_path / "gpu_tests.xml")
    assert tests["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1}
    assert tests["tests"][1] == {"name": "test_b", "outcome": "failed", "message": "assert 1 == 2"}
    steps = [parse_step("environment=ok:95"), parse_step("flash-attn=not installed:3:no wheel")]
    assert steps[1] == {"name": "flash-attn", "status": "not installed", "seconds": 3, "detail": "no wheel"}
    bench = {"ran": True, "rows": [{"status": "ok"}]}
    assert verdict(steps, tests, bench) == "fail"  # a failed test
    passing = {**tests, "counts": {"passed": 1, "failed": 0, "error": 0, "skipped": 1}}
    assert verdict(steps, passing, bench) == "pass"  # flash-attn is optional
    assert verdict(steps, passing, {"ran": True, "rows": [{"status": "error"}]}) == "fail"
    assert verdict(steps, read_test_results(tmp_path / "missing.xml"), bench) == "fail"  # tests not run


def test_sdpa_kernels_name_torch_backends_for_each_attention_call():
    from torch.nn.attention import SDPBackend

    kernels = sdpa_kernels(300)
    assert list(kernels) == ["decoder, padded batch (300 tokens, mask)", "decoder, no padding (300 tokens, causal)",
                             "vision tower (577 positions)"]
    assert all(kernel.split()[0] in SDPBackend.__members__ for kernel in kernels.values())


def test_markdown_never_invents_figures():
    report = {"mode": "gpu", "verdict": "fail", "date": "d", "versions": {"torch": "x"}, "sdpa_kernels": {}, "setup": [],
              "device": {"cuda": False, "name": "CPU (no CUDA GPU)", "count": 0},
              "tests": {"ran": False, "counts": {}, "tests": []},
              "benchmark": {"ran": True, "model": "m", "rows": [
                  {"method": "QLoRA", "flash_attention": True, "status": "error", "reason": "CUDA out of memory"}]},
              "batching": None}
    md = render_markdown(report)
    assert "| QLoRA | yes | error | n/a | n/a | n/a | n/a | CUDA out of memory |" in md
    assert "Not run." in md
