"""Texture, colour and sensor models for the procedural aerial-scene generator.

Why a texture *bank*: training renders scenes on the fly on two CPU cores, so a scene must cost a
few milliseconds.  Multi-octave noise, tree canopies and crop rows are expensive to synthesise,
but cheap to *crop*: they are built once per process from a fixed seed (so output stays a pure
function of the scene seed) and each scene reads a window of them at an offset drawn from its own
generator.  Every texture is a multiplicative brightness map around 1.0 that modulates the flat
base colour of a land-cover region, which keeps colour (what the annotations name) and texture
(what makes the task non-trivial) independent.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "BANK_SIZE",
    "TEX_SMOOTH", "TEX_GRASS", "TEX_SOIL", "TEX_WATER", "TEX_CANOPY",
    "TEX_ROWS_H", "TEX_ROWS_V", "TEX_ROWS_D1", "TEX_ROWS_D2", "TEX_SCRUB", "N_TEXTURES",
    "OBJECT_COLOURS", "COLOUR_NAMES", "REGION_PALETTE",
    "texture_bank", "compose_textures", "jitter_rgb", "object_rgb", "finish_image",
]

BANK_SIZE = 512
"""Side of each bank texture; a scene crops a window at a random offset (wrapping around only
for renders larger than the bank, since the bank is not tileable)."""

TEX_SMOOTH, TEX_GRASS, TEX_SOIL, TEX_WATER, TEX_CANOPY = 0, 1, 2, 3, 4
TEX_ROWS_H, TEX_ROWS_V, TEX_ROWS_D1, TEX_ROWS_D2, TEX_SCRUB = 5, 6, 7, 8, 9
N_TEXTURES = 10

COLOUR_NAMES: tuple[str, ...] = ("white", "red", "blue", "green", "grey", "yellow")
"""Object colour vocabulary (answers to colour questions)."""

# Reference RGB for each colour name.  Chosen far apart in RGB so that a name stays readable after
# shading, blur, noise and the per-scene colour jitter, and distinct from the usual ground colours.
OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (236, 236, 230),
    "red": (196, 44, 38),
    "blue": (42, 84, 190),
    "green": (46, 150, 62),
    "grey": (122, 124, 126),
    "yellow": (232, 200, 44),
}

# Base colours of land-cover surfaces (several variants each: intra-class variation).
REGION_PALETTE: dict[str, list[tuple[int, int, int]]] = {
    "grass": [(96, 126, 66), (112, 132, 74), (84, 116, 62), (128, 134, 86)],
    "dry_grass": [(146, 142, 96), (134, 132, 90)],
    "canopy": [(46, 82, 42), (40, 72, 44), (56, 88, 46)],
    "soil": [(152, 128, 98), (170, 146, 112), (140, 112, 86), (184, 164, 128)],
    "water": [(34, 62, 86), (40, 74, 78), (38, 66, 104), (30, 54, 70)],
    "asphalt": [(74, 75, 78), (86, 86, 88), (64, 66, 70)],
    "concrete": [(168, 166, 160), (156, 154, 150), (178, 174, 166)],
    "crop": [(92, 140, 58), (188, 170, 92), (130, 106, 76), (128, 160, 80), (160, 150, 70),
             (104, 128, 52)],
    "track": [(168, 72, 56), (150, 64, 52)],
}


def _octave_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth value noise: a cells x cells random grid upsampled bicubically to size x size."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def _fractal(rng: np.random.Generator, size: int, octaves: tuple[int, ...],
             gains: tuple[float, ...]) -> np.ndarray:
    """Sum of value-noise octaves, normalised to unit standard deviation."""
    acc = np.zeros((size, size), np.float32)
    for cells, gain in zip(octaves, gains):
        acc += gain * _octave_noise(rng, size, cells)
    return acc / (acc.std() + 1e-6)


def _canopy(rng: np.random.Generator, size: int) -> np.ndarray:
    """Dense tree crowns lit from the north-west: bright crowns, dark gaps and self-shadow."""
    img = Image.new("L", (size, size), 70)
    draw = ImageDraw.Draw(img)
    n = int(size * size / 38)
    xs = rng.uniform(-8, size + 8, n)
    ys = rng.uniform(-8, size + 8, n)
    rs = rng.uniform(3.0, 7.5, n)
    vs = rng.uniform(105, 150, n)
    for x, y, r, v in zip(xs, ys, rs, vs):
        draw.ellipse([x - r + 1.2, y - r + 1.2, x + r + 1.2, y + r + 1.2], fill=40)  # shadow side
        draw.ellipse([x - r, y - r, x + r, y + r], fill=int(v))
        h = r * 0.5
        draw.ellipse([x - h - r * 0.3, y - h - r * 0.3, x + h - r * 0.3, y + h - r * 0.3],
                     fill=int(min(255, v + 30)))
    img = img.filter(ImageFilter.GaussianBlur(0.6))
    arr = np.asarray(img, np.float32) / 118.0
    return arr


def _rows(rng: np.random.Generator, size: int, direction: str, base: np.ndarray) -> np.ndarray:
    """Crop rows (period ~6 px) along a direction, with noise so they are not a perfect grating."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    coord = {"h": yy, "v": xx, "d1": (xx + yy) / np.sqrt(2), "d2": (xx - yy) / np.sqrt(2)}[direction]
    period = 6.0
    wave = np.sin(2 * np.pi * coord / period + 0.6 * base)
    return 1.0 + 0.17 * wave + 0.05 * base


