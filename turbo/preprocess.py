"""Turning user images into model inputs, and model outputs back into images.

Conventions follow the original img2img-turbo code: paired conditions are in [0, 1] (Canny edges as
three equal channels, sketches as `to_tensor(img) < 0.5` so dark strokes are 1), unpaired inputs are
in [-1, 1], and outputs in [-1, 1] are turned into images with torchvision's `ToPILImage`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import IO, Literal, get_args

import cv2
import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import transforms

from turbo.errors import SettingError, TurboError

logger = logging.getLogger(__name__)

# Larger images are refused before decoding: a small file can decode into gigabytes (a
# decompression bomb), and the models work at about 512 px anyway.
MAX_PIXELS = 8192 * 8192

# How an image becomes a model input (see `to_model_input`); a checkpoint records its own.
Preprocess = Literal["canny", "sketch", "none", "unpaired"]
PREPROCESSES: tuple[Preprocess, ...] = get_args(Preprocess)

IMAGE_PREPS = (
    "resized_crop_512",
    "resize_286_randomcrop_256x256_hflip",
    "resize_256",
    "resize_256x256",
    "resize_512",
    "resize_512x512",
    "no_resize",
)
# the deterministic ones: what validation, evaluation and inference may use
EVAL_IMAGE_PREPS = tuple(p for p in IMAGE_PREPS if "random" not in p)

ImageSource = str | os.PathLike | IO[bytes] | Image.Image


class ImageError(TurboError):
    """An image that cannot be used: missing, unreadable, corrupt, too large or too small."""


class ThresholdError(ImageError):
    """Canny thresholds outside 0 <= low <= high <= 255."""


def load_image(source: ImageSource, max_side: int | None = None) -> Image.Image:
    """Load an image as 8-bit RGB, the way the models expect it.

    source: a path, a binary file-like object, or a PIL image. The EXIF orientation is applied;
    transparent pixels are composited over white (so a transparent sketch background is white);
    16-bit and 32-bit modes are scaled to 8 bits. Images over MAX_PIXELS are refused. With
    max_side, an image whose longer side exceeds it is downscaled (see `load_image_limited`).
    Raises ImageError with a one-line message naming the problem.
    """
    if max_side is not None:
        return load_image_limited(source, max_side)[0]
    if isinstance(source, Image.Image):
        image = _decode(source, "the given image")
    else:
        image = _open_and_decode(source)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as exc:  # a broken EXIF block should not make a usable image unusable
        logger.warning("ignoring unreadable EXIF orientation: %s", exc)
    return _to_rgb8(image)


def load_image_limited(source: ImageSource, max_side: int) -> tuple[Image.Image, tuple[int, int]]:
    """`load_image` downscaled (LANCZOS, aspect kept) so its longer side is at most `max_side`, and
    the size (width, height) before downscaling, as the user sees the image (after the EXIF
    rotation), so callers can report it or restore it.

    Raises ImageError when downscaling would leave the short side under 8 px (what the models need),
    naming the image's own size rather than the downscaled one the user never saw.
    """
    if max_side < 1:
        raise ImageError(f"max_side must be a positive number of pixels, got {max_side}")
    return limit_size(load_image(source), max_side)


def limit_size(image: Image.Image, max_side: int) -> tuple[Image.Image, tuple[int, int]]:
    """An already loaded image downscaled as `load_image_limited` does, and its size before.

    For callers that look at the full-size image first (the app checks a sketch for strokes before
    thin ones could fade in the downscale). ImageError as in `load_image_limited`.
    """
    if max_side < 1:
        raise ImageError(f"max_side must be a positive number of pixels, got {max_side}")
    size = image.size
    if max(size) > max_side:
        short = min(_downscaled_size(size, max_side))
        if short < 8:
            raise ImageError(
                f"image is too narrow: {size[0]}x{size[1]} pixels; with its long side limited to {max_side} "
                f"px its short side would be {short} px, and the models need at least 8"
            )
        image = _downscale(image, max_side)
    return image, size


def _open_and_decode(source: str | os.PathLike | IO[bytes]) -> Image.Image:
    if isinstance(source, str | os.PathLike):
        name = os.fspath(source)
        if not os.path.isfile(name):
            raise ImageError(f"no such image file: {name}")
    else:
        name = str(getattr(source, "name", "<stream>"))
    try:
        with Image.open(source) as opened:
            return _decode(opened, name)
    except UnidentifiedImageError as exc:
        raise ImageError(f"not an image file (unrecognised format): {name}") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image refused as a possible decompression bomb: {name} ({exc})") from exc
    except PermissionError as exc:
        raise ImageError(f"cannot read image file {name}: permission denied") from exc
    except OSError as exc:  # headers cut short or malformed
        raise ImageError(f"corrupt or truncated image {name}: {exc}") from exc


def _decode(image: Image.Image, name: str) -> Image.Image:
    """Check the size from the header, then force a full decode so corruption shows up here."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"image too large: {width}x{height} pixels is over the limit of {MAX_PIXELS} ({name})"
        )
    if width == 0 or height == 0:
        raise ImageError(f"image is empty: {width}x{height} pixels ({name})")
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image refused as a possible decompression bomb: {name} ({exc})") from exc
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, zlib.error, ...
        raise ImageError(f"corrupt or truncated image {name}: {exc}") from exc
    return image


