"""Image preprocessing: any size and band layout in, normalised square batch out."""
from __future__ import annotations

import numpy as np
import torch

from engine.model.image_processing import preprocess_images


def test_images_of_any_size_become_a_normalised_square_batch():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (50, 80, 3), dtype=np.uint8), rng.integers(0, 256, (300, 200), dtype=np.uint8),
              rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)]
    x = preprocess_images(images, 64)
    assert x.shape == (3, 3, 64, 64) and x.dtype == torch.float32
    assert torch.isfinite(x).all()


def test_constant_image_maps_to_its_normalised_value():
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    x = preprocess_images([np.full((10, 30, 3), 255, dtype=np.uint8)], 16, mean, std)
    assert torch.allclose(x, torch.full_like(x, 2.0), atol=1e-5)
