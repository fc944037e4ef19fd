"""Native Phi-3-V model against the original hub code's outputs (tests/fixtures/phi3v_reference).

Every expected number comes from reference.pt / the fixture folder, so the checks hold for any fixture
produced the same way. Shared models are only used in eval mode and never modified; tests that train,
trim or freeze load their own copy.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, Phi3ForCausalLM
from transformers.utils import is_flash_attn_2_available

from common.phi3v import Phi3VConfig, Phi3VForCausalLM, Phi3VModel, Phi3VProcessor

ATTN_IMPLEMENTATIONS = ["eager", "sdpa"]
LOGITS_RTOL = 1e-4
LOSS_TOL = 1e-5
GRAD_TOL = 1e-5
NEW_TOKENS = 8


class Reference:
    """reference.pt plus lazily built, cached models / processors / encodings of the fixture folder."""

    def __init__(self, fixture_dir: Path, reference: dict):
        self.root = fixture_dir
        self.model_dir = fixture_dir / "tiny_phi3v"
        self.cases = reference["cases"]
        self.batched = reference["batched"]
        self.eos_id = reference["meta"]["eos_id"]
        self.default_num_crops = json.loads((self.model_dir / "preprocessor_config.json").read_text())[
            "num_crops"
        ]
        self._models: dict[str, Phi3VForCausalLM] = {}
        self._processors: dict[int, Phi3VProcessor] = {}
        self._images: dict[str, Image.Image] = {}
        self._encodings: dict[str, dict] = {}

    def model(self, attn: str = "sdpa") -> Phi3VForCausalLM:
        """Shared eval-mode model: do not modify it (use `load_model` for a private copy)."""
        if attn not in self._models:
            self._models[attn] = load_model(self.model_dir, attn)
        return self._models[attn]

    def processor(self, num_crops: int | None = None) -> Phi3VProcessor:
        num_crops = self.default_num_crops if num_crops is None else num_crops
        if num_crops not in self._processors:
            self._processors[num_crops] = AutoProcessor.from_pretrained(self.model_dir, num_crops=num_crops)
        return self._processors[num_crops]

    def image(self, name: str) -> Image.Image:
        if name not in self._images:
            with Image.open(self.root / "images" / name) as image:
                image.load()
                self._images[name] = image
        return self._images[name]

    def image_names(self) -> list[str]:
        return sorted(path.name for path in (self.root / "images").glob("*.png"))

    def encode(self, name: str) -> dict:
        """The processor's output for case `name` (prompt + its images, the case's num_crops)."""
        if name not in self._encodings:
            case = self.cases[name]
            images = [self.image(image) for image in case["images"]]
            self._encodings[name] = dict(
                self.processor(case["num_crops"])(case["prompt"], images=images or None)
            )
        return self._encodings[name]

    def image_inputs(self, name: str) -> dict:
        return {
            key: value for key, value in self.encode(name).items() if key in ("pixel_values", "image_sizes")
        }

    def training_inputs(self, name: str) -> dict:
        case = self.cases[name]
        return {"input_ids": case["input_ids"], "labels": case["labels"], **self.image_inputs(name)}

    def case_with_images(self, count: int) -> str:
        """Name of the shortest case with `count` images (to keep tests fast)."""
        names = [name for name, case in self.cases.items() if len(case["images"]) == count]
        assert names, f"reference.pt has no case with {count} images"
        return min(names, key=lambda name: self.cases[name]["input_ids"].shape[1])

    def greedy(self, model: Phi3VForCausalLM, inputs: dict, max_new_tokens: int = NEW_TOKENS) -> torch.Tensor:
        """Greedy generation; returns only the new tokens, (B, <= max_new_tokens)."""
        prompt_length = inputs["input_ids"].shape[1]
        with torch.no_grad():
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=self.eos_id,
                pad_token_id=self.eos_id,
            )
        return output[:, prompt_length:]


def load_model(path: Path, attn: str = "sdpa", **kwargs) -> Phi3VForCausalLM:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixture's flash_attention_2 request (tested on its own)
        model = AutoModelForCausalLM.from_pretrained(
            path, attn_implementation=attn, dtype=torch.float32, **kwargs
        )
    return model.eval()


def logits_of(model: Phi3VForCausalLM, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def assert_logits_close(got: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = LOGITS_RTOL):
    """max |got - expected| / max |expected| <= rtol."""
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    error = ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
    assert error <= rtol, f"{what}: relative logits error {error:.3g} > {rtol}"


def assert_grads_close(got: dict, expected: dict, what: str):
    assert got.keys() == expected.keys(), f"{what}: different parameters got gradients"
    for name in expected:
        torch.testing.assert_close(
            got[name], expected[name], rtol=GRAD_TOL, atol=GRAD_TOL, msg=lambda m, n=name: f"{what} {n}: {m}"
        )


@pytest.fixture(scope="module")
def ref(fixture_dir, reference) -> Reference:
    return Reference(fixture_dir, reference)


# ---------------------------------------------------------------------------------------------------------
# 1. Loading without remote code; attention implementations
# ---------------------------------------------------------------------------------------------------------

LOAD_SCRIPT = """
import sys
import common.phi3v
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor
path = sys.argv[1]
config = AutoConfig.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
processor = AutoProcessor.from_pretrained(path)
print("LOADED", type(config).__module__, type(model).__module__, type(processor).__module__,
      model.config._attn_implementation)
