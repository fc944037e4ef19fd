"""Phi3VImageProcessor against the original hub code's output (tests/fixtures/phi3v_reference)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.phi3v.image_processing_phi3_v import Phi3VImageProcessor, hd_transform_size

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "phi3v_reference"
IMAGES = FIXTURES / "images"
REFERENCE = torch.load(FIXTURES / "reference.pt", weights_only=False)["image_processor"]


def _open(name: str) -> Image.Image:
    with Image.open(IMAGES / name) as image:
        image.load()
        return image


def _pixels(image, num_crops: int = 4) -> torch.Tensor:
    return Phi3VImageProcessor(num_crops=num_crops)(image)["pixel_values"]


@pytest.mark.parametrize("key", sorted(REFERENCE))
def test_matches_reference(key):
    num_crops, name = key.split("/")
    expected = REFERENCE[key]
    out = Phi3VImageProcessor(num_crops=int(num_crops)).preprocess(_open(name))

    pixel_values = out["pixel_values"]
    assert pixel_values.dtype == torch.float32
    assert list(pixel_values.shape) == [1, *expected["shape"]]
    assert out["image_sizes"].dtype == torch.long
    assert out["image_sizes"].tolist() == expected["image_sizes"]
    assert out["num_img_tokens"] == expected["num_img_tokens"]

    crops = pixel_values[0]
    stride = expected["stride"]
    torch.testing.assert_close(crops[..., ::stride, ::stride], expected["sub"], atol=2e-3, rtol=0)
    per_crop = crops.double().flatten(1)
    torch.testing.assert_close(per_crop.mean(1), expected["mean"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(per_crop.abs().sum(1), expected["abs_sum"], rtol=1e-4, atol=1e-3)


def test_rgba_alpha_is_dropped_like_the_original():
    """The reference matches PIL's plain convert("RGB") of the RGBA fixture, not a white composite."""
    rgba = _open("e_350x500_rgba.png")
    assert rgba.mode == "RGBA"
    assert torch.equal(_pixels(rgba), _pixels(rgba.convert("RGB")))


def test_batch_of_images_stacks_in_order():
    names = ["a_800x600.png", "b_240x720.png", "d_1200x200.png"]
    out = Phi3VImageProcessor(num_crops=4)([_open(name) for name in names])
    assert out["pixel_values"].shape == (3, 5, 3, 336, 336)
    for index, name in enumerate(names):
        expected = REFERENCE[f"4/{name}"]
        assert out["image_sizes"][index].tolist() == expected["image_sizes"][0]
        assert out["num_img_tokens"][index] == expected["num_img_tokens"][0]
        torch.testing.assert_close(
            out["pixel_values"][index, :, :, ::14, ::14], expected["sub"], atol=2e-3, rtol=0
        )


