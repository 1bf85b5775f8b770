"""Image preprocessing: uint8 HxWx3 arrays -> normalised (B, 3, S, S) tensors.

Why a plain stretch to S x S (no crop, no padding): the grounding boxes are written on a 0-100
grid relative to the image the model sees; stretching keeps that grid aligned with the raster
window's pixel grid (x_px = x_grid / 100 * width on each axis), so boxes map back to map
coordinates with no offset bookkeeping.  Resizing uses antialiased bicubic interpolation (large
raster windows are downsampled a lot), and the mean/std default to CLIP's, which a LLaVA vision
tower expects and which are harmless for the models trained here.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import RsLvlmConfig

__all__ = ["preprocess_images", "to_rgb_uint8", "CLIP_MEAN", "CLIP_STD"]

_DEFAULTS = RsLvlmConfig()
CLIP_MEAN: tuple[float, ...] = tuple(_DEFAULTS.image_mean)
CLIP_STD: tuple[float, ...] = tuple(_DEFAULTS.image_std)


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Coerce HxW, HxWx1, HxWx3 or HxWx4 (uint8, or float in 0..1 / 0..255) to HxWx3 uint8."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] == 0:
        raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    arr = arr[:, :, :3]
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8)
    return arr


def preprocess_images(
    images: Sequence[np.ndarray],
    image_size: int,
    mean: Sequence[float] = _DEFAULTS.image_mean,
    std: Sequence[float] = _DEFAULTS.image_std,
    rescale: float = 1 / 255,
) -> torch.Tensor:
    """List of HxWx3 uint8 images (any sizes) -> (B, 3, image_size, image_size) float32.

    ``rescale`` maps 0..255 to the range the mean/std apply to (a LLaVA folder's
    ``preprocessor_config.json`` may give its own).
    """
    if len(images) == 0:
        raise ValueError("no images to preprocess")
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    batch = []
    for image in images:
        arr = to_rgb_uint8(image)
        if arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ValueError(f"empty image of shape {arr.shape}")
        # a copy: rendered scenes arrive read-only from shared memory, which torch warns about
        x = torch.from_numpy(np.array(arr)).permute(2, 0, 1).float()[None] * rescale  # (1,3,H,W)
        if x.shape[-2:] != (image_size, image_size):
            x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", antialias=True, align_corners=False)
        batch.append(((x[0].clamp(0.0, 255.0 * rescale) - mean_t) / std_t))
    return torch.stack(batch)
