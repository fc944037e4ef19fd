"""GPU paths that CPU CI cannot exercise, on the tiny models: bf16 numerics, flash attention against SDPA on a
padded batch with cached generation, training through the scripts in bf16 (flash and SDPA) and fp16 (DeepSpeed's
loss scaler), fp16 loss scaling under DDP, QLoRA in fp16 and bf16, placement on the local rank's GPU, and two
processes where the machine has two GPUs.

Run with `scripts/test.sh -m gpu` on a CUDA machine, or all of it with `scripts/gpu_check.sh`. Without CUDA
every test skips; tests that need flash-attn or a second GPU say so when they skip.
"""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from transformers.utils import is_flash_attn_2_available

from tests.scripts.e2e import (
    SCRIPTS,
    assert_finished_run,
    fast_args,
    finish,
    free_port,
    torchrun,
    write_cauldron,
)

pytestmark = pytest.mark.gpu
needs_flash = pytest.mark.skipif(not is_flash_attn_2_available(), reason="needs the flash-attn package")
needs_two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs"
)
EVAL_SIZE = 3
DEVICE = torch.device("cuda")


@pytest.fixture(scope="module")
def memes(tmp_path_factory):
    return write_cauldron(tmp_path_factory.mktemp("gpu") / "memes", "hateful_memes", 7, "disk")


def _case_inputs(fixture_dir, reference, device):
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


def _model(fixture_dir, dtype, attn):
    from transformers import AutoModelForCausalLM

    import common.phi3v  # noqa: F401  (registers phi3_v with the Auto classes)

    model = AutoModelForCausalLM.from_pretrained(
        fixture_dir / "tiny_phi3v", dtype=dtype, attn_implementation=attn, device_map={"": DEVICE}
    )
    return model.eval()


def _relative_error(value: torch.Tensor, expected: torch.Tensor) -> float:
    return float((value.float() - expected.float()).abs().max() / expected.float().abs().max())


def test_bf16_logits_track_fp32_reference(fixture_dir, reference):
    case, inputs = _case_inputs(fixture_dir, reference, "cuda")
    model = _model(fixture_dir, torch.bfloat16, "sdpa")
    with torch.no_grad():
        logits = model(**{**inputs, "pixel_values": inputs["pixel_values"].bfloat16()}).logits
    assert _relative_error(logits[:, case["logits"]["positions"]].cpu(), case["logits"]["values"]) < 0.05


def _padded_batch(fixture_dir):
    """Two prompts of different lengths (one image each, different sizes), left-padded as evaluation does."""
    from transformers import AutoProcessor

    from common.collators import Phi3VEvalCollator
    from common.data import Sample, Turn

    processor = AutoProcessor.from_pretrained(fixture_dir / "tiny_phi3v", num_crops=4)
    samples = [
        Sample("short", [Turn("Colour?", "red", [Image.new("RGB", (336, 336), (200, 30, 30))])]),
        Sample("long", [Turn("Which colour is the large document on this page, and what does it say?", "blue",
                             [Image.new("RGB", (700, 420), (30, 30, 200))])]),
    ]
    batch = Phi3VEvalCollator(processor)(samples)
    for key in ("ids", "references"):
        batch.pop(key)
    assert (batch["attention_mask"][0] == 0).any(), "the batch must be padded"
    return processor, {key: value.to(DEVICE) for key, value in batch.items()}


def _generate(model, batch, tokens=6):
    with torch.no_grad():
        inputs = {**batch, "pixel_values": batch["pixel_values"].to(model.dtype)}
        return model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, use_cache=True,
                              output_logits=True, return_dict_in_generate=True)


def _cached_logits_match_a_full_forward(model, batch, output) -> float:
    """Relative error between the logits of cached generation and one uncached forward over the same tokens."""
    generated = output.sequences.shape[1] - batch["input_ids"].shape[1]
    mask = torch.cat([batch["attention_mask"], batch["attention_mask"].new_ones(len(batch["attention_mask"]), generated)], 1)
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(input_ids=output.sequences, attention_mask=mask, position_ids=position_ids,
                     pixel_values=batch["pixel_values"].to(model.dtype), image_sizes=batch["image_sizes"]).logits
    cached = torch.stack(output.logits, dim=1)
    return _relative_error(cached, full[:, -generated - 1:-1])


