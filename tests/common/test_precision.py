"""common/precision.py: load/compute dtypes, mixed-precision flags and attention kernel per flag combination,
checked against faked GPUs (compute capability) and the CPU, where the precision flags mean what they mean on a
GPU."""

import logging

import pytest
import torch

from common.errors import UsageError
from common.precision import NO_GPU as CPU
from common.precision import Device, Precision, local_device, resolve_precision

A100 = Device("NVIDIA A100-SXM4-80GB", (8, 0))
H100 = Device("NVIDIA H100 80GB HBM3", (9, 0))
V100 = Device("Tesla V100-SXM2-32GB", (7, 0))
T4 = Device("Tesla T4", (7, 5))
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def resolve(bf16=False, flash=False, device=A100, installed=True, **flags) -> Precision:
    return resolve_precision(bf16, flash, device, flash_attn_installed=installed, **flags)


# The recipe's table: weights bf16 only with flash attention; QLoRA compute bf16 only with flash attention.
@pytest.mark.parametrize(
    "bf16, flash, expected",
    [
        (False, False, Precision(FP32, bf16=False, fp16=True, attn_implementation="sdpa", compute_dtype=FP16)),
        (True, False, Precision(FP32, bf16=True, fp16=False, attn_implementation="sdpa", compute_dtype=FP16)),
        (True, True, Precision(BF16, True, False, "flash_attention_2", BF16)),
    ],
)
@pytest.mark.parametrize("device", [A100, H100], ids=["A100", "H100"])
def test_dtypes_per_flag_combination_on_ampere_or_newer(bf16, flash, expected, device, caplog):
    with caplog.at_level(logging.WARNING, logger="common.precision"):
        assert resolve(bf16, flash, device) == expected
    assert not caplog.records  # nothing to warn about on a capable GPU


def test_autocast_dtype_follows_the_trainer_flags():
    assert resolve(bf16=True).autocast_dtype == BF16
    assert resolve(bf16=False).autocast_dtype == FP16
    assert resolve(bf16=True, device=CPU).autocast_dtype == BF16
    assert resolve(fp16=True, device=CPU).autocast_dtype == FP16
    assert resolve(device=CPU).autocast_dtype is None


@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")  # the context is inspected, not entered
@pytest.mark.parametrize("bf16, dtype", [(False, FP16), (True, BF16)])
def test_evaluation_autocast_on_gpu_is_the_training_dtype(bf16, dtype):
    context = resolve(bf16=bf16).autocast("cuda:0")
    assert isinstance(context, torch.autocast)
    assert context.device == "cuda" and context.fast_dtype == dtype


@pytest.mark.parametrize("flags, dtype", [({"bf16": True}, BF16), ({"fp16": True}, FP16)], ids=["bf16", "fp16"])
def test_evaluation_autocast_on_cpu_is_the_training_dtype(flags, dtype):
    with resolve(device=CPU, **flags).autocast("cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype
        assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == dtype


def test_no_evaluation_autocast_in_an_fp32_run():
    with resolve(device=CPU).autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_cpu_without_precision_flags_runs_fp32_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="common.precision"):
        precision = resolve(device=CPU)
    assert precision == Precision(FP32, bf16=False, fp16=False, attn_implementation="sdpa", compute_dtype=FP32)
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "No CUDA GPU" in message and "fp32" in message and "--bf16 or --fp16" in message


