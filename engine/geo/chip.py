"""The chip: a model-ready window of a raster and the georeferencing that puts answers back.

Why a module of its own: :mod:`engine.geo.window` makes chips and :mod:`engine.geo.georef`
turns boxes on them into polygons; both need the type, and neither should import the other
for it (that was an import cycle).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

__all__ = ["Chip"]


@dataclass
class Chip:
    """A resampled RGB window of a raster plus everything needed to put answers back on the map.

    ``transform`` maps chip pixel edges ``(col, row)`` to the raster CRS (rasterio convention:
    ``transform @ (0, 0)`` is the chip's top-left corner).  ``scale`` is source pixels per chip
    pixel along the coarser axis (> 1: the region was shrunk).
    """

    image: np.ndarray                 # (H, W, 3) uint8, 0 where not valid
    valid: np.ndarray                 # (H, W) bool
    transform: Affine                 # chip pixel -> raster CRS
    crs: CRS | None                   # the raster's CRS (None for a non-georeferenced raster)
    region_wkt: str                   # the asked region clipped to the raster, raster CRS
    bounds: tuple[float, float, float, float]  # chip extent (xmin, ymin, xmax, ymax), raster CRS
    scale: float                      # source pixels per chip pixel (coarser axis)
    warnings: list[str] = field(default_factory=list)
    raster_path: str = ""
    raster_transform: Affine = field(default_factory=Affine.identity)  # source pixel -> raster CRS
    source_window: Window | None = None  # the window read, in source pixels
    bands: list[int] = field(default_factory=list)  # 1-based source bands used (1 = grey)
    stretch: list[tuple[float, float]] | None = None  # per-band (low, high) mapped to 0..255

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])