@needs_flash
def test_flash_matches_sdpa_on_a_padded_batch_with_cached_generation(fixture_dir):
    _, batch = _padded_batch(fixture_dir)
    flash_model = _model(fixture_dir, torch.bfloat16, "flash_attention_2")
    sdpa_model = _model(fixture_dir, torch.bfloat16, "sdpa")
    flash, sdpa = _generate(flash_model, batch), _generate(sdpa_model, batch)
    # The prefill over the left-padded batch (flash's unpadded varlen path) agrees with SDPA...
    assert _relative_error(flash.logits[0], sdpa.logits[0]) < 0.03
    # ...and every cached decoding step agrees with an uncached forward over the same tokens.
    assert _cached_logits_match_a_full_forward(flash_model, batch, flash) < 0.03
    assert _cached_logits_match_a_full_forward(sdpa_model, batch, sdpa) < 0.03


def test_sdpa_cached_generation_on_a_padded_batch_matches_a_full_forward(fixture_dir):
    _, batch = _padded_batch(fixture_dir)
    model = _model(fixture_dir, torch.bfloat16, "sdpa")
    assert _cached_logits_match_a_full_forward(model, batch, _generate(model, batch)) < 0.03


# ---- training through the scripts ------------------------------------------------------------------------


def _script_run(tmp_path, tiny_model_dir, memes, *flags):
    output_dir = tmp_path / "out"
    args = fast_args(tiny_model_dir, output_dir, "--dataset_path", memes, "--eval_size", str(EVAL_SIZE), *flags)
    process = torchrun(SCRIPTS["hateful_memes"], args, "--nproc_per_node=1", f"--master_port={free_port()}",
                       cwd=tmp_path)
    return finish(process), output_dir


@pytest.mark.parametrize(
    "strategy, flags, precision",
    [
        pytest.param("lora", ["--use_lora", "--bf16", "--use_flash_attention"],
                     "bf16 autocast, weights loaded in bfloat16, attention flash_attention_2", marks=needs_flash,
                     id="lora-bf16-flash"),
        pytest.param("full", ["--bf16", "--use_flash_attention"],
                     "bf16 autocast, weights loaded in bfloat16, attention flash_attention_2", marks=needs_flash,
                     id="full-bf16-flash"),
        pytest.param("full", ["--bf16"], "bf16 autocast, weights loaded in float32, attention sdpa", id="full-bf16"),
        pytest.param("full", [], "fp16 mixed precision (loss scaling), weights loaded in float32, attention sdpa",
                     id="full-fp16"),
    ],
)
def test_training_through_the_script(strategy, flags, precision, tmp_path, tiny_model_dir, memes):
    result, output_dir = _script_run(tmp_path, tiny_model_dir, memes, *flags)
    assert_finished_run(result, output_dir, strategy, tiny_model_dir, num_eval=EVAL_SIZE)
    assert precision in result.stdout


# ---- in-process training on the GPU ----------------------------------------------------------------------


