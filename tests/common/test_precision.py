"""common/precision.py: dtypes, mixed-precision flags and attention kernel from the flags and the hardware."""

import logging

import pytest
import torch

import common.precision as precision_module
from common.errors import UsageError
from common.precision import Precision, resolve_precision


@pytest.mark.parametrize("bf16", [False, True])
def test_cpu_falls_back_to_fp32_with_one_warning(bf16, caplog):
    with caplog.at_level(logging.WARNING, logger="common.precision"):
        precision = resolve_precision(bf16=bf16, use_flash_attention=False, cuda_available=False)
    assert precision == Precision(
        load_dtype=torch.float32, bf16=False, fp16=False, attn_implementation="sdpa", compute_dtype=torch.float32
    )
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "No CUDA GPU" in warnings[0].getMessage() and "fp32" in warnings[0].getMessage()


def test_gpu_bf16(caplog):
    with caplog.at_level(logging.WARNING, logger="common.precision"):
        precision = resolve_precision(bf16=True, use_flash_attention=False, cuda_available=True)
    assert precision.load_dtype == torch.bfloat16
    assert precision.bf16 is True and precision.fp16 is False
    assert precision.compute_dtype == torch.bfloat16
    assert precision.attn_implementation == "sdpa"
    assert not caplog.records  # nothing to warn about on a GPU


def test_gpu_without_bf16_is_fp16_mixed_precision_on_fp32_weights():
    precision = resolve_precision(bf16=False, use_flash_attention=False, cuda_available=True)
    assert precision.load_dtype == torch.float32  # fp32 master weights (the recipe loads in fp32 for fp16 AMP)
    assert precision.fp16 is True and precision.bf16 is False
    assert precision.compute_dtype == torch.float16
    assert precision.attn_implementation == "sdpa"


def test_cuda_availability_is_detected_when_not_given(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision(bf16=True, use_flash_attention=False).load_dtype == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_precision(bf16=True, use_flash_attention=False).load_dtype == torch.bfloat16


@pytest.mark.parametrize("bf16", [False, True])
def test_flash_attention_without_cuda_names_the_gpu_need(bf16):
    with pytest.raises(UsageError) as info:
        resolve_precision(bf16=bf16, use_flash_attention=True, cuda_available=False)
    message = str(info.value)
    assert "--use_flash_attention" in message and "CUDA GPU" in message


def test_flash_attention_without_the_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(precision_module, "is_flash_attn_2_available", lambda: False)
    with pytest.raises(UsageError) as info:
        resolve_precision(bf16=True, use_flash_attention=True, cuda_available=True)
    message = str(info.value)
    assert "flash-attn" in message
    assert "pip install" in message and "flash-attn --no-build-isolation" in message


def test_flash_attention_without_bf16_explains_why(monkeypatch):
    monkeypatch.setattr(precision_module, "is_flash_attn_2_available", lambda: True)
    with pytest.raises(UsageError) as info:
        resolve_precision(bf16=False, use_flash_attention=True, cuda_available=True)
    message = str(info.value)
    assert "requires --bf16" in message
    assert "fp16 mixed precision" in message and "fp32" in message  # the reason, not just the rule


def test_flash_attention_with_bf16_on_gpu(monkeypatch):
    monkeypatch.setattr(precision_module, "is_flash_attn_2_available", lambda: True)
    precision = resolve_precision(bf16=True, use_flash_attention=True, cuda_available=True)
    assert precision == Precision(
        load_dtype=torch.bfloat16, bf16=True, fp16=False, attn_implementation="flash_attention_2",
        compute_dtype=torch.bfloat16,
    )


def test_precision_is_immutable():
    precision = resolve_precision(bf16=False, use_flash_attention=False, cuda_available=True)
    with pytest.raises(AttributeError):
        precision.fp16 = False
