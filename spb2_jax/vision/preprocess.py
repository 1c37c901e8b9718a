"""Raw images -> ``pixel_values`` rows and ``image_grid_thw``, ordered as the official (Qwen2-VL) image processor.

An image ``[H, W, C]`` uint8 becomes ``t x h x w`` patches (``h = H / P``, ``w = W / P``; a single frame is repeated
``temporal_patch_size`` times, so ``t = 1``). Rows are ordered ``(t, h / m, w / m, m, m)`` (each ``m x m`` merge
window contiguous) and each row holds ``(C, temporal_patch, P, P)`` row-major of ``(x / 255 - mean) / std``.

``smart_resize`` is the Qwen-VL size rule: the nearest sizes that are multiples of ``factor = P * m`` with the
pixel count inside ``[min_pixels, max_pixels]`` (aspect ratio kept as far as rounding allows).
"""

from __future__ import annotations

import math
import os

import numpy as np
from einops import rearrange

from spb2_jax.vision.config import VisionConfig

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


def smart_resize(height: int, width: int, factor: int, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """``(height, width)`` rounded to multiples of ``factor``, scaled into ``[min_pixels, max_pixels]``."""
    if min(height, width) <= 0:
        raise ValueError(f"image size {height}x{width} must be positive")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.1f} is over 200")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def load_image(image) -> np.ndarray:
    """A uint8 ``[H, W, 3]`` array from an array (HWC, uint8; grey ``[H, W]`` repeated to 3 channels) or a file
    path (Pillow, converted to RGB)."""
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image

        if not os.path.isfile(image):
            raise FileNotFoundError(f"image {os.fspath(image)!r}: no such file")
        with Image.open(image) as im:
            return np.asarray(im.convert("RGB"))
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.dtype != np.uint8:
        raise ValueError(f"an image must be a uint8 [H, W, C] array or a file path, got {a.dtype}{list(a.shape)}")
    return a


def patchify(image, config: VisionConfig, *, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize: bool = False,
             min_pixels: int = 56 * 56, max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[np.ndarray, np.ndarray]:
    """One image -> ``(pixel_values [t*h*w, patch_dim] float32, grid_thw [3] int64)`` (module docstring).

    Without ``resize`` the image's sides must already be multiples of ``patch_size * spatial_merge_size``; with it,
    the image is resized (bicubic, Pillow) to ``smart_resize``'s size first."""
    a = load_image(image)
    P, m, tp = config.patch_size, config.spatial_merge_size, config.temporal_patch_size
    if a.shape[-1] != config.in_channels:
        raise ValueError(f"image has {a.shape[-1]} channels; the vision tower takes {config.in_channels}")
    factor = P * m
    H, W = a.shape[:2]
    if resize:
        h2, w2 = smart_resize(H, W, factor, min_pixels, max_pixels)
        if (h2, w2) != (H, W):
            from PIL import Image

            a = np.asarray(Image.fromarray(a).resize((w2, h2), Image.BICUBIC))
            H, W = h2, w2
    elif H % factor or W % factor:
        if H < factor or W < factor:
            raise ValueError(f"image {H}x{W} is smaller than one merged patch ({factor}x{factor} pixels)")
        raise ValueError(f"image {H}x{W}: sides must be multiples of patch_size x spatial_merge_size = {factor} "
                         f"(pass resize=True for the Qwen-VL resize rule)")
    x = (a.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    frames = np.repeat(x[None], tp, axis=0)  # [tp, H, W, C]: a still image is repeated temporal_patch times
    rows = rearrange(frames, "(t tp) (hb m1 p1) (wb m2 p2) c -> (t hb wb m1 m2) (c tp p1 p2)",
                     tp=tp, m1=m, p1=P, m2=m, p2=P)
    grid = np.asarray([1, H // P, W // P], np.int64)
    return np.ascontiguousarray(rows, np.float32), grid


def patchify_images(images, config: VisionConfig, **kw) -> tuple[np.ndarray, np.ndarray]:
    """Several images -> ``(pixel_values`` rows of all images in order, ``image_grid_thw [n, 3])``."""
    out = [patchify(im, config, **kw) for im in images]
    if not out:
        raise ValueError("no images given")
    return np.concatenate([r for r, _ in out]), np.stack([g for _, g in out])
