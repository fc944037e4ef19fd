"""common/strategy.py: strategy resolution, the LoRA / 4-bit configs, and build_model on the tiny model."""

import warnings

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from common.collators import Phi3VTrainCollator
from common.config import LoraSettings
from common.data import Sample, Turn
from common.model_loading import build_model, load_model, lora_config, parameter_counts, quantization_config
from common.precision import NO_GPU, Precision, resolve_precision
from common.strategy import LANGUAGE_LORA_TARGETS, STRATEGIES, VISION_LORA_TARGETS, TrainingStrategy

RECIPE_LANGUAGE_TARGETS = ["qkv_proj", "o_proj", "down_proj", "gate_up_proj", "lm_head"]
RECIPE_VISION_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "img_projection.0", "img_projection.2"]
VISION = "model.vision_embed_tokens."


def flags(use_lora=False, use_qlora=False, freeze_vision_model=False) -> dict[str, bool]:
    return dict(use_lora=use_lora, use_qlora=use_qlora, freeze_vision_model=freeze_vision_model)


# ---- TrainingStrategy ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, expected, name",
    [
        (flags(), TrainingStrategy(lora=False, quantize_4bit=False, freeze_vision=False), "full finetuning"),
        (flags(freeze_vision_model=True), TrainingStrategy(False, False, True), "full finetuning (frozen vision)"),
        (flags(use_lora=True), TrainingStrategy(True, False, False), "LoRA"),
        (flags(use_lora=True, freeze_vision_model=True), TrainingStrategy(True, False, True), "LoRA (frozen vision)"),
        (flags(use_qlora=True), TrainingStrategy(True, True, False), "QLoRA"),  # QLoRA implies LoRA
        (flags(use_lora=True, use_qlora=True), TrainingStrategy(True, True, False), "QLoRA"),
        (flags(use_qlora=True, freeze_vision_model=True), TrainingStrategy(True, True, True), "QLoRA (frozen vision)"),
    ],
)
def test_from_flags_and_name(args, expected, name):
    strategy = TrainingStrategy.from_flags(**args)
    assert strategy == expected
    assert strategy.name == name
    assert TrainingStrategy.from_flags(**strategy.flags) == strategy  # the flags select it back


def test_every_flag_combination_is_a_named_strategy():
    combinations = {
        TrainingStrategy.from_flags(lora, qlora, frozen) for lora in (0, 1) for qlora in (0, 1) for frozen in (0, 1)
    }
    assert combinations == set(STRATEGIES.values())
    assert STRATEGIES["qlora"].command_line == ["--use_qlora"]
    assert STRATEGIES["lora_frozen"].command_line == ["--use_lora", "--freeze_vision_model"]
    assert STRATEGIES["full"].command_line == []


@pytest.mark.parametrize(
    "strategy, deepspeed",
    [
        (TrainingStrategy(False, False, False), True),
        (TrainingStrategy(False, False, True), True),
        (TrainingStrategy(True, False, False), False),
        (TrainingStrategy(True, True, False), False),
    ],
)
def test_only_full_finetuning_uses_deepspeed(strategy, deepspeed):
    assert strategy.uses_deepspeed is deepspeed


# ---- pure config helpers ------------------------------------------------------------------------------


def test_target_lists_are_the_recipes():
    assert LANGUAGE_LORA_TARGETS == RECIPE_LANGUAGE_TARGETS
    assert VISION_LORA_TARGETS == RECIPE_VISION_TARGETS


@pytest.mark.parametrize("strategy", [TrainingStrategy(False, False, False), TrainingStrategy(True, False, False)])
def test_no_quantization_unless_qlora(strategy):
    assert quantization_config(strategy, torch.float16) is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_qlora_quantization_is_nf4_with_the_compute_dtype(dtype):
    config = quantization_config(TrainingStrategy(True, True, False), dtype)
    assert config.load_in_4bit is True and config.load_in_8bit is False
    assert config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_compute_dtype == dtype


def test_no_lora_config_for_full_finetuning():
    assert lora_config(TrainingStrategy(False, False, False), 64, 2, 0.0) is None
    assert lora_config(TrainingStrategy(False, False, True), 64, 2, 0.0) is None


