"""benchmark.py and benchmarks/: the CPU smoke run through the real CLI, the FLOPs/MFU formulas and the synthetic
DocVQA page."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import benchmark
from benchmarks.configs import OFFICIAL_CONFIG, base_row
from benchmarks.flops import ModelDims, peak_flops_for, training_flops, utilization
from benchmarks.report import flag_data_bound, render_markdown
from benchmarks.synthetic import (
    RECIPE_TOKENS_PER_SAMPLE,
    docvqa_dataset,
    image_layout,
    sample_lengths,
    synthetic_page,
)
from benchmarks.worker import StepTimer

REPO = Path(__file__).resolve().parent.parent
SMOKE_CROPS = 1  # the tiny smoke run keeps sequences short; the full-size token count is checked separately


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    """One CLI run: full and LoRA without flash (trained), with flash (refused on CPU, reported as rows)."""
    out = tmp_path_factory.mktemp("bench")
    command = [
        sys.executable, str(REPO / "benchmark.py"), "--tiny", "--num_crops", str(SMOKE_CROPS),
        "--strategies", "full,lora", "--flash", "both", "--steps", "2", "--warmup_steps", "1",
        "--batch_size", "1", "--dataloader_num_workers", "0", "--data_samples", "2", "--num_pages", "2",
        "--output_dir", str(out / "results"), "--cache_dir", str(out / "cache"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1"}  # tiny matmuls: threads only spin, worse on a busy CI machine
    done = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = out / "results"
    return {"dir": results, "json": json.loads((results / "benchmark.json").read_text()),
            "md": (results / "benchmark.md").read_text(), "stdout": done.stdout}


def _rows(smoke) -> dict:
    return {(row["strategy"], row["flash_attention"]): row for row in smoke["json"]["rows"]}


def test_smoke_rows_one_per_configuration(smoke):
    rows = _rows(smoke)
    assert set(rows) == {("full", False), ("full", True), ("lora", False), ("lora", True)}
    table = [line for line in smoke["md"].splitlines() if line.startswith("| ") and "Training method" not in line]
    assert len(table) == 4
    for strategy in ("full", "lora"):
        row = rows[strategy, False]
        assert row["status"] == "ok", row
        assert row["images_per_s"] > 0 and row["samples_per_s"] > 0 and row["tokens_per_s"] > 0
        assert row["gpus"] == 0 and row["nodes"] == 1 and row["steps"] == 2
        assert row["peak_mem_allocated_gib"] is None and row["mfu"] is None  # CPU
        assert row["model_flops_per_sample"] > 0
        assert 0 <= row["data_wait_fraction"] < 1
    assert rows["full", False]["deepspeed"] and not rows["lora", False]["deepspeed"]
    assert rows["lora", False]["trainable_params"] < rows["lora", False]["total_params"]
    ok_lines = [line for line in table if "0 (CPU)" in line]
    assert len(ok_lines) == 2 and all("| n/a |" in line for line in ok_lines)  # MFU and peak memory


def test_smoke_tokens_per_sample(smoke):
    _, image_tokens = image_layout((1700, 2200), SMOKE_CROPS)
    measured = smoke["json"]["meta"]["mean_tokens_per_sample"]
    # The image span plus the chat template, a DocVQA question and a short answer.
    assert image_tokens + 15 < measured < image_tokens + 100
    assert smoke["json"]["meta"]["data_path"]["mean_tokens_per_sample"] == pytest.approx(measured, abs=20)


def test_smoke_flash_on_cpu_is_a_row_with_the_reason(smoke):
    for strategy in ("full", "lora"):
        row = _rows(smoke)[strategy, True]
        assert row["status"] == "skipped"
        assert "CUDA" in row["reason"]
    assert "needs a CUDA GPU" in smoke["md"]


def test_smoke_data_path_measured(smoke):
    data = smoke["json"]["meta"]["data_path"]
    assert data["samples_per_s_per_core"] > 0 and data["cores"] >= 1
    assert data["capacity_samples_per_s"] == pytest.approx(data["samples_per_s_per_core"] * data["cores"])
    assert "samples/s per core" in smoke["md"]
    for row in _rows(smoke).values():
        if row["status"] == "ok":
            assert isinstance(row["data_limited"], bool)


def test_smoke_writes_rows_and_logs(smoke):
    assert len(list((smoke["dir"] / "rows").glob("*.json"))) == 4
    assert (smoke["dir"] / "logs" / "lora_flash-off.log").exists()


def test_worker_error_becomes_a_row(tmp_path, monkeypatch):
    """Under a user's own launcher (`--worker`), a configuration that cannot run writes its reason, no crash."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = tmp_path / "row.json"
    code = benchmark.main(["--worker", "--tiny", "--num_crops", "1", "--strategies", "lora", "--flash", "on",
                           "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"),
                           "--num_pages", "1", "--worker_result", str(result)])
    row = json.loads(result.read_text())
    assert code == 1 and row["status"] == "error" and "CUDA" in row["reason"]


