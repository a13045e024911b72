"""Qwen2.5-VL image preprocessing, matching transformers' Qwen2-VL image processor (PIL path).

smart resize to multiples of 28 within [min_pixels, max_pixels] (bicubic), rescale to [0, 1],
CLIP normalisation, then flattening into 14x14 patches, each repeated over a temporal patch of
2, ordered so that every 2x2 block of patches (one LM token after merging) is contiguous.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(ValueError):
    """An image that cannot be read or used."""


@dataclass(frozen=True)
class ImageConfig:
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Height and width, multiples of ``factor``, area within bounds, aspect ratio kept."""
    if min(height, width) <= 0:
        raise ImageError(f"image of size {width}x{height} is empty")
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"aspect ratio {max(height, width) / min(height, width):.0f} exceeds 200 ({width}x{height})")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as transformers' ``convert_to_rgb``):
    a diagram drawn in black on a transparent background must not turn all black."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("RGB")
    return img.convert("RGB")


def resolve_image(source, root: str | Path | None):
    """(name for errors, something ``Image.open`` takes) of an image source."""
    if isinstance(source, dict):
        if source.get("bytes"):
            source = source["bytes"]
        elif source.get("path"):
            source = source["path"]
        else:
            raise ImageError(f"image record has neither bytes nor a path: keys {sorted(source)}")
    if isinstance(source, (bytes, bytearray)):
        return "<bytes>", io.BytesIO(source)
    path = Path(source)
    if root is not None and not path.is_absolute():
        path = Path(root) / path
    if not path.is_file():
        raise ImageError(f"image file {path} does not exist (a relative path is read under the data's image root: "
                         f"data.image_root for the trainers, image_root for eval; by default the data file's folder)")
    return str(path), path


def load_image(source, root: str | Path | None = None) -> Image.Image:
    """Open and decode an image as RGB; errors name the file.

    ``source``: a path (relative ones under ``root``), encoded bytes, a decoded PIL image, or a
    ``{"bytes": ..., "path": ...}`` dict as ``datasets`` stores images in parquet files.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    name, opener = resolve_image(source, root)
    try:
        with Image.open(opener) as img:
            img.load()
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"image {name} cannot be decoded: {e}") from e


def image_size(source, root: str | Path | None = None) -> tuple[int, int]:
    """``(width, height)`` of an image from its header alone (no pixels decoded); the sources of
    :func:`load_image`."""
    if isinstance(source, Image.Image):
        return source.size
    name, opener = resolve_image(source, root)
    try:
        with Image.open(opener) as img:
            return img.size
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"image {name} cannot be decoded: {e}") from e


def check_image(source, root: str | Path | None = None) -> None:
    """Check an image without decoding its pixels: it exists, its header reads, and its file's
    structure holds (PIL's ``verify``: e.g. every PNG chunk's checksum). Errors name the file."""
    if isinstance(source, Image.Image):
        return
    name, opener = resolve_image(source, root)
    try:
        with Image.open(opener) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"image {name} cannot be decoded: {e}") from e


def image_grid(width: int, height: int, cfg: ImageConfig = ImageConfig()) -> tuple[int, int, int]:
    """The patch grid ``(1, h, w)`` an image of this size becomes."""
    h, w = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    return 1, h // cfg.patch_size, w // cfg.patch_size


def process_image(image: Image.Image, cfg: ImageConfig = ImageConfig()) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One RGB image -> (``[grid_h * grid_w, 3 * 2 * 14 * 14]`` float32 patches, grid ``(1, h, w)``)."""
    _, gh, gw = image_grid(image.width, image.height, cfg)
    h, w = gh * cfg.patch_size, gw * cfg.patch_size
    pixels = np.asarray(image.resize((w, h), resample=Image.BICUBIC), dtype=np.uint8)
    x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    x = x.transpose(2, 0, 1)  # CHW
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    x = x.reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # blocks, then C x P x P
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], tp, p, p))  # a still image fills both frames
    return torch.from_numpy(np.ascontiguousarray(x).reshape(gh * gw, 3 * tp * p * p)), (1, gh, gw)


def process_images(images: Sequence[Image.Image], cfg: ImageConfig = ImageConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """Several images -> concatenated patches and ``image_grid_thw [n, 3]``."""
    if not images:
        return torch.zeros(0, 3 * cfg.temporal_patch_size * cfg.patch_size**2), torch.zeros(0, 3, dtype=torch.long)
    out = [process_image(img, cfg) for img in images]
    return torch.cat([p for p, _ in out]), torch.tensor([g for _, g in out], dtype=torch.long)


def image_token_count(grid: tuple[int, int, int], cfg: ImageConfig = ImageConfig()) -> int:
    t, h, w = grid
    return t * h * w // cfg.merge_size**2