def test_lora_config_is_the_recipes():
    config = lora_config(TrainingStrategy(True, False, False), rank=64, alpha_ratio=2, dropout=0.0)
    assert set(config.target_modules) == set(RECIPE_LANGUAGE_TARGETS + RECIPE_VISION_TARGETS)
    assert config.r == 64
    assert config.lora_alpha == 128
    assert config.lora_dropout == 0.0
    assert config.init_lora_weights == "gaussian"


def test_lora_config_with_frozen_vision_targets_only_the_language_model():
    config = lora_config(TrainingStrategy(True, True, True), rank=16, alpha_ratio=2, dropout=0.05)
    assert set(config.target_modules) == set(RECIPE_LANGUAGE_TARGETS)
    assert config.lora_dropout == 0.05


@pytest.mark.parametrize("rank, ratio, alpha", [(64, 2, 128), (8, 1.5, 12), (16, 0.5, 8), (10, 0.33, 3)])
def test_lora_alpha_is_rank_times_ratio_rounded(rank, ratio, alpha):
    config = lora_config(TrainingStrategy(True, False, False), rank, ratio, 0.0)
    assert config.lora_alpha == alpha == round(rank * ratio)
    assert isinstance(config.lora_alpha, int)


# ---- build_model on the tiny model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def precision():
    return resolve_precision(False, False, NO_GPU)


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir)


def build(tiny_model_dir, precision, **strategy_flags):
    strategy = TrainingStrategy.from_flags(**flags(**strategy_flags))
    return build_model(str(tiny_model_dir), strategy, LoraSettings(rank=4, alpha_ratio=2, dropout=0.0), precision, "cpu")


