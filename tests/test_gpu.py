"""GPU paths that CPU CI cannot exercise: bf16, flash attention, and a bf16 + flash training run.

Run on a CUDA machine with `scripts/test.sh -m gpu` (flash tests also need the flash-attn package).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.utils import is_flash_attn_2_available

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parent.parent
needs_flash = pytest.mark.skipif(not is_flash_attn_2_available(), reason="needs flash-attn")


def _case_inputs(fixture_dir, reference, device):
    from PIL import Image
    from transformers import AutoProcessor

    case = reference["cases"]["single_image"]
    processor = AutoProcessor.from_pretrained(fixture_dir / "tiny_phi3v", num_crops=case["num_crops"])
    images = [Image.open(fixture_dir / "images" / name) for name in case["images"]]
    pixels = processor(case["prompt"], images, return_tensors="pt")
    return case, {
        "input_ids": case["input_ids"].to(device),
        "pixel_values": pixels["pixel_values"].to(device),
        "image_sizes": pixels["image_sizes"].to(device),
    }


def _logits(fixture_dir, inputs, dtype, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fixture_dir / "tiny_phi3v", dtype=dtype, attn_implementation=attn)
    model = model.to("cuda").eval()
    with torch.no_grad():
        return model(**{**inputs, "pixel_values": inputs["pixel_values"].to(dtype)}).logits.float()


def test_bf16_logits_track_fp32_reference(fixture_dir, reference):
    import common  # noqa: F401

    case, inputs = _case_inputs(fixture_dir, reference, "cuda")
    logits = _logits(fixture_dir, inputs, torch.bfloat16, "sdpa")[:, case["logits"]["positions"]].cpu()
    expected = case["logits"]["values"]
    assert (logits - expected).abs().max() / expected.abs().max() < 0.05


@needs_flash
def test_flash_attention_matches_sdpa_in_bf16(fixture_dir, reference):
    import common  # noqa: F401

    _, inputs = _case_inputs(fixture_dir, reference, "cuda")
    flash = _logits(fixture_dir, inputs, torch.bfloat16, "flash_attention_2")
    sdpa = _logits(fixture_dir, inputs, torch.bfloat16, "sdpa")
    assert (flash - sdpa).abs().max() / sdpa.abs().max() < 0.02


@needs_flash
def test_bf16_flash_lora_run_through_the_script(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    from PIL import Image

    lines = []
    for index, colour in enumerate(["red", "green", "blue", "red"]):
        Image.new("RGB", (64, 48), colour).save(data / "images" / f"{index}.png")
        lines.append(json.dumps({"id": str(index), "conversations": [
            {"images": [f"{index}.png"], "user": "Which colour?", "assistant": colour}]}))
    for split in ("train", "val"):
        (data / f"toy_{split}.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, str(REPO / "finetune_hf_trainer_ucf101.py"), "--model_name_or_path", str(tiny_model_dir),
         "--data_dir", str(data), "--output_dir", str(out), "--bf16", "--use_flash_attention", "--use_lora",
         "--batch_size", "2", "--batch_size_per_gpu", "2", "--max_steps", "2", "--num_crops", "1",
         "--max_new_tokens", "4", "--dataloader_num_workers", "0", "--no-tqdm"],
        check=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True,
    )
    assert "load_dtype=torch.bfloat16, bf16=True" in run.stdout
    assert "attn_implementation='flash_attention_2'" in run.stdout
    assert json.loads((out / "eval_after.json").read_text())["num_samples"] == 4