# ---- FLOPs and MFU -------------------------------------------------------------------------------------------

TOY = ModelDims(hidden=4, intermediate=8, layers=1, heads=1, kv_heads=1, vocab=10)  # no vision tower


def test_full_finetuning_flops_are_palm_formula():
    # Decoder layer: qkv 4x12 + o 4x4 + gate_up 4x16 + down 8x4 = 160; lm_head 40; N = 200.
    seq = 2
    flops = training_flops(TOY, seq, crops=0, image_tokens=0, strategy="full")
    assert flops["model"] == seq * (6 * 200 + 12 * TOY.layers * TOY.hidden * seq)  # 6N + 12·L·d·s per token
    assert flops["forward"] == seq * (2 * 200 + 4 * TOY.layers * TOY.hidden * seq)
    # Gradient checkpointing recomputes the decoder layers' forward (not the lm_head).
    assert flops["hardware"] == flops["model"] + seq * (2 * 160 + 4 * TOY.hidden * seq)


def test_lora_flops_pass_gradients_through_frozen_weights():
    seq, rank = 2, 1
    flops = training_flops(TOY, seq, crops=0, image_tokens=0, strategy="lora", lora_rank=rank)
    base, attention = 2 * 200 * seq, 4 * TOY.hidden * seq**2
    adapters = 2 * rank * ((4 + 12) + (4 + 4) + (4 + 16) + (8 + 4) + (4 + 10)) * seq  # forward of the adapters
    # Frozen base: forward + activation gradients (1x); attention backward 2x; adapters 3x their forward.
    assert flops["model"] == 2 * base + 3 * attention + 3 * adapters


def test_frozen_vision_tower_costs_only_its_forward():
    dims = ModelDims(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=2, vocab=32, vision_hidden=4,
                     vision_intermediate=8, vision_layers=3, vision_feature_layers=2, patch_size=14, image_size=28)
    seq, crops, image_tokens = 20, 3, 10
    text_only = training_flops(dims, seq, 0, 0, "frozen")["model"]
    frozen = training_flops(dims, seq, crops, image_tokens, "frozen")
    tokens = crops * dims.vision_tokens_per_crop  # 5 CLIP tokens per crop (2x2 patches + CLS)
    layer = 2 * (4 * 4 * 4 + 2 * 4 * 8) * tokens + 4 * crops * dims.vision_tokens_per_crop**2 * 4
    conv = 2 * (3 * 14 * 14 * 4) * crops * 4
    projection = 2 * (16 * 8 + 8 * 8) * image_tokens
    assert frozen["model"] - text_only == 3 * layer + conv + projection  # all 3 layers run, nothing backward
    assert frozen["hardware"] - training_flops(dims, seq, 0, 0, "frozen")["hardware"] == 3 * layer + conv + projection
    assert training_flops(dims, seq, crops, image_tokens, "full")["model"] > frozen["model"]


def test_phi35_vision_flops_per_token():
    from common.phi3v import Phi3VConfig

    dims = ModelDims.from_config(Phi3VConfig.from_json_file(str(OFFICIAL_CONFIG)))
    assert 4.0e9 < dims.matmul_params() < 4.2e9  # 4.15B parameters minus the 98M embedding table
    crops, image_tokens = image_layout((1700, 2200), 16)
    assert (crops, image_tokens) == (17, 2509)
    seq = 2540
    full = training_flops(dims, seq, crops, image_tokens, "full")
    assert 2.95 < full["model"] / full["forward"] <= 3  # all trainable (the unused last CLIP layer: forward only)
    # 6N per token for the 3.72B decoder + lm_head (22.3 GFLOP), attention 12·L·d·s (3.0), and the CLIP
    # tower over 17 crops x 577 tokens (~3.9 CLIP tokens per sequence token: ~7.5 more).
    per_token = full["model"] / seq
    assert 30e9 < per_token < 36e9
    frozen = training_flops(dims, seq, crops, image_tokens, "frozen")["model"]
    lora = training_flops(dims, seq, crops, image_tokens, "lora")["model"]
    assert lora < frozen < full["model"]