def trainable(model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def frozen(model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if not parameter.requires_grad}


def base_name(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.")


def lora_modules(model) -> set[str]:
    """Names (without the PEFT prefix) of the modules that received adapters."""
    return {base_name(name) for name, module in model.named_modules() if hasattr(module, "lora_A")}


def clip_of(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.vision_embed_tokens.img_processor.vision_model


def training_batch(processor) -> dict:
    samples = [
        Sample("a", [Turn("What colour is this?", "red", [Image.new("RGB", (336, 336), (200, 30, 30))])]),
        Sample("b", [Turn("Is this a square?", "yes", [Image.new("RGB", (300, 500), (30, 30, 200))])]),
    ]
    return Phi3VTrainCollator(processor)(samples)


def test_full_finetuning_trains_every_weight(tiny_model_dir, precision):
    model = build(tiny_model_dir, precision)
    assert not frozen(model)
    assert not lora_modules(model)
    assert model.config.use_cache is False
    assert len(clip_of(model).encoder.layers) == 2  # untrimmed: ZeRO copes with gradient-less parameters


def test_frozen_vision_freezes_the_recipes_image_embedding_module(tiny_model_dir, precision):
    """The recipe freezes the original's `vision_embed_tokens`, which holds the token-embedding table too."""
    model = build(tiny_model_dir, precision, freeze_vision_model=True)
    names = {name for name, _ in model.named_parameters()}
    image_embedding = {name for name in names if name.startswith(VISION)} | {"model.embed_tokens.weight"}
    assert any(".vision_model." in name for name in image_embedding)
    assert {VISION + "glb_GN", VISION + "sub_GN", VISION + "img_projection.0.weight"} <= image_embedding
    assert frozen(model) == image_embedding
    assert trainable(model) == names - image_embedding
    assert "lm_head.weight" in trainable(model)
    embed = model.model.embed_tokens.weight.numel()
    trainable_count, total = parameter_counts(model)
    assert trainable_count == total - embed - sum(
        p.numel() for p in model.model.vision_embed_tokens.parameters()
    )


@pytest.mark.parametrize(
    "strategy_flags",
    [{}, {"freeze_vision_model": True}, {"use_lora": True}, {"use_lora": True, "freeze_vision_model": True},
     {"use_qlora": True}],
    ids=["full", "frozen_vision", "lora", "lora_frozen_vision", "qlora"],
)
def test_every_strategy_loads_straight_onto_its_device_in_the_load_dtype(
    tiny_model_dir, strategy_flags, monkeypatch
):
    """No host-RAM copy per rank: from_pretrained places the weights itself (device_map) in the load dtype."""
    from transformers import AutoModelForCausalLM

    if strategy_flags.get("use_qlora"):
        pytest.importorskip("bitsandbytes")
    calls = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    precision = Precision(torch.float32, bf16=False, fp16=False, attn_implementation="sdpa", compute_dtype=torch.float32)
    strategy = TrainingStrategy.from_flags(**flags(**strategy_flags))
    model = build_model(str(tiny_model_dir), strategy, LoraSettings(4, 2, 0.0), precision, torch.device("cpu"))
    assert len(calls) == 1
    assert calls[0]["device_map"] == {"": torch.device("cpu")}
    assert calls[0]["dtype"] == torch.float32
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}


def test_the_lora_reload_loads_onto_the_device_in_the_load_dtype(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    trained = build(tiny_model_dir, resolve_precision(False, False, NO_GPU), use_lora=True)
    trained.save_pretrained(tmp_path)
    calls = []
    real = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: calls.append(k) or real(*a, **k))
    # bf16 + flash loads bf16 weights; bf16 alone fp32 (autocast): the reload follows the same rule
    for precision, dtype in (
        (Precision(torch.bfloat16, True, False, "sdpa", torch.bfloat16), torch.bfloat16),
        (Precision(torch.float32, True, False, "sdpa", torch.float16), torch.float32),
    ):
        reloaded = load_model(str(tiny_model_dir), precision, "cpu", adapter_path=str(tmp_path))
        assert calls[-1]["dtype"] == dtype and calls[-1]["device_map"] == {"": torch.device("cpu")}
        assert reloaded.get_base_model().model.embed_tokens.weight.dtype == dtype


def test_lora_trains_only_adapters_on_the_recipes_modules(tiny_model_dir, precision):
    model = build(tiny_model_dir, precision, use_lora=True)
    assert trainable(model) and all(".lora_" in name for name in trainable(model))
    assert all(".lora_" not in name for name in frozen(model))

    clip = clip_of(model)
    assert len(clip.encoder.layers) == 1  # the layer after the feature layer (-2) is gone
    assert isinstance(clip.post_layernorm, torch.nn.Identity)

    adapted = lora_modules(model)
    clip_prefix = VISION + "img_processor.vision_model.encoder.layers.0."
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"):
        assert clip_prefix + name in adapted, name
    assert {VISION + "img_projection.0", VISION + "img_projection.2"} <= adapted
    for layer in (0, 1):
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            assert f"model.layers.{layer}.{name}" in adapted
    assert "lm_head" in adapted
    # every adapted module is one the recipe names; nothing else (embeddings, norms) got adapters
    targets = RECIPE_LANGUAGE_TARGETS + RECIPE_VISION_TARGETS
    assert all(any(name == t or name.endswith("." + t) for t in targets) for name in adapted)
    assert len(adapted) == 2 * 4 + 1 + 6 + 2


def test_lora_adapter_reloads_onto_a_complete_base_without_missing_keys(tiny_model_dir, precision, tmp_path, caplog):
    """Training drops the unused last CLIP layer; the adapter config excludes it, so the saved adapter applies
    to an untrimmed base (evaluation after training, users, --merge) with every adapter weight present."""
    from peft import PeftModel

    trained = build(tiny_model_dir, precision, use_lora=True)
    assert trained.peft_config["default"].exclude_modules == r".*\.vision_model\.encoder\.layers\.(1)\..*"
    trained.save_pretrained(tmp_path)
    with caplog.at_level("WARNING"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reloaded = PeftModel.from_pretrained(load_model(str(tiny_model_dir), precision, "cpu"), tmp_path)
    messages = [str(w.message) for w in caught] + [record.getMessage() for record in caplog.records]
    assert not [m for m in messages if "missing" in m.lower()], messages
    assert len(clip_of(reloaded).encoder.layers) == 2  # the base keeps every layer
    assert lora_modules(reloaded) == lora_modules(trained)


def test_lora_with_frozen_vision_puts_no_adapters_in_the_vision_model(tiny_model_dir, precision):
    model = build(tiny_model_dir, precision, use_lora=True, freeze_vision_model=True)
    adapted = lora_modules(model)
    assert adapted and not any(name.startswith(VISION) for name in adapted)
    assert not any(base_name(name).startswith(VISION) for name in trainable(model))
    assert all(".lora_" in name for name in trainable(model))
    assert len(clip_of(model).encoder.layers) == 1


def test_lora_forward_backward_gives_every_trainable_parameter_a_gradient(tiny_model_dir, precision, processor):
    """DDP runs with find_unused_parameters=False: a trainable parameter without a gradient would crash it."""
    model = build(tiny_model_dir, precision, use_lora=True)
    model.train()
    batch = training_batch(processor)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    without = sorted(name for name, p in model.named_parameters() if p.requires_grad and p.grad is None)
    assert not without
    # B starts at zero (so A's gradient is zero at init); every B must get a nonzero gradient
    for name, parameter in model.named_parameters():
        if ".lora_B." in name:
            assert parameter.grad.abs().sum() > 0, name


@pytest.fixture(scope="module")
def qlora_model(tiny_model_dir, precision):
    pytest.importorskip("bitsandbytes")
    return build(tiny_model_dir, precision, use_qlora=True)


def test_qlora_quantizes_the_base_and_trains_only_adapters(qlora_model):
    import bitsandbytes as bnb

    four_bit = {base_name(n) for n, module in qlora_model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    for layer in (0, 1):
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            assert f"model.layers.{layer}.{name}.base_layer" in four_bit
    assert VISION + "img_processor.vision_model.encoder.layers.0.mlp.fc1.base_layer" in four_bit
    assert trainable(qlora_model) and all(".lora_" in name for name in trainable(qlora_model))


def test_qlora_counts_the_weights_its_4bit_storage_quantizes(qlora_model, tiny_model_dir, precision):
    """bitsandbytes packs two 4-bit values per stored element: the count is of the model's real weights."""
    plain = build(tiny_model_dir, precision, use_lora=True)
    assert parameter_counts(qlora_model) == parameter_counts(plain)
    packed = sum(p.numel() for p in qlora_model.parameters())
    assert parameter_counts(qlora_model)[1] > packed


def test_qlora_text_forward_backward_on_cpu(qlora_model, processor):
    qlora_model.train()
    qlora_model.zero_grad()
    batch = Phi3VTrainCollator(processor)([Sample("t", [Turn("Is this meme hateful?", "no")])])
    loss = qlora_model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for n, p in qlora_model.named_parameters() if p.requires_grad and VISION not in n)


def test_qlora_trains_the_same_after_a_no_grad_evaluation_on_cpu(tiny_model_dir, precision, processor):
    """The run evaluates before training. On CPU, bitsandbytes may repack 4-bit weights for inference at an
    eval-mode no-grad forward; training afterwards must see the same loss and gradients as a fresh model."""
    batch = Phi3VTrainCollator(processor)([Sample("t", [Turn("Is this meme hateful?", "no")])])
    results = []
    for evaluate_first in (False, True):
        torch.manual_seed(0)  # same LoRA init
        model = build(tiny_model_dir, precision, use_qlora=True)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(**batch)
        model.train()
        with torch.no_grad():  # nonzero B: gradients then flow back through the 4-bit base layers
            for name, parameter in model.named_parameters():
                if ".lora_B." in name:
                    parameter.copy_(torch.linspace(-0.1, 0.1, parameter.numel()).reshape(parameter.shape))
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and VISION not in base_name(n)}
        assert all(grad is not None for grad in grads.values())
        results.append((loss.detach(), grads))
    (fresh_loss, fresh_grads), (loss, grads) = results
    torch.testing.assert_close(loss, fresh_loss)
    for name, grad in fresh_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)


def test_qlora_image_forward_backward_on_cpu(qlora_model, processor):
    qlora_model.train()
    qlora_model.zero_grad()
    loss = qlora_model(**training_batch(processor)).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in qlora_model.parameters() if p.requires_grad)
