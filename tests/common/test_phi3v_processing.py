"""Phi3VProcessor against the original hub code's output (tests/fixtures/phi3v_reference)."""

import json
from functools import cache
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlamaTokenizer

from common.phi3v.image_processing_phi3_v import Phi3VImageProcessor
from common.phi3v.processing_phi3_v import Phi3VProcessor

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "phi3v_reference"
MODEL_DIR = FIXTURES / "tiny_phi3v"
REFERENCE = torch.load(FIXTURES / "reference.pt", weights_only=False)
CASES = REFERENCE["cases"]
PAD_ID = REFERENCE["meta"]["eos_id"]  # the fixture tokenizer pads with eos


@cache
def _processor(num_crops: int = 4) -> Phi3VProcessor:
    return Phi3VProcessor.from_pretrained(MODEL_DIR, num_crops=num_crops)


@cache
def _open(name: str) -> Image.Image:
    with Image.open(FIXTURES / "images" / name) as image:
        image.load()
        return image


def _case_images(name: str) -> list[Image.Image]:
    return [_open(image) for image in CASES[name]["images"]]


@pytest.mark.parametrize("name", sorted(CASES))
def test_single_prompt_matches_reference(name):
    case = CASES[name]
    processor = _processor(case["num_crops"])
    out = processor(case["prompt"], images=_case_images(name) or None)

    assert torch.equal(out["input_ids"], case["prompt_input_ids"])
    assert torch.equal(out["attention_mask"], torch.ones_like(case["prompt_input_ids"]))
    if case["images"]:
        expected = processor.image_processor(_case_images(name))
        assert torch.equal(out["pixel_values"], expected["pixel_values"])
        assert torch.equal(out["image_sizes"], expected["image_sizes"])
    else:
        assert set(out.keys()) == {"input_ids", "attention_mask"}


def test_single_image_may_be_passed_bare():
    case = CASES["single_image"]
    out = _processor()(case["prompt"], images=_case_images("single_image")[0])
    assert torch.equal(out["input_ids"], case["prompt_input_ids"])


def test_bos_starts_every_chunk_and_spans_use_negative_ids():
    ids = _processor()(CASES["two_images"]["prompt"], images=_case_images("two_images"))["input_ids"][0]
    counts = _processor().calc_num_image_tokens(_case_images("two_images"))
    assert (ids == -1).sum() == counts[0] and (ids == -2).sum() == counts[1]
    first_text_after_image = int((ids < 0).nonzero().max()) + 1
    assert ids[first_text_after_image] == 1  # BOS of the chunk after the last image


def _single_image_messages() -> list[dict]:
    """The user turn of the single_image case, recovered from its chat-templated prompt."""
    prompt = CASES["single_image"]["prompt"]
    content = prompt.removeprefix("<|user|>\n").removesuffix("<|end|>\n<|assistant|>\n")
    return [{"role": "user", "content": content}]


def _batched_prompts() -> list[str]:
    """The case prompt behind each row of the batched reference: the one with the row's text tokens."""
    batched = REFERENCE["batched"]
    prompts = []
    for ids, mask in zip(batched["input_ids"], batched["attention_mask"], strict=True):
        text_ids = ids[mask.bool() & (ids >= 0)]
        (prompt,) = [
            case["prompt"]
            for case in CASES.values()
            if torch.equal(case["prompt_input_ids"][0][case["prompt_input_ids"][0] >= 0], text_ids)
        ]
        prompts.append(prompt)
    return prompts


def test_batched_reference_right_padding():
    batched = REFERENCE["batched"]
    images = [[_open(name)] for name in batched["images"]]
    out = _processor(4)(_batched_prompts(), images=images)
    assert torch.equal(out["input_ids"], batched["input_ids"])
    assert torch.equal(out["attention_mask"], batched["attention_mask"])
    assert torch.equal(out["image_sizes"], batched["image_sizes"])
    assert torch.equal(
        out["pixel_values"], _processor(4).image_processor([img[0] for img in images])["pixel_values"]
    )