@lru_cache(maxsize=1)
def texture_bank() -> np.ndarray:
    """All textures as one (N_TEXTURES, BANK_SIZE, BANK_SIZE) float32 array, built once.

    Fixed seed: the bank is part of the renderer, not of the scene, so scenes stay reproducible.
    """
    rng = np.random.default_rng(20240607)
    s = BANK_SIZE
    bank = np.empty((N_TEXTURES, s, s), np.float32)
    fine = rng.standard_normal((s, s)).astype(np.float32)
    mid = _fractal(rng, s, (6, 12, 24, 48, 96), (1.0, 0.8, 0.6, 0.5, 0.4))
    low = _fractal(rng, s, (3, 6), (1.0, 0.5))
    soil = _fractal(rng, s, (4, 10, 24, 64, 160), (1.0, 0.7, 0.5, 0.4, 0.35))
    bank[TEX_SMOOTH] = 1.0 + 0.035 * mid + 0.025 * fine + 0.03 * low
    bank[TEX_GRASS] = 1.0 + 0.10 * mid + 0.04 * fine + 0.05 * low
    bank[TEX_SOIL] = 1.0 + 0.11 * soil + 0.05 * fine + 0.06 * low
    yy = np.mgrid[0:s, 0:s][0].astype(np.float32)
    ripple = np.sin(2 * np.pi * yy / 9.0 + 2.5 * mid)
    bank[TEX_WATER] = 1.0 + 0.06 * low + 0.035 * ripple + 0.015 * fine
    bank[TEX_CANOPY] = _canopy(rng, s) * (1.0 + 0.05 * low)
    for k, d in ((TEX_ROWS_H, "h"), (TEX_ROWS_V, "v"), (TEX_ROWS_D1, "d1"), (TEX_ROWS_D2, "d2")):
        bank[k] = _rows(rng, s, d, mid)
    scrub = np.ones((s, s), np.float32)
    dots = rng.random((s, s)) < 0.0022
    dot_img = Image.fromarray((dots * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(3))
    dot_img = dot_img.filter(ImageFilter.GaussianBlur(1.1))
    scrub -= 0.9 * np.asarray(dot_img, np.float32) / 255.0 * 1.6
    bank[TEX_SCRUB] = np.clip(scrub, 0.45, 1.0) * (1.0 + 0.10 * soil + 0.04 * fine)
    return bank


@lru_cache(maxsize=4)
def _window_index(size: int) -> np.ndarray:
    """Flat bank indices of a size x size window at offset (0, 0), wrapping around the bank."""
    yy, xx = np.mgrid[0:size, 0:size]
    return ((yy % BANK_SIZE) * BANK_SIZE + (xx % BANK_SIZE)).astype(np.int64)


def compose_textures(kind_map: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-pixel brightness factor: for each pixel, its region's texture read at a random window.

    One gather instead of one masked pass per texture kind keeps this at ~1 ms for 256 px.
    """
    size = kind_map.shape[0]
    bank = texture_bank()
    oy, ox = (int(v) for v in rng.integers(0, max(1, BANK_SIZE - size + 1), 2))
    base = _window_index(size)
    if size <= BANK_SIZE:
        shifted = (((base // BANK_SIZE + oy) % BANK_SIZE) * BANK_SIZE
                   + (base % BANK_SIZE + ox) % BANK_SIZE)
    else:  # pragma: no cover - large renders only
        shifted = base
    flat = kind_map.astype(np.int64) * (BANK_SIZE * BANK_SIZE) + shifted
    return bank.reshape(-1)[flat]


def jitter_rgb(rng: np.random.Generator, rgb: tuple[int, int, int], amount: float = 10.0
               ) -> tuple[int, int, int]:
    """A colour with independent per-channel jitter (intra-class variation of surfaces)."""
    # Mostly brightness (correlated), a little hue: surfaces vary without turning pink or teal.
    scale = 1.0 + rng.normal(0.0, amount / 100.0)
    out = np.clip(np.asarray(rgb, np.float32) * scale + rng.normal(0.0, amount * 0.45, 3), 0, 255)
    return (int(out[0]), int(out[1]), int(out[2]))


def object_rgb(rng: np.random.Generator, colour: str, amount: float = 3.5
               ) -> tuple[int, int, int]:
    """The rendered colour of an object whose annotation says ``colour`` (jittered, still named)."""
    base = OBJECT_COLOURS[colour]
    # Brightness and channel jitter; kept small so colour names remain unambiguous.
    scale = rng.uniform(0.88, 1.06)
    out = np.clip(np.asarray(base, np.float32) * scale + rng.normal(0.0, amount, 3), 0, 255)
    return (int(out[0]), int(out[1]), int(out[2]))


_SMOOTH3 = ImageFilter.Kernel((3, 3), [1, 2, 1, 2, 4, 2, 1, 2, 1], 16)
_noise_cache: dict[str, np.ndarray] = {}


def _sensor_noise_bank() -> np.ndarray:
    """Gaussian sensor noise (unit variance), cached like the textures for speed."""
    if "n" not in _noise_cache:
        rng = np.random.default_rng(99)
        _noise_cache["n"] = rng.standard_normal((BANK_SIZE, BANK_SIZE, 3)).astype(np.float32)
    return _noise_cache["n"]


def finish_image(img: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """Sensor model: slight optical blur, per-scene colour/brightness jitter and sensor noise.

    Why: real sensors are neither sharp nor noise-free, and acquisitions differ in illumination;
    without this a model could key on exact pixel values instead of shapes and layouts.
    """
    blurred = img.filter(_SMOOTH3)
    if rng.random() < 0.35:
        blurred = blurred.filter(_SMOOTH3)
    arr = np.asarray(blurred, dtype=np.float32)
    h, w = arr.shape[:2]
    gain = rng.uniform(0.965, 1.035, 3).astype(np.float32) * np.float32(rng.uniform(0.88, 1.12))
    mean = arr.mean(axis=(0, 1), keepdims=True)
    contrast = np.float32(rng.uniform(0.9, 1.12))
    arr = (arr - mean) * contrast + mean
    arr = arr * gain + np.float32(rng.uniform(-8, 8))
    noise = _sensor_noise_bank()
    oy, ox = (int(v) for v in rng.integers(0, BANK_SIZE - min(h, BANK_SIZE) + 1, 2))
    sigma = np.float32(rng.uniform(2.0, 5.0))
    if h <= BANK_SIZE and w <= BANK_SIZE:
        arr += sigma * noise[oy:oy + h, ox:ox + w]
    else:  # pragma: no cover - large renders only
        reps = (-(-h // BANK_SIZE), -(-w // BANK_SIZE), 1)
        arr += sigma * np.tile(noise, reps)[:h, :w]
    return np.clip(arr, 0, 255).astype(np.uint8)