def test_utilization_and_peak_table():
    assert utilization(1e12, samples_per_s=10, peak_flops_per_gpu=100e12, gpus=2) == pytest.approx(0.05)
    assert utilization(1e12, 10, None, 1) is None
    assert utilization(1e12, 10, 100e12, 0) is None
    assert peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for("NVIDIA H200") == 989e12
    assert peak_flops_for("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for("Tesla T4") is None


def test_data_limited_flag_and_markdown():
    row = {**base_row(benchmark.build_benchmark_parser().parse_args([]), "lora", True),
           "status": "ok", "samples_per_s": 12.0, "nodes": 1, "gpus": 1, "images_per_s": 12.0,
           "images_per_s_per_gpu": 12.0, "mfu": 0.3, "peak_mem_allocated_gib": 20.0, "data_wait_fraction": 0.1,
           "precision": "bf16", "mean_tokens_per_sample": 2540.0, "device": "NVIDIA H100 80GB HBM3"}
    data = {"samples_per_s_per_core": 3.0, "cores": 2, "capacity_samples_per_s": 6.0, "mean_tokens_per_sample": 2540.0}
    flag_data_bound([row], data)
    assert row["data_limited"] is True
    args = benchmark.build_benchmark_parser().parse_args([])
    report = {"meta": {"device": "H100 x 1", "date": "today", "host": "h", "cores": 2, "versions": {"torch": "x"},
                       "model": "m", "precision": "bf16", "page_size": "1700x2200", "num_crops": 16,
                       "mean_tokens_per_sample": 2540.0, "warmup_steps": args.warmup_steps, "steps": args.steps,
                       "data_path": data}, "rows": [row]}
    text = render_markdown(report)
    assert "| LoRA | 1 | 1 | ✓ | 16 | 12.000 | 12.000 | 30.0% | 20.0 |" in text  # the default global batch
    assert "⚠" in text


def test_step_timer_window():
    timer = StepTimer(warmup_steps=1, steps=2)
    state = type("State", (), {"global_step": 0})()
    for step in (1, 2, 3):
        timer.on_step_begin(None, state, None)
        state.global_step = step
        timer.on_step_end(None, state, None)
    assert timer.seconds >= 0 and timer.data_wait >= 0
    with pytest.raises(RuntimeError):
        _ = StepTimer(1, 5).seconds


# ---- the synthetic DocVQA page ---------------------------------------------------------------------------------


def test_synthetic_page_is_deterministic_document():
    page = synthetic_page(3)
    assert page.size == (1700, 2200) and page.mode == "RGB"
    assert page.tobytes() == synthetic_page(3).tobytes()
    assert page.tobytes() != synthetic_page(4).tobytes()
    dark = sum(page.convert("L").point(lambda v: 255 if v < 128 else 0).histogram()[255:])
    assert 0.05 < dark / (1700 * 2200) < 0.5  # text-like ink coverage


def test_page_tokens_at_num_crops_16_match_the_recipe(tmp_path):
    from common.collators import Phi3VTrainCollator
    from common.phi3v import Phi3VImageProcessor, Phi3VProcessor
    from common.tiny_model import build_tokenizer

    page = tmp_path / "page.png"
    synthetic_page(0).save(page)
    dataset = docvqa_dataset([page], 4)
    processor = Phi3VProcessor(Phi3VImageProcessor(num_crops=16), build_tokenizer())
    batch = Phi3VTrainCollator(processor)([dataset[i] for i in range(2)])
    tokens = batch["attention_mask"].sum(dim=1).tolist()
    assert batch["pixel_values"].shape == (2, 17, 3, 336, 336)
    for count in tokens:
        assert abs(count - RECIPE_TOKENS_PER_SAMPLE) <= 0.15 * RECIPE_TOKENS_PER_SAMPLE
    assert sample_lengths(processor, dataset, (1700, 2200), limit=2) == tokens


@pytest.mark.slow  # two minutes of CPU: eight layouts of clips, pages and text turns
def test_batching_compares_padded_and_packed_on_both_sets(tmp_path):
    """--batching: one row per set and layout, the same real tokens in each, packing never pads more."""
    command = [
        sys.executable, str(REPO / "benchmark.py"), "--tiny", "--batching", "--num_crops", str(SMOKE_CROPS),
        "--batch_size_per_gpu", "4", "--num_pages", "2", "--output_dir", str(tmp_path / "results"),
        "--cache_dir", str(tmp_path / "cache"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "results" / "batching.json").read_text())
    rows = {(row["set"], row["layout"]): row for row in report["rows"]}
    assert {name for name, _ in rows} == {"DocVQA pages", "mixed lengths"} and len(rows) == 8
    for set_name in ("DocVQA pages", "mixed lengths"):
        padded, packed = rows[set_name, "padded"], rows[set_name, "packed"]
        assert padded["speedup"] == 1.0 and packed["tokens"] == padded["tokens"] > 0
        assert packed["padding_fraction"] <= padded["padding_fraction"]
        assert packed["tokens_per_s"] > 0 and packed["peak_memory_gib"] is None  # CPU: no GPU memory figure
    assert rows["mixed lengths", "padded"]["padding_fraction"] > 0.3  # clips, pages and text turns padded together
    table = (tmp_path / "results" / "batching.md").read_text()
    assert "| mixed lengths | packed |" in table and "vs padded" in table