# On the CPU the flags mean what they mean on a GPU (QLoRA computes in fp16 under mixed precision, as the recipe).
@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"bf16": True}, Precision(FP32, bf16=True, fp16=False, attn_implementation="sdpa", compute_dtype=FP16)),
        ({"fp16": True}, Precision(FP32, bf16=False, fp16=True, attn_implementation="sdpa", compute_dtype=FP16)),
        ({"bf16": True, "dtype": "bfloat16"}, Precision(BF16, True, False, "sdpa", BF16)),
        ({"fp16": True, "dtype": "float16"}, Precision(FP16, False, True, "sdpa", FP16)),
        ({"dtype": "bfloat16"}, Precision(BF16, False, False, "sdpa", BF16)),
        ({"bf16": True, "dtype": "float32"}, Precision(FP32, True, False, "sdpa", FP16)),
    ],
    ids=["bf16", "fp16", "bf16-bfloat16", "fp16-float16", "bfloat16", "bf16-float32"],
)
def test_precision_flags_on_the_cpu_are_those_of_a_gpu_run(flags, expected, caplog):
    with caplog.at_level(logging.WARNING, logger="common.precision"):
        assert resolve(device=CPU, **flags) == expected
    mixed_precision = flags.get("bf16") or flags.get("fp16")
    assert bool(caplog.records) == (not mixed_precision)  # the fp32 warning only where the run is fp32


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"fp16": True}, Precision(FP32, bf16=False, fp16=True, attn_implementation="sdpa", compute_dtype=FP16)),
        ({"bf16": True, "dtype": "bfloat16"}, Precision(BF16, True, False, "sdpa", BF16)),
        ({"dtype": "float16"}, Precision(FP16, False, True, "sdpa", FP16)),
        ({"bf16": True, "flash": True, "dtype": "float32"}, Precision(FP32, True, False, "flash_attention_2", FP16)),
    ],
    ids=["fp16-is-the-default", "bf16-bfloat16-as-flash", "float16", "flash-float32"],
)
def test_fp16_and_dtype_on_a_gpu(flags, expected):
    assert resolve(device=A100, **flags) == expected


def test_bf16_and_fp16_together_are_refused():
    with pytest.raises(UsageError, match="--bf16 and --fp16 exclude each other"):
        resolve(bf16=True, fp16=True, device=CPU)


@pytest.mark.parametrize("device", [A100, CPU], ids=["A100", "CPU"])
@pytest.mark.parametrize(
    "flags, dtype, mode", [({"bf16": True}, "float16", "--bf16"), ({"fp16": True}, "bfloat16", "fp16 mixed precision")],
    ids=["bf16-float16", "fp16-bfloat16"],
)
def test_half_weights_in_the_other_half_dtype_are_refused(flags, dtype, mode, device):
    with pytest.raises(UsageError) as info:
        resolve(device=device, dtype=dtype, **flags)
    message = str(info.value)
    assert f"--dtype {dtype} does not go with {mode}" in message and "float32" in message


def test_fp16_under_deepspeed_without_a_gpu_names_what_works_instead():
    with pytest.raises(UsageError) as info:
        resolve(fp16=True, device=CPU, uses_deepspeed=True)
    message = str(info.value)
    assert "--fp16 with full finetuning (DeepSpeed ZeRO-2) needs a CUDA GPU" in message
    assert "--bf16" in message and "--use_lora" in message  # what works instead
    assert resolve(fp16=True, device=A100, uses_deepspeed=True).fp16  # the recipe's default on a GPU
    assert resolve(fp16=True, device=CPU, uses_deepspeed=False).fp16  # LoRA / QLoRA: torch's CPU loss scaling


@pytest.mark.parametrize("device", [V100, T4], ids=["V100", "T4"])
def test_bf16_before_ampere_is_refused_naming_the_gpu(device):
    with pytest.raises(UsageError) as info:
        resolve(bf16=True, device=device)
    message = str(info.value)
    assert "--bf16" in message and "8.0" in message and device.name in message
    assert f"{device.capability[0]}.{device.capability[1]}" in message
    assert "fp16 mixed precision" in message  # what to do instead


@pytest.mark.parametrize("device", [V100, T4], ids=["V100", "T4"])
def test_pre_ampere_gpu_trains_fp16_mixed_precision(device):
    assert resolve(bf16=False, device=device) == Precision(FP32, False, True, "sdpa", FP16)
    assert resolve(fp16=True, device=device) == Precision(FP32, False, True, "sdpa", FP16)


@pytest.mark.parametrize("device", [V100, T4], ids=["V100", "T4"])
def test_flash_attention_before_ampere_is_refused_naming_the_gpu(device):
    with pytest.raises(UsageError) as info:
        resolve(bf16=True, flash=True, device=device)
    message = str(info.value)
    assert "--use_flash_attention" in message and "Ampere" in message and device.name in message


@pytest.mark.parametrize("bf16", [False, True])
def test_flash_attention_without_cuda_names_the_gpu_need(bf16):
    with pytest.raises(UsageError) as info:
        resolve(bf16=bf16, flash=True, device=CPU)
    message = str(info.value)
    assert "--use_flash_attention" in message and "CUDA GPU" in message


def test_flash_attention_without_the_package_says_what_to_install():
    with pytest.raises(UsageError) as info:
        resolve(bf16=True, flash=True, installed=False)
    message = str(info.value)
    assert "flash-attn" in message
    assert "pip install" in message and "flash-attn --no-build-isolation" in message