"""


def _plant_remote_code(folder: Path, marker: Path) -> list[str]:
    """Write every .py file the folder's auto_map names, each recording its import in `marker` and failing."""
    modules = set()
    for config_file in folder.glob("*.json"):
        data = json.loads(config_file.read_text())
        for reference in (data.get("auto_map") or {}).values() if isinstance(data, dict) else ():
            for entry in reference if isinstance(reference, list) else [reference]:
                if entry:
                    modules.add(entry.split("--")[-1].rsplit(".", 1)[0])
    for module in modules:
        (folder / f"{module}.py").write_text(
            f"open({str(marker)!r}, 'a').write({module!r} + '\\n')\n"
            f"raise RuntimeError('remote code {module}.py was imported')\n"
        )
    return sorted(modules)


def test_loads_offline_without_remote_code_or_prompt(ref, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(ref.model_dir, folder)
    marker = tmp_path / "imported_remote_code.txt"
    planted = _plant_remote_code(folder, marker)
    assert planted, "the fixture's config.json should carry an auto_map to remote code"
    repo_root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(repo_root), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(folder)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        cwd=repo_root,
        timeout=90,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "LOADED common.phi3v" in result.stdout, output
    for forbidden in ("trust_remote_code", "custom code"):
        assert forbidden not in output.lower(), f"{forbidden!r} in output:\n{output}"
    assert not marker.exists(), f"remote code was imported: {marker.read_text()}"
    assert not any((tmp_path / "hf_modules").rglob("*.py")), "remote code was copied to HF_MODULES_CACHE"


def test_auto_classes_resolve_to_native_classes(ref):
    config = AutoConfig.from_pretrained(ref.model_dir)
    processor = AutoProcessor.from_pretrained(ref.model_dir)
    model = ref.model()
    assert type(config) is Phi3VConfig
    assert type(model) is Phi3VForCausalLM
    assert type(processor) is Phi3VProcessor
    folder = str(ref.model_dir.resolve())
    loaded_from_folder = [
        name
        for name, module in list(sys.modules.items())
        if str(getattr(module, "__file__", None) or "").startswith(folder)
    ]
    assert not loaded_from_folder


def test_flash_attention_request_in_config_falls_back_to_sdpa_with_one_warning(ref):
    assert (
        json.loads((ref.model_dir / "config.json").read_text())["_attn_implementation"] == "flash_attention_2"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AutoModelForCausalLM.from_pretrained(ref.model_dir)
    flash_warnings = [w for w in caught if "flash" in str(w.message).lower()]
    if is_flash_attn_2_available():
        assert model.config._attn_implementation == "flash_attention_2"
        assert not flash_warnings
    else:
        assert model.config._attn_implementation == "sdpa"
        assert len(flash_warnings) == 1, [str(w.message) for w in flash_warnings]
        assert "sdpa" in str(flash_warnings[0].message)


@pytest.mark.parametrize("attn", ATTN_IMPLEMENTATIONS)
def test_explicit_attn_implementation_is_honoured(ref, attn):
    model = ref.model(attn)
    assert model.config._attn_implementation == attn
    assert model.model.layers[0].self_attn.config._attn_implementation == attn


def test_explicit_flash_attention_without_flash_attn_raises(ref):
    if is_flash_attn_2_available():  # nothing to check where the kernel exists: it must simply load
        assert (
            load_model(ref.model_dir, "flash_attention_2").config._attn_implementation == "flash_attention_2"
        )
        return
    with pytest.raises((ImportError, ValueError), match="(?i)flash"):
        AutoModelForCausalLM.from_pretrained(ref.model_dir, attn_implementation="flash_attention_2")


# ---------------------------------------------------------------------------------------------------------
# 2. Official parameter names and shapes
# ---------------------------------------------------------------------------------------------------------


def test_official_config_builds_the_official_key_set(ref):
    official = ref.root / "official"
    expected = json.loads((official / "official_keys.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = Phi3VConfig.from_pretrained(official)
    with torch.device("meta"):
        model = Phi3VForCausalLM(config)
    shapes = {key: list(tensor.shape) for key, tensor in model.state_dict().items()}
    assert sorted(set(shapes) - set(expected)) == [], "keys the original does not have"
    assert sorted(set(expected) - set(shapes)) == [], "keys of the original that are missing"
    wrong = {key: (shapes[key], expected[key]) for key in expected if shapes[key] != list(expected[key])}
    assert not wrong, f"shape mismatches (ours, original): {wrong}"
    expected_count = sum(math.prod(shape) for shape in expected.values())
    assert sum(p.numel() for p in model.parameters()) == expected_count
    assert expected_count == 4_146_621_440  # Phi-3.5-vision-instruct


def test_the_causal_lm_is_built_by_phi3s_own_constructor(ref, monkeypatch):
    """Whatever Phi3ForCausalLM's constructor sets up (today or in a later transformers) is there; its throwaway
    text decoder costs nothing, and every weight of the finished model is real (none left on the meta device)."""
    phi3_init = Phi3ForCausalLM.__init__

    def phi3_init_with_a_new_attribute(self, config):
        phi3_init(self, config)
        self.set_by_phi3 = True

    monkeypatch.setattr(Phi3ForCausalLM, "__init__", phi3_init_with_a_new_attribute)
    model = Phi3VForCausalLM(Phi3VConfig.from_pretrained(ref.model_dir))
    assert model.set_by_phi3
    assert not [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    assert type(model.model) is Phi3VModel


# ---------------------------------------------------------------------------------------------------------
# 3. Numerics against the original implementation
# ---------------------------------------------------------------------------------------------------------


def test_processor_input_ids_match_reference(ref):
    for name, case in ref.cases.items():
        assert torch.equal(ref.encode(name)["input_ids"], case["prompt_input_ids"]), name


@pytest.mark.parametrize("attn", ATTN_IMPLEMENTATIONS)
def test_logits_and_loss_match_reference(ref, attn):
    model = ref.model(attn)
    for name, case in ref.cases.items():
        with torch.no_grad():
            output = model(**ref.training_inputs(name))
        positions = case["logits"]["positions"]
        assert_logits_close(output.logits[:, positions], case["logits"]["values"], f"{name} ({attn})")
        assert abs(output.loss.item() - case["loss"]) <= LOSS_TOL, (
            f"{name} ({attn}): {output.loss.item()} vs {case['loss']}"
        )


@pytest.mark.parametrize("attn", ATTN_IMPLEMENTATIONS)
def test_greedy_generation_matches_reference(ref, attn):
    model = ref.model(attn)
    for name, case in ref.cases.items():
        prompt = case["prompt_input_ids"]
        inputs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt), **ref.image_inputs(name)}
        new_tokens = ref.greedy(model, inputs, max_new_tokens=NEW_TOKENS)
        assert new_tokens[0].tolist() == list(case["generated"]), f"{name} ({attn})"


def _num_crops_matching(ref: Reference, images: list[Image.Image], image_sizes: torch.Tensor) -> int:
    """The num_crops whose HD transform gives the reference image_sizes."""
    candidates = [ref.default_num_crops, *(case["num_crops"] for case in ref.cases.values()), 1, 4, 16]
    for num_crops in dict.fromkeys(candidates):
        if torch.equal(ref.processor(num_crops).image_processor(images)["image_sizes"], image_sizes):
            return num_crops
    raise AssertionError(f"no num_crops in {candidates} reproduces image_sizes {image_sizes.tolist()}")


@pytest.mark.parametrize("attn", ATTN_IMPLEMENTATIONS)
def test_batched_logits_match_reference(ref, attn):
    batch = ref.batched
    images = [ref.image(name) for name in batch["images"]]
    num_crops = _num_crops_matching(ref, images, batch["image_sizes"])
    pixel_values = ref.processor(num_crops).image_processor(images)["pixel_values"]
    logits = logits_of(
        ref.model(attn),
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=pixel_values,
        image_sizes=batch["image_sizes"],
    )
    positions = batch["logits"]["positions"]
    real = batch["attention_mask"][:, positions].bool()
    assert_logits_close(logits[:, positions][real], batch["logits"]["values"][real], f"batched ({attn})")


# ---------------------------------------------------------------------------------------------------------
# 4./5. Checkpoint format
# ---------------------------------------------------------------------------------------------------------


def _safetensors_keys(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as handle:
        return set(handle.keys())


def test_save_pretrained_round_trip_keeps_official_format(ref, tmp_path):
    name = ref.case_with_images(1)
    model = ref.model()
    model.save_pretrained(tmp_path)
    reloaded = load_model(tmp_path)
    inputs = ref.training_inputs(name)
    assert torch.equal(logits_of(reloaded, **inputs), logits_of(model, **inputs))

    assert _safetensors_keys(tmp_path / "model.safetensors") == _safetensors_keys(
        ref.model_dir / "model.safetensors"
    )
    source = json.loads((ref.model_dir / "config.json").read_text())
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "phi3_v"
    assert saved["architectures"] == ["Phi3VForCausalLM"]
    assert "rope_parameters" not in saved
    assert saved["rope_scaling"] == {
        "type": "su",
        "short_factor": source["rope_scaling"]["short_factor"],
        "long_factor": source["rope_scaling"]["long_factor"],
    }
    for key in ("original_max_position_embeddings", "max_position_embeddings", "rope_theta", "embd_layer"):
        assert saved[key] == source[key], key
    assert {key: saved["vision_config"].get(key) for key in source["vision_config"]} == source[
        "vision_config"
    ]
    assert {key: saved["img_processor"].get(key) for key in source["img_processor"]} == source[
        "img_processor"
    ]


def test_official_config_round_trips_without_vision_config(ref, tmp_path):
    official = ref.root / "official"
    source = json.loads((official / "config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = Phi3VConfig.from_pretrained(official)
    config.save_pretrained(tmp_path)
    saved_file = json.loads((tmp_path / "config.json").read_text())
    for saved in (config.to_dict(), saved_file):
        assert "vision_config" not in saved
        assert "rope_parameters" not in saved
        assert saved["rope_scaling"] == source["rope_scaling"]
        assert saved["model_type"] == "phi3_v"
        assert saved["img_processor"] == source["img_processor"]
        assert saved["embd_layer"] == source["embd_layer"]


def test_checkpoint_with_wte_alias_loads_silently(ref, tmp_path, capfd):
    folder = tmp_path / "model"
    shutil.copytree(ref.model_dir, folder)
    weights = load_file(folder / "model.safetensors")
    weights["model.vision_embed_tokens.wte.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    capfd.readouterr()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, attn_implementation="sdpa", output_loading_info=True
        )
    output = capfd.readouterr()
    assert not info["unexpected_keys"] and not info["missing_keys"] and not info["mismatched_keys"], info
    for text in [output.out, output.err, *(str(w.message) for w in caught)]:
        assert "unexpected" not in text.lower() and "wte" not in text, text
    name = ref.case_with_images(1)
    inputs = ref.training_inputs(name)
    assert torch.equal(logits_of(model.eval(), **inputs), logits_of(ref.model(), **inputs))


# ---------------------------------------------------------------------------------------------------------
# 6. Batches: text only and mixed image counts, right and left padding
# ---------------------------------------------------------------------------------------------------------

BATCHES = {
    # sample -> (question, number of images)
    "text_only": [("Describe a red square on a blue background.", 0), ("What is 2 + 2?", 0)],
    "mixed": [
        ("Compare the two images.", 2),
        ("What is 2 + 2? Answer with a number.", 0),
        ("Describe it.", 1),
    ],
}
FILLER = "Answer the question with a short phrase. "
BATCH_NUM_CROPS = 2  # images of different token counts, but fewer crops than the default (faster)


def _chat(question: str, num_images: int) -> str:
    tags = "".join(f"<|image_{i + 1}|>\n" for i in range(num_images))
    return f"<|user|>\n{tags}{question}<|end|>\n<|assistant|>\n"


def _rope_regime(ref: Reference, length: int) -> str:
    # su rope switches to the long factors for the WHOLE batch once any position passes
    # original_max_position_embeddings (as the original), so a batch only equals its samples run alone
    # when all of them are on the same side of that limit.
    return "long" if length > ref.model().config.original_max_position_embeddings else "short"


def _batch_samples(ref: Reference, kind: str) -> list[tuple[str, list[Image.Image]]]:
    """Prompts + images of a test batch. In "mixed", every prompt is lengthened past the long-rope limit."""
    names = iter(ref.image_names())
    processor = ref.processor(BATCH_NUM_CROPS)
    limit = ref.model().config.original_max_position_embeddings
    filler_tokens = len(processor.tokenizer(FILLER * 8, add_special_tokens=False).input_ids) / 8
    samples = []
    for question, count in BATCHES[kind]:
        images = [ref.image(next(names)) for _ in range(count)]
        if kind == "mixed":
            length = processor(_chat(question, count), images=images or None)["input_ids"].shape[1]
            question = FILLER * max(0, math.ceil((limit + 8 - length) / filler_tokens)) + question
        samples.append((_chat(question, count), images))
    return samples


def _batch(ref: Reference, samples, padding_side: str) -> dict:
    prompts = [prompt for prompt, _ in samples]
    images = [sample_images for _, sample_images in samples]
    inputs = dict(
        ref.processor(BATCH_NUM_CROPS)(
            text=prompts, images=images if any(images) else None, padding_side=padding_side
        )
    )
    lengths = inputs["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) > 1, "the batch should need padding"
    assert len({_rope_regime(ref, length) for length in lengths}) == 1, (
        f"lengths {lengths} straddle the rope limit"
    )
    return inputs


def _single(ref: Reference, prompt: str, images: list[Image.Image]) -> dict:
    return dict(ref.processor(BATCH_NUM_CROPS)(prompt, images=images or None))


def _left_padded_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("attn", ATTN_IMPLEMENTATIONS)
@pytest.mark.parametrize("kind", sorted(BATCHES))
def test_padded_batch_logits_equal_single_sample_logits(ref, kind, attn):
    model = ref.model(attn)
    samples = _batch_samples(ref, kind)
    singles = [logits_of(model, **_single(ref, prompt, images))[0] for prompt, images in samples]

    right = _batch(ref, samples, "right")
    right_logits = logits_of(model, **right)
    left = _batch(ref, samples, "left")
    left_logits = logits_of(model, **left, position_ids=_left_padded_position_ids(left["attention_mask"]))
    for index, expected in enumerate(singles):
        length = len(expected)
        assert right["attention_mask"][index].sum() == length
        assert_logits_close(
            right_logits[index, :length], expected, f"{kind} sample {index}, right padding ({attn})"
        )
        assert_logits_close(
            left_logits[index, -length:], expected, f"{kind} sample {index}, left padding ({attn})"
        )


def test_left_padded_batch_generation_equals_single_generation(ref):
    model = ref.model()
    samples = _batch_samples(ref, "mixed")
    batched = ref.greedy(model, _batch(ref, samples, "left"))
    for index, (prompt, images) in enumerate(samples):
        alone = ref.greedy(model, _single(ref, prompt, images))[0].tolist()
        alone += [ref.eos_id] * (batched.shape[1] - len(alone))  # finished rows are padded with eos
        assert batched[index].tolist() == alone, f"sample {index}"


# ---------------------------------------------------------------------------------------------------------
# 7. Bad inputs
# ---------------------------------------------------------------------------------------------------------


def test_placeholders_without_pixel_values_raise(ref):
    input_ids = ref.cases[ref.case_with_images(1)]["input_ids"]
    with pytest.raises(ValueError, match="placeholders but no pixel_values"):
        ref.model()(input_ids=input_ids)


def test_pixel_values_without_placeholders_raise(ref):
    input_ids = ref.cases[ref.case_with_images(0)]["input_ids"]
    with pytest.raises(
        ValueError, match="pixel_values were given but input_ids contain no image placeholders"
    ):
        ref.model()(input_ids=input_ids, **ref.image_inputs(ref.case_with_images(1)))


def test_image_count_mismatch_raises(ref):
    name = ref.case_with_images(2)
    images = ref.image_inputs(name)
    with pytest.raises(ValueError, match=r"hold 2 image placeholder spans .* pixel_values hold 1 images"):
        ref.model()(
            input_ids=ref.cases[name]["input_ids"],
            pixel_values=images["pixel_values"][:1],
            image_sizes=images["image_sizes"][:1],
        )


def test_per_turn_image_numbering_equals_numbering_across_the_conversation(ref):
    """The recipe numbers every turn's images from 1 (each turn its own processor call): the spans are filled
    in the order they appear, so the logits equal those of one prompt numbering the images 1..n in order,
    and differ when the images are swapped (the order is what places them)."""
    model, processor = ref.model(), ref.processor(1)
    first, second = ref.image("a_800x600.png"), ref.image("b_240x720.png")
    turns = ["<|user|>\n<|image_1|>\nWhat is left?<|end|>\n<|assistant|>\n", "<|user|>\n{tag}\nAnd now?<|end|>\n"]
    images = processor.image_processor([first, second])
    counts = images["num_img_tokens"]
    per_turn = processor.encode_prompt(turns[0], counts[:1]) + processor.encode_prompt(
        turns[1].format(tag="<|image_1|>"), counts[1:]
    )
    first_turn = len(processor.encode_prompt(turns[0], counts[:1]))
    across = per_turn[:first_turn] + [-2 if token == -1 else token for token in per_turn[first_turn:]]
    assert across.count(-2) == counts[1]  # what one processor call numbering the conversation's images emits
    image_inputs = {"pixel_values": images["pixel_values"], "image_sizes": images["image_sizes"]}
    per_turn_logits = logits_of(model, input_ids=torch.tensor([per_turn]), **image_inputs)
    across_logits = logits_of(model, input_ids=torch.tensor([across]), **image_inputs)
    assert_logits_close(per_turn_logits, across_logits, "per-turn vs conversation numbering")
    with torch.no_grad():  # each span holds its own turn's image, encoded on its own
        merged = model.model.embed_inputs(torch.tensor([per_turn]), **image_inputs)[0]
        for index, image in enumerate((first, second)):
            alone = processor.image_processor([image])
            expected = model.model.vision_embed_tokens(alone["pixel_values"], alone["image_sizes"])[0]
            span = [position for position, token in enumerate(per_turn) if token == -1][
                sum(counts[:index]) : sum(counts[: index + 1])
            ]
            torch.testing.assert_close(merged[span], expected, rtol=1e-4, atol=1e-5)

    swapped = processor.image_processor([second, first])
    counts_swapped = swapped["num_img_tokens"]
    swapped_ids = processor.encode_prompt(turns[0], counts_swapped[:1]) + processor.encode_prompt(
        turns[1].format(tag="<|image_1|>"), counts_swapped[1:]
    )
    swapped_logits = logits_of(
        model, input_ids=torch.tensor([swapped_ids]), pixel_values=swapped["pixel_values"],
        image_sizes=swapped["image_sizes"],
    )
    assert not torch.allclose(swapped_logits[0, -1], per_turn_logits[0, -1], atol=1e-4)


def test_more_spans_than_images_raise(ref):
    """A repeated tag makes a second span for an image pixel_values hold once: one clear error."""
    processor = ref.processor(1)
    inputs = processor("<|image_1|> and again <|image_1|>", [ref.image("c_333x333.png")])
    with pytest.raises(ValueError, match=r"hold 2 image placeholder spans \(per sample: \[2\]\) but pixel_values hold 1"):
        ref.model()(**inputs)


def test_wrong_image_sizes_raise_span_length_mismatch(ref):
    # image_sizes naming another crop grid (one that pixel_values can still supply): the image then has a
    # different number of features than its placeholder span.
    multi_crop = [name for name, case in ref.cases.items() if case["images"] and case["num_crops"] > 1]
    assert multi_crop, "reference.pt needs a case with num_crops > 1"
    name = min(multi_crop, key=lambda name: ref.cases[name]["input_ids"].shape[1])
    images = ref.image_inputs(name)
    crop = ref.model().config.vision_config.image_size
    image_sizes = images["image_sizes"].clone()
    one_crop = torch.tensor([crop, crop])
    image_sizes[0] = one_crop if not torch.equal(image_sizes[0], one_crop) else torch.tensor([crop, 2 * crop])
    assert not torch.equal(image_sizes, images["image_sizes"])
    with pytest.raises(ValueError, match="placeholder span 0 .* tokens but its image has .* features"):
        ref.model()(
            input_ids=ref.cases[name]["input_ids"],
            pixel_values=images["pixel_values"],
            image_sizes=image_sizes,
        )


# ---------------------------------------------------------------------------------------------------------
# 8. Gradient checkpointing
# ---------------------------------------------------------------------------------------------------------


def _loss_and_grads(
    model: Phi3VForCausalLM, inputs: dict
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Loss, the gradients of all parameters that got one (the CLIP layers after the feature layer do not)
    and how often the first decoder MLP ran (twice with checkpointing: forward and recomputation)."""
    calls = []
    hook = model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        model.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
    finally:
        hook.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, len(calls)


def _freeze_all_but_some(model: Phi3VForCausalLM) -> None:
    """A LoRA-like setup: everything frozen except one decoder projection and the image projection."""
    model.requires_grad_(False)
    model.model.layers[-1].self_attn.o_proj.requires_grad_(True)
    model.model.vision_embed_tokens.img_projection.requires_grad_(True)
    model.enable_input_require_grads()


@pytest.mark.parametrize("frozen_base", [False, True], ids=["full", "frozen_base"])
def test_gradient_checkpointing_gives_same_loss_and_grads(ref, frozen_base):
    model = load_model(ref.model_dir, "sdpa")
    if frozen_base:
        _freeze_all_but_some(model)
    model.train()
    inputs = ref.training_inputs(ref.case_with_images(1))
    loss, grads, calls = _loss_and_grads(model, inputs)
    assert calls == 1

    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    checkpointed_loss, checkpointed_grads, checkpointed_calls = _loss_and_grads(model, inputs)
    assert checkpointed_calls == 2, "the decoder layers were not recomputed: checkpointing is not active"

    torch.testing.assert_close(checkpointed_loss, loss, rtol=GRAD_TOL, atol=GRAD_TOL)
    assert_grads_close(checkpointed_grads, grads, "gradient checkpointing")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if frozen_base:
        assert set(grads) == trainable and len(trainable) < len(list(model.parameters()))
    else:
        assert any(name.startswith("model.layers.") for name in grads)
        assert any(".vision_model.encoder.layers.0." in name for name in grads)
    assert all(grad.abs().sum() > 0 for grad in grads.values())


def test_frozen_vision_tower_runs_without_autograd_under_checkpointing(ref):
    """Checkpointing hooks CLIP's patch embedding to output a tensor requiring grad (as the Trainer does):
    a frozen tower must still build no graph, so its layers are neither recomputed nor backpropagated."""
    model = load_model(ref.model_dir, "sdpa")
    model.model.vision_embed_tokens.requires_grad_(False)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    clip_layers = model.model.vision_embed_tokens.img_processor.vision_model.encoder.layers
    runs, outputs_needing_grad = [], []

    def record(module, args, output):
        runs.append(module)
        hidden = output[0] if isinstance(output, tuple) else output
        outputs_needing_grad.append(hidden.requires_grad)

    hooks = [layer.register_forward_hook(record) for layer in clip_layers]
    try:
        loss = model(**ref.training_inputs(ref.case_with_images(1))).loss
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    assert len(runs) == len(clip_layers), "CLIP layers were recomputed in the backward pass"
    assert not any(outputs_needing_grad), "a frozen CLIP layer took part in autograd"
    assert all(p.grad is None for p in model.model.vision_embed_tokens.parameters())
    assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0  # the decoder still trains


# ---------------------------------------------------------------------------------------------------------
# 9. Trimming the unused CLIP layers
# ---------------------------------------------------------------------------------------------------------


def test_trim_unused_vision_layers(ref):
    model = load_model(ref.model_dir, "sdpa")
    clip = model.model.vision_embed_tokens.img_processor.vision_model
    num_layers = len(clip.encoder.layers)
    layer_idx = model.config.img_processor.get("layer_idx", -2)
    kept = layer_idx if layer_idx >= 0 else num_layers + 1 + layer_idx
    inputs = ref.training_inputs(ref.case_with_images(1))
    before = logits_of(model, **inputs)
    assert any("post_layernorm" in name for name, _ in model.named_parameters())

    model.trim_unused_vision_layers()

    assert len(clip.encoder.layers) == kept < num_layers
    assert not any("post_layernorm" in name for name, _ in model.named_parameters())
    assert not any(f"encoder.layers.{kept}." in name for name in model.state_dict())
    assert torch.equal(logits_of(model, **inputs), before)

    model.train()
    model(**inputs).loss.backward()
    no_grad = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without gradient after trimming: {no_grad}"
