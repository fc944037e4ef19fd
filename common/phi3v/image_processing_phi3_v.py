"""Phi-3.5-vision image processor: the "HD transform" into 336x336 crops plus one global view.

Reimplements the hub remote code (`image_processing_phi3_v.py`, transformers 4.45) with PIL/numpy/torch only.
For each image: convert to RGB (alpha dropped; grayscale stays one plane until normalisation, which gives
the same pixels), resize so that at most `num_crops` 336x336 tiles cover it (keeping the aspect ratio), pad
the short side with white to a multiple of 336, normalise with the CLIP mean/std, then emit
`[global 336x336 bicubic downscale, tile_0, tile_1, ...]` zero-padded to `num_crops + 1` entries.
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


def to_rgb_or_gray(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB via PIL's `convert`, except that "L" stays "L".

    Alpha is dropped, not composited (the original's behaviour, checked against its output on an RGBA image).
    "L" is kept because `convert("RGB")` only replicates it into three equal channels, and PIL resamples each
    channel independently with the same integer arithmetic, so resizing the one plane gives bit-identical
    pixels at a third of the resize cost (`hd_canvas` broadcasts it to three channels).
    """
    if image.mode in ("RGB", "L"):
        return image
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ValueError(f"could not convert image of mode {image.mode!r} to RGB: {err}") from err


def hd_resize(image: Image.Image, num_crops: int) -> tuple[np.ndarray, bool, int]:
    """RGB or L PIL image -> (resized uint8 array (C, h, w) with C = 3 or 1, transposed, padded length).

    The array is in the input's orientation; the HD image pads it with white along its short axis (rows
    for a landscape image, columns for a portrait one, i.e. `transposed`) to the padded length, a multiple
    of 336.
    Portrait images are resized transposed, exactly like the original, because PIL's two-pass resampling
    rounds between passes and is therefore not transpose-symmetric; the result is transposed back in PIL
    (~1 ms for a page, about what a strided copy from a numpy transpose view would cost later) so that the
    rest of the pipeline works in the input's orientation.
    """
    transposed = image.width < image.height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    resized_w, resized_h, padded_h = hd_transform_size(image.width, image.height, num_crops)
    resized = image.resize((resized_w, resized_h), Image.Resampling.BILINEAR)
    if transposed:
        resized = resized.transpose(Image.Transpose.TRANSPOSE)
    array = np.asarray(resized)  # (h, w, 3) for RGB, (h, w) for L; read-only
    return (array.transpose(2, 0, 1) if array.ndim == 3 else array[None]), transposed, padded_h


def hd_canvas(image: Image.Image, num_crops: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """RGB or L PIL image -> normalised, white-padded HD image, contiguous float32 (3, H, W), H and W
    multiples of 336 holding at most num_crops tiles. `mean`, `std`: float32 (3,).

    Bit-identical to the original's `ToTensor()` + `Normalize` of the padded uint8 image: the same float32
    ops (`/ 255`, `- mean`, `/ std`) in the same order, but in place on the content band of one preallocated
    canvas, and the padding filled with the normalised white value instead of being normalised pixel by
    pixel. Contiguous (the original's tensor was a channels-last, and for portraits transposed, view) so
    that the bicubic global view and the tile copies read memory in order.
    """
    content, transposed, padded = hd_resize(image, num_crops)
    # Pad axis of the (3, H, W) canvas: rows (1) for landscape content, columns (2) for portrait.
    axis = 2 if transposed else 1
    length = content.shape[axis]
    shape = [3, *content.shape[1:]]
    shape[axis] = padded
    canvas = torch.empty(shape, dtype=torch.float32)
    top = int((padded - length) / 2)
    band = canvas.narrow(axis, top, length)
    # uint8 -> float32 straight into the canvas (numpy view of its memory: no temporary, and no torch
    # warning about the read-only PIL buffer); a 1-channel (L) plane broadcasts to the three channels.
    np.copyto(band.numpy(), content, casting="unsafe")
    band.div_(255).sub_(mean[:, None, None]).div_(std[:, None, None])
    white = torch.full((3, 1, 1), 255.0).div_(255).sub_(mean[:, None, None]).div_(std[:, None, None])
    canvas.narrow(axis, 0, top).copy_(white)
    canvas.narrow(axis, top + length, padded - top - length).copy_(white)
    return canvas


def write_crops(canvas: torch.Tensor, out: torch.Tensor) -> None:
    """Normalised (3, H, W) HD image -> `out` (num_crops + 1, 3, 336, 336), written in place: the global
    bicubic 336x336 view in slot 0, the H/336 * W/336 tiles row-major in the next slots, zeros after.

    The global view interpolates the normalised image, as the original did (not the uint8 one: bicubic
    overshoot and rounding would differ). The tiles are one strided copy from a view of the canvas, without
    the original's reshape copy, `cat` and zero-padded output copy.
    """
    _, height, width = canvas.shape
    rows, cols = height // CROP_SIZE, width // CROP_SIZE
    used = 1 + rows * cols
    out[0] = F.interpolate(canvas.unsqueeze(0), size=(CROP_SIZE, CROP_SIZE), mode="bicubic")[0]
    tiles = canvas.view(3, rows, CROP_SIZE, cols, CROP_SIZE).permute(1, 3, 0, 2, 4)
    out[1:used].view(rows, cols, 3, CROP_SIZE, CROP_SIZE).copy_(tiles)
    out[used:].zero_()


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
        # Every slot is written by `write_crops` (unused ones zeroed there), so no zero-fill up front.
        pixel_values = torch.empty(len(images), self.num_crops + 1, 3, CROP_SIZE, CROP_SIZE)
        image_sizes = torch.zeros(len(images), 2, dtype=torch.long)
        for index, image in enumerate(images):
            canvas = hd_canvas(to_rgb_or_gray(to_pil(image)), self.num_crops, mean, std)
            write_crops(canvas, pixel_values[index])
            image_sizes[index] = torch.tensor(canvas.shape[1:])
        num_img_tokens = [num_image_tokens(h, w) for h, w in image_sizes.tolist()]
        return BatchFeature(
            data={"pixel_values": pixel_values, "image_sizes": image_sizes, "num_img_tokens": num_img_tokens}
        )