def test_left_padding_puts_pads_first():
    batched = REFERENCE["batched"]
    images = [[_open(name)] for name in batched["images"]]
    out = _processor(4)(_batched_prompts(), images=images, padding_side="left")
    for row, mask in enumerate(batched["attention_mask"]):
        length = int(mask.sum())
        assert torch.equal(out["input_ids"][row, -length:], batched["input_ids"][row, :length])
        assert (out["input_ids"][row, :-length] == PAD_ID).all()
        assert out["attention_mask"][row].tolist() == [0] * (mask.numel() - length) + [1] * length


def test_mixed_batch_with_and_without_images():
    prompts = [CASES["two_images"]["prompt"], CASES["text_only"]["prompt"]]
    out = _processor(4)(prompts, images=[_case_images("two_images"), []])
    image_ids = CASES["two_images"]["prompt_input_ids"][0]
    text_ids = CASES["text_only"]["prompt_input_ids"][0]

    assert out["input_ids"].shape == (2, len(image_ids))
    assert torch.equal(out["input_ids"][0], image_ids)
    assert torch.equal(out["input_ids"][1, : len(text_ids)], text_ids)
    assert (out["input_ids"][1, len(text_ids) :] == PAD_ID).all()
    assert out["attention_mask"].sum(1).tolist() == [len(image_ids), len(text_ids)]
    assert out["pixel_values"].shape == (2, 5, 3, 336, 336)
    assert torch.equal(
        out["image_sizes"], _processor(4).image_processor(_case_images("two_images"))["image_sizes"]
    )


def test_text_only_batch_has_no_pixel_values():
    prompts = [CASES["text_only"]["prompt"], "<|user|>\nHi<|end|>\n"]
    out = _processor()(prompts)
    assert set(out.keys()) == {"input_ids", "attention_mask"}
    assert torch.equal(out["input_ids"][0], CASES["text_only"]["prompt_input_ids"][0])
    assert out["attention_mask"][1].sum() < out["attention_mask"][0].sum()


def test_repeated_tag_gets_a_span_each_time():
    processor = _processor(1)
    out = processor("<|image_1|>a<|image_1|>b", images=[_open("c_333x333.png")])
    ids = out["input_ids"][0]
    span = processor.calc_num_image_tokens_from_image_size(333, 333)
    assert (ids == -1).sum() == 2 * span
    assert out["pixel_values"].shape[0] == 1


def test_padding_max_length_and_truncation():
    text_ids = CASES["text_only"]["prompt_input_ids"]
    processor = _processor()
    padded = processor(CASES["text_only"]["prompt"], padding="max_length", max_length=40)
    assert padded["input_ids"].shape == (1, 40)
    assert torch.equal(padded["input_ids"][:, : text_ids.shape[1]], text_ids)
    assert padded["attention_mask"].sum() == text_ids.shape[1]

    cut = processor(CASES["text_only"]["prompt"], truncation=True, max_length=10)
    assert torch.equal(cut["input_ids"], text_ids[:, :10])


def test_truncation_refuses_to_cut_image_tokens():
    with pytest.raises(ValueError, match="truncating to max_length=100 would cut image tokens"):
        _processor()(
            CASES["single_image"]["prompt"],
            images=_case_images("single_image"),
            truncation=True,
            max_length=100,
        )


@pytest.mark.parametrize(
    ("text", "images", "match"),
    [
        (
            "<|image_1|> and <|image_3|>",
            "two",
            r"image tags must be numbered 1\.\.n without gaps, got \[1, 3\]",
        ),
        ("<|image_0|>", "one", r"without gaps, got \[0\]"),
        ("<|image_1|> and <|image_2|>", "one", "prompt has 2 image tags but 1 image was given"),
        ("<|image_1|>", None, "prompt has 1 image tag but 0 images were given"),
        ("no tags here", "one", "prompt has 0 image tags but 1 image was given"),
        (
            ["<|image_1|>", "<|image_1|> <|image_2|>"],
            "nested",
            r"text\[1\]: prompt has 2 image tags but 1 image",
        ),
        (["<|image_1|>", "x"], "two", "images must be a list of 2 per-text image lists"),
        (["<|image_1|>"], "one", "images must be a list of 1 per-text image lists"),
        ([], None, "text must be a string or a non-empty list of strings"),
        (None, None, "text must be a string or a non-empty list of strings"),
    ],
)
def test_bad_inputs_raise_value_error(text, images, match):
    image = _open("c_333x333.png")
    images = {"one": [image], "two": [image, image], "nested": [[image], [image]], None: None}[images]
    with pytest.raises(ValueError, match=match):
        _processor()(text, images=images)