def _trainer(tiny_model_dir, tmp_path, precision, *flags):
    """A trainer on this process's GPU (as `python SCRIPT` would set it up) with the given precision."""
    from transformers import AutoProcessor

    from common.arguments import build_parser, resolve_run_config
    from common.collators import Phi3VTrainCollator
    from common.distributed import start_distributed
    from common.model_loading import build_model
    from common.trainer import FinetuningTrainer
    from common.training_arguments import training_arguments
    from tests.common.test_trainer import samples

    config = resolve_run_config(build_parser("gpu").parse_args([
        "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path), "--lora_rank", "4",
        "--batch_size", "2", "--batch_size_per_gpu", "2", "--num_crops", "1", "--warmup_steps", "0",
        "--learning_rate", "1e-3", "--dataloader_num_workers", "0", "--logging_steps", "1", "--no-tqdm", *flags,
    ]))
    distributed = start_distributed(config.strategy.uses_deepspeed)
    train_args = training_arguments(config.training, config.outputs, config.strategy, precision, distributed)
    model = build_model(config.model.name_or_path, config.strategy, config.lora, precision, distributed.device)
    processor = AutoProcessor.from_pretrained(tiny_model_dir, num_crops=1)
    return FinetuningTrainer(model=model, args=train_args, train_dataset=samples(6),
                             data_collator=Phi3VTrainCollator(processor))


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_fp16_lora_trains_with_loss_scaling(tiny_model_dir, tmp_path):
    from common.precision import resolve_precision

    precision = resolve_precision(bf16=False, use_flash_attention=False)
    assert precision.fp16 and precision.load_dtype == torch.float32
    trainer = _trainer(tiny_model_dir, tmp_path, precision, "--use_lora", "--max_steps", "3")
    trainer.train()
    scaler = trainer.accelerator.scaler
    assert scaler is not None and scaler.get_scale() > 1  # dynamic loss scaling is on
    losses = _losses(trainer)
    assert len(losses) == 3 and all(math.isfinite(loss) and loss > 0 for loss in losses)


@pytest.mark.parametrize(
    "compute_dtype, autocast_dtype",
    [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.bfloat16)],
    ids=["fp16", "bf16", "fp16-compute-bf16-autocast"],  # the last: the recipe's --bf16 without flash attention
)
def test_qlora_trains_with_finite_loss_and_vision_adapter_gradients(compute_dtype, autocast_dtype, tiny_model_dir,
                                                                    tmp_path):
    from common.precision import Precision

    bf16 = autocast_dtype == torch.bfloat16
    precision = Precision(torch.float32, bf16=bf16, fp16=not bf16, attn_implementation="sdpa",
                          compute_dtype=compute_dtype)
    trainer = _trainer(tiny_model_dir, tmp_path, precision, "--use_qlora", "--max_steps", "1")
    model = trainer.model
    assert next(p for n, p in model.named_parameters() if "qkv_proj.base_layer" in n).dtype == torch.uint8
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {key: value.to("cuda") for key, value in batch.items()}
    model.train()
    with torch.autocast("cuda", dtype=autocast_dtype):
        loss = model(**batch).loss
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    vision_b = {n: p.grad for n, p in model.named_parameters() if ".vision_model." in n and ".lora_B." in n}
    assert vision_b and all(grad is not None and grad.abs().sum() > 0 for grad in vision_b.values())
    projection_b = [p.grad for n, p in model.named_parameters() if "img_projection" in n and ".lora_B." in n]
    assert projection_b and all(grad.abs().sum() > 0 for grad in projection_b)


@pytest.mark.parametrize("name", ["full", "lora", "qlora"])
def test_models_load_straight_onto_the_local_gpu(name, tiny_model_dir):
    from common.config import LoraSettings
    from common.model_loading import build_model
    from common.precision import resolve_precision
    from common.strategy import STRATEGIES

    device = torch.device("cuda", torch.cuda.device_count() - 1)  # not the default device when there are several
    model = build_model(str(tiny_model_dir), STRATEGIES[name], LoraSettings(4, 2, 0.0), resolve_precision(True, False),
                        device)
    assert {p.device for p in model.parameters()} == {device}


@needs_two_gpus
@pytest.mark.parametrize("flags", [[], ["--use_lora"]], ids=["full-zero2", "lora-ddp"])
def test_two_processes_on_two_gpus(flags, tmp_path, tiny_model_dir, memes):
    output_dir = tmp_path / "out"
    args = fast_args(tiny_model_dir, output_dir, "--dataset_path", memes, "--eval_size", str(EVAL_SIZE),
                     "--batch_size", "4", "--batch_size_per_gpu", "1", "--bf16", *flags)
    result = finish(torchrun(SCRIPTS["hateful_memes"], args, "--nproc_per_node=2", f"--master_port={free_port()}",
                             cwd=tmp_path))
    assert_finished_run(result, output_dir, "lora" if flags else "full", tiny_model_dir, num_eval=EVAL_SIZE)
    assert "on 2 process(es)" in result.stdout
