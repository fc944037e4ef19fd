"""common.tiny_model: the tiny random Phi-3-V checkpoint factory used by tests, the demo and smoke runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoProcessor

from common.phi3v import Phi3VForCausalLM, Phi3VProcessor
from common.tiny_model import write_tiny_phi3v

SPECIAL_TOKENS = ["<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>", "<|system|>"]
UNICODE_TEXT = "Grüße, 世界! naïve café — ∑x² ≤ 10 🚀🙂\tdone.\nЁж ελληνικά עברית"


@pytest.fixture(scope="module")
def processor(tiny_model_dir) -> Phi3VProcessor:
    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> Phi3VForCausalLM:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def _assert_same_weights(folder_a: Path, folder_b: Path) -> None:
    a, b = load_file(folder_a / "model.safetensors"), load_file(folder_b / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)


def _image(width: int = 500, height: int = 380) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_factory_is_fast_deterministic_and_seeded(tiny_model_dir, tmp_path):
    start = time.perf_counter()
    again = write_tiny_phi3v(tmp_path / "again", seed=0)
    assert time.perf_counter() - start < 20
    assert again == tmp_path / "again"
    for name in ("config.json", "model.safetensors", "generation_config.json", "preprocessor_config.json"):
        assert (again / name).is_file(), name
    _assert_same_weights(again, tiny_model_dir)

    other = load_file(write_tiny_phi3v(tmp_path / "other", seed=1) / "model.safetensors")
    same = load_file(tiny_model_dir / "model.safetensors")
    assert not torch.equal(other["model.embed_tokens.weight"], same["model.embed_tokens.weight"])


def test_folder_loads_with_auto_classes(tiny_model_dir, model, processor):
    assert isinstance(model, Phi3VForCausalLM)
    assert isinstance(processor, Phi3VProcessor)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "phi3_v"
    assert config["architectures"] == ["Phi3VForCausalLM"]
    assert config["rope_scaling"]["type"] == "su"
    assert model.config.vocab_size >= len(processor.tokenizer)
    assert model.config.vision_config.image_size == 336 and model.config.vision_config.patch_size == 14
    assert processor.image_processor.num_crops == 4


def test_tokenizer_round_trips_unicode_and_adds_bos(processor):
    tokenizer = processor.tokenizer
    ids = tokenizer(UNICODE_TEXT).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == UNICODE_TEXT
    assert tokenizer.decode(tokenizer(UNICODE_TEXT, add_special_tokens=False).input_ids) == UNICODE_TEXT


def test_tokenizer_knows_the_special_tokens(processor):
    tokenizer = processor.tokenizer
    for token in SPECIAL_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert token_id is not None and token_id != tokenizer.unk_token_id, token
        assert tokenizer(token, add_special_tokens=False).input_ids == [token_id], token
        assert tokenizer.decode([token_id]) == token
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token_id is not None


def test_chat_template_renders_like_the_real_one(processor):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<|image_1|>\nWhat is this?"},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Sure?"},
    ]
    rendered = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\n<|image_1|>\nWhat is this?<|end|>\n"
        "<|assistant|>\nA cat.<|end|>\n<|user|>\nSure?<|end|>\n<|assistant|>\n"
    )
    single = [{"role": "user", "content": "Hi"}]
    assert (
        processor.apply_chat_template(single, add_generation_prompt=True)
        == "<|user|>\nHi<|end|>\n<|assistant|>\n"
    )
    # No generation prompt after an assistant turn, as the original template.
    assert processor.tokenizer.apply_chat_template(
        messages[:3], tokenize=False, add_generation_prompt=True
    ).endswith("A cat.<|end|>\n")


def test_forward_and_generate_with_an_image(model, processor):
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": "<|image_1|>\nWhat is shown?"}], add_generation_prompt=True
    )
    inputs = processor(prompt, images=[_image()])
    assert (inputs["input_ids"] < 0).sum() > 0
    with torch.no_grad():
        output = model(**inputs, labels=inputs["input_ids"].clamp(min=0))
    assert output.logits.shape == (*inputs["input_ids"].shape, model.config.vocab_size)
    assert torch.isfinite(output.loss)

    eos = processor.tokenizer.eos_token_id
    with torch.no_grad():
        generated = model.generate(
            **inputs, max_new_tokens=4, do_sample=False, eos_token_id=eos, pad_token_id=eos
        )
    prompt_length = inputs["input_ids"].shape[1]
    assert torch.equal(generated[:, :prompt_length], inputs["input_ids"])
    assert 1 <= generated.shape[1] - prompt_length <= 4


def test_cli_writes_a_loadable_folder(tiny_model_dir, tmp_path):
    out = tmp_path / "cli_model"
    repo_root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-m", "common.tiny_model", str(out), "--seed", "0", "--num_crops", "1"],
        cwd=repo_root,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert str(out) in result.stdout
    _assert_same_weights(out, tiny_model_dir)
    assert AutoProcessor.from_pretrained(out).image_processor.num_crops == 1
    assert json.loads((out / "preprocessor_config.json").read_text())["num_crops"] == 1
