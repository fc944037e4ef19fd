"""Phi-3.5-vision image processor: the "HD transform" into 336x336 crops plus one global view.

Reimplements the hub remote code (`image_processing_phi3_v.py`, transformers 4.45) with PIL/numpy/torch only.
For each image: convert to RGB (alpha dropped), resize so that at most `num_crops` 336x336 tiles
cover it (keeping the aspect ratio), pad the short side with white to a multiple of 336, normalise with the
CLIP mean/std, then emit `[global 336x336 bicubic downscale, tile_0, tile_1, ...]` zero-padded to
`num_crops + 1` entries.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.processing_utils import ImagesKwargs

CROP_SIZE = 336
# Each 336x336 crop becomes 24x24 CLIP patches, merged 2x2 into 12x12 = 144 tokens; every row of 12 tokens
# (of the tiled sub-image and of the global image) is followed by one learned newline token.
TOKENS_PER_CROP = 144
TOKENS_PER_CROP_ROW = 12

ImageLike = Any  # PIL.Image.Image | np.ndarray | torch.Tensor | str | os.PathLike


class Phi3VImagesKwargs(ImagesKwargs, total=False):
    """Image-processor kwargs that `from_pretrained(..., num_crops=N)` may override."""

    num_crops: int
    num_img_tokens: int


def hd_transform_size(width: int, height: int, num_crops: int) -> tuple[int, int, int]:
    """Size math of the HD transform for a landscape-oriented (width >= height) image.

    Returns `(resized_w, resized_h, padded_h)`: the image is resized to `resized_w x resized_h` (resized_w a
    multiple of 336) then padded top and bottom to `padded_h`, the next multiple of 336.
    """
    ratio = width / height
    scale = 1
    # Largest number of tile columns whose tile grid (scale x ceil(scale / ratio)) fits in num_crops.
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    resized_w = int(scale * CROP_SIZE)
    # The original crashes (PIL resize to height 0) for aspect ratios beyond ~336 * num_crops : 1; keep one row.
    resized_h = max(int(resized_w / ratio), 1)
    padded_h = int(math.ceil(resized_h / CROP_SIZE) * CROP_SIZE)
    return resized_w, resized_h, padded_h


def padded_image_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(height, width) of the padded HD image for a `width x height` input, in the input's orientation."""
    transposed = width < height
    if transposed:
        width, height = height, width
    padded_w, _, padded_h = hd_transform_size(width, height, num_crops)
    return (padded_w, padded_h) if transposed else (padded_h, padded_w)


def num_image_tokens(padded_h: int, padded_w: int) -> int:
    """Image placeholder tokens for a padded HD image: tiles + global view, plus row separators and one
    separator between the two views."""
    rows, cols = padded_h // CROP_SIZE, padded_w // CROP_SIZE
    return int((rows * cols + 1) * TOKENS_PER_CROP + 1 + (rows + 1) * TOKENS_PER_CROP_ROW)


def _as_list(images: ImageLike | list[ImageLike]) -> list[ImageLike]:
    """One image or a list/tuple of images -> list of images."""
    return list(images) if isinstance(images, (list, tuple)) else [images]


def _describe(image: object) -> str:
    """Short name of an image input for error messages."""
    if isinstance(image, (str, os.PathLike)):
        return repr(os.fspath(image))
    shape = getattr(image, "shape", None)
    return f"{type(image).__name__}" + (f" of shape {tuple(shape)}" if shape is not None else "")