def test_flash_attention_without_bf16_is_refused_with_the_reason():
    with pytest.raises(UsageError) as info:
        resolve(bf16=False, flash=True)
    message = str(info.value)
    assert "requires --bf16" in message
    assert "fp16 mixed precision" in message and "fp32" in message  # the reason, not just the rule


def test_local_device_reads_the_local_ranks_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"GPU {index}")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, index))
    assert local_device(3) == Device("GPU 3", (7, 3))
    assert local_device(1) == Device("GPU 1", (7, 1))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_device(3) == CPU


def test_the_device_is_detected_when_not_given(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 0))
    with pytest.raises(UsageError, match="compute capability 7.0"):
        resolve_precision(bf16=True, use_flash_attention=False)


def test_description_names_the_mode_the_weights_and_the_kernel():
    assert resolve(bf16=False).describe() == (
        "fp16 mixed precision (loss scaling), weights loaded in float32, attention sdpa"
    )
    assert resolve(bf16=True, flash=True).describe() == "bf16 autocast, weights loaded in bfloat16, attention flash_attention_2"


def test_precision_is_immutable():
    precision = resolve()
    with pytest.raises(AttributeError):
        precision.fp16 = False


@pytest.mark.parametrize(
    "script, implies", [("nlvr2", True), ("ucf101", True), ("docvqa", False), ("hateful_memes", False)]
)
def test_scripts_turn_bf16_on_with_flash_where_the_recipe_does(script, implies, monkeypatch, tmp_path):
    """On an A100 with flash-attn: NLVR2 and UCF-101 train bf16 with --use_flash_attention alone (recipe row 8);
    DocVQA and hateful memes refuse it without --bf16."""
    import importlib

    import common.finetune as finetune
    import common.precision as precision_module

    module = importlib.import_module(f"finetune_hf_trainer_{script}")
    monkeypatch.setattr(precision_module, "local_device", lambda local_rank=None: A100)
    monkeypatch.setattr(precision_module, "is_flash_attn_2_available", lambda: True)
    configs = []
    monkeypatch.setattr(finetune, "run_finetuning", lambda task, config, distributed: configs.append(config))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    argv = ["--output_dir", str(tmp_path / "out"), "--use_flash_attention", "--data_dir", str(data_dir)]
    if implies:
        module.main(argv)
        assert configs[0].precision == Precision(BF16, True, False, "flash_attention_2", BF16)
    else:
        with pytest.raises(UsageError, match="requires --bf16"):
            module.main(argv)


@pytest.mark.parametrize("flags", [["--bf16"], ["--bf16", "--use_flash_attention"]])
def test_a_run_checks_the_gpu_before_loading_anything(flags, monkeypatch, tmp_path):
    """On a V100 the script stops while resolving its flags: the run (data, processor, model) never starts."""
    import common.finetune as finetune
    import common.precision as precision_module
    import finetune_hf_trainer_hateful_memes as script

    monkeypatch.setattr(precision_module, "local_device", lambda local_rank=None: V100)
    monkeypatch.setattr(precision_module, "is_flash_attn_2_available", lambda: True)
    started = []
    monkeypatch.setattr(finetune, "run_finetuning", lambda task, config, distributed: started.append(config))
    with pytest.raises(UsageError, match="compute capability 7.0"):
        script.main(["--output_dir", str(tmp_path / "out"), *flags])
    assert not started and not (tmp_path / "out").exists()


def test_a_script_refuses_fp16_under_deepspeed_on_the_cpu_before_loading_anything(monkeypatch, tmp_path):
    """One UsageError (the `error:` line) while the flags are resolved; LoRA with --fp16 goes on to the run."""
    import common.finetune as finetune
    import finetune_hf_trainer_hateful_memes as script

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    started = []
    monkeypatch.setattr(finetune, "run_finetuning", lambda task, config, distributed: started.append(config))
    with pytest.raises(UsageError, match="--fp16 with full finetuning .DeepSpeed ZeRO-2. needs a CUDA GPU"):
        script.main(["--output_dir", str(tmp_path / "out"), "--fp16"])
    assert not started and not (tmp_path / "out").exists()
    script.main(["--output_dir", str(tmp_path / "out"), "--fp16", "--use_lora", "--dtype", "float16"])
    assert started[0].precision == Precision(FP16, bf16=False, fp16=True, attn_implementation="sdpa",
                                             compute_dtype=FP16)