def test_unused_crop_slots_are_zero():
    # 800x600 at num_crops 16 becomes a 4x3 grid: 1 + 12 of the 17 slots are used.
    out = Phi3VImageProcessor(num_crops=16)(_open("a_800x600.png"))
    rows, cols = (size // 336 for size in out["image_sizes"][0].tolist())
    used = 1 + rows * cols
    assert used < 17
    assert not out["pixel_values"][0, used:].any()
    assert out["pixel_values"][0, used - 1].abs().sum() > 0


@pytest.mark.parametrize("num_crops", [1, 4, 16])
@pytest.mark.parametrize(
    "size", [(800, 600), (240, 720), (333, 333), (1200, 200), (1, 1), (337, 335), (5000, 7), (3, 4000)]
)
def test_token_count_from_size_agrees_with_preprocess(size, num_crops):
    processor = Phi3VImageProcessor(num_crops=num_crops)
    image = Image.new("RGB", size, (10, 200, 30))
    out = processor(image)
    assert processor.calc_num_image_tokens_from_image_size(*size) == out["num_img_tokens"][0]
    assert processor.calc_num_image_tokens(image) == out["num_img_tokens"]
    height, width = out["image_sizes"][0].tolist()
    assert height % 336 == 0 and width % 336 == 0
    assert (height // 336) * (width // 336) <= num_crops


def test_numpy_and_torch_inputs_match_pil():
    image = _open("b_240x720.png")
    expected = _pixels(image)
    hwc = np.asarray(image)
    chw = hwc.transpose(2, 0, 1)
    inputs = [
        hwc,
        chw,
        hwc.astype(np.float32) / 255,
        torch.from_numpy(chw.copy()),
        torch.from_numpy(chw.copy()).float() / 255,
        torch.from_numpy(hwc.copy()),
    ]
    for array in inputs:
        assert torch.equal(_pixels(array), expected)


def test_grayscale_array_inputs_match_pil():
    image = _open("f_700x420_gray.png")
    expected = _pixels(image)
    gray = np.asarray(image)
    assert torch.equal(_pixels(gray), expected)
    assert torch.equal(_pixels(gray[None]), expected)
    assert torch.equal(_pixels(torch.from_numpy(gray.copy())[None]), expected)


@pytest.mark.parametrize("mode", ["CMYK", "P", "LA", "L", "I;16", "1", "RGBA"])
def test_other_pil_modes(mode):
    image = _open("c_333x333.png").convert(mode)
    out = Phi3VImageProcessor(num_crops=4)(image)
    assert out["pixel_values"].shape == (1, 5, 3, 336, 336)
    assert torch.equal(out["pixel_values"], _pixels(image.convert("RGB")))


def test_paletted_image_with_transparency():
    image = Image.new("P", (50, 80), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.info["transparency"] = 0
    assert torch.equal(_pixels(image), _pixels(image.convert("RGB")))


def test_path_input_matches_pil():
    assert torch.equal(_pixels(IMAGES / "a_800x600.png"), _pixels(_open("a_800x600.png")))
    assert torch.equal(_pixels(str(IMAGES / "a_800x600.png")), _pixels(_open("a_800x600.png")))


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("no/such/file.png", r"could not read image 'no/such/file.png'"),
        (42, r"could not read image int: expected a PIL image"),
        ({"image": 1}, r"could not read image dict"),
        (
            np.zeros((10, 10, 7), dtype=np.uint8),
            r"could not read image ndarray of shape \(10, 10, 7\).*channels",
        ),
        (np.full((10, 10, 3), 2.0), r"float image arrays must hold values in \[0, 1\]"),
        (np.zeros((10, 10, 3), dtype=np.int64), r"must be uint8 or float"),
    ],
)
def test_unreadable_images_raise_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        Phi3VImageProcessor()(bad)


def test_not_an_image_file_raises_value_error(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not a png")
    with pytest.raises(ValueError, match="could not read image .*notes.png"):
        Phi3VImageProcessor()(path)


@pytest.mark.parametrize("num_crops", [0, -1, 2.5, "4", True, None])
def test_num_crops_is_validated(num_crops):
    with pytest.raises(ValueError, match="num_crops must be an integer >= 1"):
        Phi3VImageProcessor(num_crops=num_crops)


def test_defaults():
    processor = Phi3VImageProcessor()
    assert processor.num_crops == 1
    assert processor.num_img_tokens == 144
    assert processor.do_convert_rgb is True
    assert processor.image_mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert processor.image_std == pytest.approx([0.26862954, 0.26130258, 0.27577711])


def test_only_pt_tensors():
    with pytest.raises(ValueError, match="only return_tensors='pt'"):
        Phi3VImageProcessor()(_open("c_333x333.png"), return_tensors="np")


def test_save_load_round_trip(tmp_path):
    processor = Phi3VImageProcessor(num_crops=16)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "Phi3VImageProcessor"
    assert saved["num_crops"] == 16
    assert saved["num_img_tokens"] == 144

    loaded = Phi3VImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    assert Phi3VImageProcessor.from_pretrained(tmp_path, num_crops=2).num_crops == 2


def test_loads_official_config_without_remote_code():
    processor = Phi3VImageProcessor.from_pretrained(FIXTURES / "tiny_phi3v")
    assert processor.num_crops == 4
    assert "auto_map" not in processor.to_dict()
    assert Phi3VImageProcessor.from_pretrained(FIXTURES / "tiny_phi3v", num_crops=16).num_crops == 16


def _original_pixel_values(image: Image.Image, num_crops: int) -> tuple[torch.Tensor, list[int]]:
    """The previous, straightforward implementation of the HD transform (uint8 white padding, out-of-place
    ToTensor + Normalize on the channels-last view, reshape + cat + zero padding): the oracle that the
    optimised `preprocess` must reproduce. Returns pixel values (num_crops + 1, 3, 336, 336) and the padded
    [height, width]."""
    image = image.convert("RGB")
    transposed = image.width < image.height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    resized_w, resized_h, padded_h = hd_transform_size(image.width, image.height, num_crops)
    resized = np.asarray(image.resize((resized_w, resized_h), Image.Resampling.BILINEAR))
    top = int((padded_h - resized_h) / 2)
    padded = np.full((padded_h, resized_w, 3), 255, dtype=np.uint8)
    padded[top : top + resized_h] = resized
    if transposed:
        padded = padded.transpose(1, 0, 2)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])
    hd_image = torch.from_numpy(padded).permute(2, 0, 1).float().div(255)
    hd_image = hd_image.sub(mean[:, None, None]).div(std[:, None, None])
    _, height, width = hd_image.shape
    global_view = torch.nn.functional.interpolate(hd_image.unsqueeze(0), size=(336, 336), mode="bicubic")
    tiles = (
        hd_image.reshape(3, height // 336, 336, width // 336, 336)
        .permute(1, 3, 0, 2, 4)
        .reshape(-1, 3, 336, 336)
    )
    crops = torch.cat([global_view, tiles])
    out = torch.zeros(num_crops + 1, 3, 336, 336)
    out[: len(crops)] = crops
    return out, [height, width]


@pytest.mark.parametrize("seed", range(12))
def test_matches_straightforward_implementation_on_random_images(seed):
    """Random sizes (portrait, landscape, square, extreme), modes and crop budgets: the tiles and unused slots
    must be bit-identical to the straightforward implementation (same float32 ops on the same values). The
    global view is too on current torch; it gets ULP slack only because it interpolates a contiguous tensor
    where the original's was a channels-last view, and a future channels-last bicubic kernel could sum its
    taps in another order."""
    rng = np.random.default_rng(seed)
    width, height = (int(size) for size in rng.integers(1, 900, 2))
    if seed == 5:  # extreme aspect ratios: a one-row resize, mostly padding
        width, height = 1400, 3
    elif seed == 11:
        width, height = 4, 1300
    mode = ["RGB", "L", "RGBA", "P"][seed % 4]
    num_crops = [1, 2, 4, 9, 16][seed % 5]
    # Smooth gradients plus noise: both flat regions (like documents) and rounding-sensitive detail.
    yy, xx = np.mgrid[0:height, 0:width]
    base = (xx * 255 // max(width, 1) + yy * 127 // max(height, 1))[..., None] + np.array([0, 60, 120])
    noisy = (base + rng.integers(-40, 40, (height, width, 3))) % 256
    image = Image.fromarray(noisy.astype(np.uint8)).convert(mode)

    out = Phi3VImageProcessor(num_crops=num_crops)(image)
    expected, expected_size = _original_pixel_values(image, num_crops)
    assert out["image_sizes"][0].tolist() == expected_size
    pixel_values = out["pixel_values"][0]
    assert torch.equal(pixel_values[1:], expected[1:])
    torch.testing.assert_close(pixel_values[0], expected[0], atol=1e-6, rtol=0)