def _to_rgb8(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_scale_to_uint8(np.asarray(image), mode)).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageError(f"unsupported image mode {mode!r}") from exc


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit: v / 257 (the inverse of 8-to-16-bit expansion). 32-bit int: treated as 16-bit when in
    [0, 65535] (how Pillow presents most 16-bit files), else stretched min..max. Float: [0, 1] maps
    to [0, 255], any other range is stretched min..max."""
    values = values.astype(np.float64)
    if values.size == 0:
        return values.astype(np.uint8)
    low, high = float(values.min()), float(values.max())
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and high <= 65535):
        scaled = values / 257.0
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(values)
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def _downscaled_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    scale = max_side / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _downscale(image: Image.Image, max_side: int) -> Image.Image:
    size = _downscaled_size(image.size, max_side)
    logger.warning("downscaling a %dx%d image to %dx%d (max side %d)", *image.size, *size, max_side)
    return image.resize(size, Image.Resampling.LANCZOS)


def check_canny_thresholds(low: float, high: float) -> None:
    """ThresholdError unless 0 <= low <= high <= 255.

    cv2.Canny itself takes any numbers (it swaps low > high, and on 8-bit images gradients go past
    255), but the original app's sliders stop at 255 and a swapped pair is more likely a typo than a
    wish, so callers check once, before any work (a CLI folder run would otherwise fail per image).
    NaN fails too (every comparison with it is false).
    """
    if not 0 <= low <= high <= 255:
        raise ThresholdError(
            f"Canny thresholds must satisfy 0 <= low <= high <= 255, got low={low}, high={high}"
        )


def canny_edges(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """Canny edges of an RGB image, as the original `canny_from_pil` computes them.

    Returns an RGB image with three equal channels, each pixel 0 or 255 (edges are 255).
    Thresholds must satisfy 0 <= low <= high <= 255 (else ThresholdError).
    """
    check_canny_thresholds(low, high)
    if image.mode != "RGB":
        image = image.convert("RGB")
    edges = cv2.Canny(np.asarray(image), low, high)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def invert(image: Image.Image) -> Image.Image:
    """255 - pixel, as the original shows edge maps and sketches (dark lines on white)."""
    return ImageOps.invert(image.convert("RGB"))


def to_model_input(image: Image.Image, kind: Preprocess) -> torch.Tensor:
    """An RGB image as a model input tensor, float32, shape (1, 3, H, W).

    kind:
      "canny"    the image is already an edge map: values in [0, 1];
      "sketch"   1 where a channel is dark (`to_tensor(img) < 0.5`), 0 elsewhere;
      "none"     the image as is, in [0, 1] (the original paired CLI for custom models);
      "unpaired" the image normalised to [-1, 1].
    """
    if kind not in PREPROCESSES:
        raise SettingError(f"unknown preprocess {kind!r}; one of {', '.join(PREPROCESSES)}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    tensor = TF.to_tensor(image)
    if kind == "sketch":
        tensor = (tensor < 0.5).float()
    elif kind == "unpaired":
        tensor = TF.normalize(tensor, mean=[0.5], std=[0.5])
    return tensor.unsqueeze(0)


def resize_to_multiple_of_8(image: Image.Image) -> Image.Image:
    """Crop-free resize to the largest multiple-of-8 size not above the image's (LANCZOS).

    Sides already a multiple of 8 are kept; as in the original paired CLI, the image is squeezed
    by up to 7 px per side rather than cropped.
    """
    width, height = image.size
    if width < 8 or height < 8:
        raise ImageError(f"image is too small: {width}x{height} pixels, each side must be at least 8")
    return image.resize((width - width % 8, height - height % 8), Image.Resampling.LANCZOS)


def restore_size(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize an output back to size (width, height) with LANCZOS, if it differs."""
    width, height = size
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)