def _array_to_pil(array: np.ndarray, channels_first_default: bool) -> Image.Image:
    """HWC / CHW / HW array, uint8 or float in [0, 1], with 1, 3 or 4 channels -> PIL image (L, RGB, RGBA)."""
    if array.ndim == 3:
        first_ok, last_ok = array.shape[0] in (1, 3, 4), array.shape[-1] in (1, 3, 4)
        if not (first_ok or last_ok):
            raise ValueError(f"expected 1, 3 or 4 channels first or last, got shape {array.shape}")
        # Both ends look like channels only for tiny images; fall back to the container's convention.
        if first_ok and (not last_ok or channels_first_default):
            array = array.transpose(1, 2, 0)
        if array.shape[-1] == 1:
            array = array[..., 0]
    elif array.ndim != 2:
        raise ValueError(f"expected a 2-D or 3-D image array, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        if array.size and (array.min() < 0 or array.max() > 1):
            raise ValueError("float image arrays must hold values in [0, 1]")
        array = np.round(array * 255)
    elif array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 or float in [0, 1], got {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(array.astype(np.uint8)))


def to_pil(image: ImageLike) -> Image.Image:
    """Load any supported image input as a PIL image; ValueError naming the input if that is impossible.

    Accepts PIL images, file paths, numpy arrays (HWC by default) and torch tensors (CHW by default).
    """
    try:
        if isinstance(image, Image.Image):
            return image
        if isinstance(image, (str, os.PathLike)):
            with Image.open(image) as opened:
                opened.load()
                return opened
        if isinstance(image, torch.Tensor):
            return _array_to_pil(image.detach().cpu().numpy(), channels_first_default=True)
        if isinstance(image, np.ndarray):
            return _array_to_pil(image, channels_first_default=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not read image {_describe(image)}: {err}") from err
    raise ValueError(
        f"could not read image {_describe(image)}: expected a PIL image, a file path, a numpy array or a torch tensor"
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB via PIL's `convert`: alpha is dropped, not composited (the original's behaviour,
    checked against its output on an RGBA image)."""
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ValueError(f"could not convert image of mode {image.mode!r} to RGB: {err}") from err


def hd_transform(image: Image.Image, num_crops: int) -> np.ndarray:
    """RGB PIL image -> uint8 array (H, W, 3) with H, W multiples of 336 holding at most num_crops tiles.

    Portrait images are transposed before and after, exactly like the original, because PIL's two-pass
    resampling rounds between passes and is therefore not transpose-symmetric.
    """
    transposed = image.width < image.height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    resized_w, resized_h, padded_h = hd_transform_size(image.width, image.height, num_crops)
    resized = np.asarray(image.resize((resized_w, resized_h), Image.Resampling.BILINEAR))
    top = int((padded_h - resized_h) / 2)
    padded = np.full((padded_h, resized_w, 3), 255, dtype=np.uint8)
    padded[top : top + resized_h] = resized
    return padded.transpose(1, 0, 2) if transposed else padded


def to_crops(hd_image: torch.Tensor) -> torch.Tensor:
    """Normalised (3, H, W) HD image -> (1 + H/336 * W/336, 3, 336, 336): global view, then tiles row-major."""
    _, height, width = hd_image.shape
    global_view = F.interpolate(hd_image.unsqueeze(0), size=(CROP_SIZE, CROP_SIZE), mode="bicubic")
    tiles = (
        hd_image.reshape(3, height // CROP_SIZE, CROP_SIZE, width // CROP_SIZE, CROP_SIZE)
        .permute(1, 3, 0, 2, 4)
        .reshape(-1, 3, CROP_SIZE, CROP_SIZE)
    )
    return torch.cat([global_view, tiles], dim=0)


class Phi3VImageProcessor(BaseImageProcessor):
    """Phi-3.5-vision HD-transform image processor (see the module docstring)."""

    model_input_names = ["pixel_values", "image_sizes"]
    valid_kwargs = Phi3VImagesKwargs

    def __init__(
        self,
        num_crops: int = 1,
        image_mean: list[float] | tuple[float, ...] = tuple(OPENAI_CLIP_MEAN),
        image_std: list[float] | tuple[float, ...] = tuple(OPENAI_CLIP_STD),
        do_convert_rgb: bool = True,
        num_img_tokens: int = TOKENS_PER_CROP,
        **kwargs,
    ) -> None:
        # `do_convert_rgb` is kept for config round trips only: images are always converted to RGB, as in the
        # original (whose transformers 4.45 `convert_to_rgb` was a plain `convert("RGB")`).
        # Hub checkpoints point `auto_map` at remote code that our saved folders do not ship; never re-save it.
        kwargs.pop("auto_map", None)
        super().__init__(**kwargs)
        if isinstance(num_crops, bool) or not isinstance(num_crops, int) or num_crops < 1:
            raise ValueError(f"num_crops must be an integer >= 1, got {num_crops!r}")
        self.num_crops = num_crops
        self.num_img_tokens = num_img_tokens
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.do_convert_rgb = do_convert_rgb

    def calc_num_image_tokens(self, images: ImageLike | list[ImageLike]) -> list[int]:
        """Image token count per image (list of ints), from the image sizes alone (no HD transform)."""
        return [self.calc_num_image_tokens_from_image_size(*to_pil(image).size) for image in _as_list(images)]

    def calc_num_image_tokens_from_image_size(self, width: int, height: int) -> int:
        """Image token count for a `width x height` image."""
        return num_image_tokens(*padded_image_size(width, height, self.num_crops))

    def preprocess(
        self,
        images: ImageLike | list[ImageLike],
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        """One image or a list of N images -> BatchFeature with
        `pixel_values` float32 (N, num_crops + 1, 3, 336, 336), `image_sizes` long (N, 2) as [h, w] of the
        padded HD image, and `num_img_tokens` (list of N ints). Always returns torch tensors."""
        if return_tensors not in (None, "pt"):
            raise ValueError(f"only return_tensors='pt' is supported, got {return_tensors!r}")
        mean = torch.tensor(self.image_mean if image_mean is None else image_mean, dtype=torch.float32)
        std = torch.tensor(self.image_std if image_std is None else image_std, dtype=torch.float32)

        images = _as_list(images)
        pixel_values = torch.zeros(len(images), self.num_crops + 1, 3, CROP_SIZE, CROP_SIZE)
        image_sizes = torch.zeros(len(images), 2, dtype=torch.long)
        for index, image in enumerate(images):
            hd_image = hd_transform(to_rgb(to_pil(image)), self.num_crops)
            # ToTensor + Normalize, in float32 like torchvision.
            normalised = torch.from_numpy(hd_image).permute(2, 0, 1).float().div(255)
            normalised = normalised.sub(mean[:, None, None]).div(std[:, None, None])
            crops = to_crops(normalised)
            pixel_values[index, : len(crops)] = crops
            image_sizes[index] = torch.tensor(normalised.shape[1:])
        num_img_tokens = [num_image_tokens(h, w) for h, w in image_sizes.tolist()]
        return BatchFeature(
            data={"pixel_values": pixel_values, "image_sizes": image_sizes, "num_img_tokens": num_img_tokens}
        )