def test_unreadable_image_is_named():
    with pytest.raises(ValueError, match="could not read image 'missing.png'"):
        _processor()("<|image_1|>", images=["missing.png"])
    with pytest.raises(ValueError, match="could not read image object"):
        _processor()("<|image_1|>", images=[object()])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"return_tensors": "np"}, "only return_tensors='pt'"),
        ({"padding_side": "middle"}, "padding_side must be 'right' or 'left'"),
        ({"padding": "max_length"}, "'max_length' with max_length"),
    ],
)
def test_bad_options_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _processor()("hello", **kwargs)


def test_from_pretrained_routes_num_crops_to_image_processor_only():
    processor = Phi3VProcessor.from_pretrained(MODEL_DIR, num_crops=16)
    assert processor.image_processor.num_crops == 16
    assert "num_crops" not in processor.tokenizer.init_kwargs
    assert Phi3VProcessor.from_pretrained(MODEL_DIR).image_processor.num_crops == 4


def test_auto_processor_loads_official_folder():
    processor = AutoProcessor.from_pretrained(MODEL_DIR, num_crops=16)
    assert isinstance(processor, Phi3VProcessor)
    assert isinstance(processor.image_processor, Phi3VImageProcessor)
    assert processor.image_processor.num_crops == 16


def test_save_load_round_trip(tmp_path):
    processor = _processor(16)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["processor_class"] == "Phi3VProcessor"
    assert config["image_processor"]["num_crops"] == 16
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["num_crops"] == 16
    assert "num_crops" not in json.loads((tmp_path / "tokenizer_config.json").read_text())

    case = CASES["two_images"]
    expected = processor(case["prompt"], images=_case_images("two_images"))
    for loaded in (Phi3VProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert isinstance(loaded, Phi3VProcessor)
        assert loaded.image_processor.num_crops == 16
        out = loaded(case["prompt"], images=_case_images("two_images"))
        assert torch.equal(out["input_ids"], expected["input_ids"])
        assert torch.equal(out["pixel_values"], expected["pixel_values"])
        assert (
            loaded.apply_chat_template(_single_image_messages(), add_generation_prompt=True)
            == (CASES["single_image"]["prompt"])
        )


def test_tokenizer_passthroughs():
    processor = _processor()
    prompt = CASES["single_image"]["prompt"]
    assert processor.apply_chat_template(_single_image_messages(), add_generation_prompt=True) == prompt
    assert processor.model_input_names == ["pixel_values", "image_sizes", "input_ids", "attention_mask"]
    text_ids = CASES["text_only"]["prompt_input_ids"]
    assert processor.decode(text_ids[0]) == processor.tokenizer.decode(text_ids[0])
    assert processor.batch_decode(text_ids, skip_special_tokens=True) == processor.tokenizer.batch_decode(
        text_ids, skip_special_tokens=True
    )


def test_image_token_passthroughs():
    processor = _processor(4)
    assert processor.num_img_tokens == 144
    image = _open("a_800x600.png")
    expected = REFERENCE["image_processor"]["4/a_800x600.png"]["num_img_tokens"]
    assert processor.calc_num_image_tokens([image]) == expected
    assert processor.calc_num_image_tokens_from_image_size(800, 600) == expected[0]


def test_accepts_llama_tokenizer():
    """The real checkpoint ships a LlamaTokenizer; BOS must still start every chunk."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "a": 4, "b": 5}
    tokenizer = LlamaTokenizer(vocab=vocab, merges=[], add_bos_token=True)
    processor = Phi3VProcessor(Phi3VImageProcessor(num_crops=1), tokenizer)
    out = processor("a<|image_1|>b", images=[_open("c_333x333.png")])
    span = processor.calc_num_image_tokens_from_image_size(333, 333)
    head, tail = tokenizer("a").input_ids, tokenizer("b").input_ids
    assert head[0] == tail[0] == tokenizer.bos_token_id
    assert out["input_ids"][0].tolist() == head + [-1] * span + tail
    with pytest.raises(ValueError, match="no pad_token_id"):
        processor(["a", "a b"])