def build_transform(image_prep: str) -> Callable[[Image.Image], Image.Image]:
    """The original's image preparations (PIL -> PIL), by name; see IMAGE_PREPS.

    "resized_crop_512": short side to 512 then centre crop 512x512; "resize_286_randomcrop_256x256_hflip":
    286x286, random 256x256 crop, random horizontal flip (training only); "resize_256"/"resize_256x256"
    and "resize_512"/"resize_512x512": squeeze to that square; "no_resize": unchanged.
    """
    lanczos = transforms.InterpolationMode.LANCZOS
    if image_prep == "resized_crop_512":
        return transforms.Compose([transforms.Resize(512, interpolation=lanczos), transforms.CenterCrop(512)])
    if image_prep == "resize_286_randomcrop_256x256_hflip":
        return transforms.Compose(
            [
                transforms.Resize((286, 286), interpolation=lanczos),
                transforms.RandomCrop((256, 256)),
                transforms.RandomHorizontalFlip(),
            ]
        )
    if image_prep in ("resize_256", "resize_256x256"):
        return transforms.Resize((256, 256), interpolation=lanczos)
    if image_prep in ("resize_512", "resize_512x512"):
        return transforms.Resize((512, 512), interpolation=lanczos)
    if image_prep == "no_resize":
        return transforms.Compose([])
    raise SettingError(f"unknown image_prep {image_prep!r}; valid: {', '.join(IMAGE_PREPS)}")


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """A model output in [-1, 1], shape (3, H, W) or (1, 3, H, W), as an RGB image.

    Bit for bit what the original does (`ToPILImage()(t * 0.5 + 0.5)`, which truncates rather than
    rounds); values outside [-1, 1] are clamped first, as the models' outputs already are.
    """
    if tensor.dim() == 4:
        if tensor.shape[0] != 1:
            raise ValueError(f"to_pil takes one image, got a batch of {tensor.shape[0]}; use to_pil_batch")
        tensor = tensor[0]
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        raise ValueError(f"expected an image tensor of shape (3, H, W), got {tuple(tensor.shape)}")
    image = tensor.detach().cpu().float().clamp(-1.0, 1.0) * 0.5 + 0.5
    return TF.to_pil_image(image)


def to_pil_batch(tensor: torch.Tensor) -> list[Image.Image]:
    """Outputs in [-1, 1], shape (B, 3, H, W), as a list of B RGB images (see to_pil)."""
    if tensor.dim() != 4:
        raise ValueError(f"expected a batch of shape (B, 3, H, W), got {tuple(tensor.shape)}")
    return [to_pil(image) for image in tensor]
