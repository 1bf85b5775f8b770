"""Small real GeoTIFFs for the geo tests: a dark textured background with one bright square
"feature" at known pixel, hence known map, coordinates.

Not a conftest: the test modules import it (``from geo_rasters import ...``), so each test
states the raster it needs.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
from affine import Affine
from pyproj import Transformer
from rasterio.enums import ColorInterp
from rasterio.errors import NotGeoreferencedWarning
from shapely.geometry import Polygon

# North-up 10 m (or 1e-4 degree) pixels, away from a UTM central meridian so that grid
# convergence between UTM and EPSG:3857 is visible (about 1.4 degrees).
ORIGINS = {
    "EPSG:32633": Affine.translation(300000.0, 5000000.0) @ Affine.scale(10.0, -10.0),
    "EPSG:3857": Affine.translation(1600000.0, 5700000.0) @ Affine.scale(10.0, -10.0),
    "EPSG:4326": Affine.translation(15.0, 45.0) @ Affine.scale(1e-4, -1e-4),
}

FEATURE_PX = (80, 60, 120, 100)  # col0, row0, col1, row1 (pixel edges)


@dataclass
class TestRaster:
    path: Path
    crs: str | None
    transform: Affine
    width: int
    height: int
    feature_px: tuple[int, int, int, int]

    __test__ = False  # not a pytest test class

    @property
    def feature_polygon(self) -> Polygon:
        """The bright square's outline in the raster CRS (exact pixel edges)."""
        c0, r0, c1, r1 = self.feature_px
        return Polygon([self.transform @ c for c in ((c0, r0), (c1, r0), (c1, r1), (c0, r1))])

    def feature_polygon_in(self, crs: str) -> Polygon:
        """The bright square's corners reprojected to ``crs`` (vertices only)."""
        tr = Transformer.from_crs(self.crs, crs, always_xy=True)
        return Polygon([tr.transform(x, y) for x, y in self.feature_polygon.exterior.coords[:-1]])


def write_raster(path: Path, *, crs: str | None = "EPSG:32633", transform: Affine | None = None,
                 width: int = 200, height: int = 160, count: int = 3, dtype: str = "uint8",
                 background: float = 40, feature: float | Sequence[float] = 220,
                 feature_px: tuple[int, int, int, int] = FEATURE_PX,
                 nodata: float | None = None, nodata_px: tuple[int, int, int, int] | None = None,
                 colorinterp: Sequence[ColorInterp] | None = None,
                 alpha_zero_px: tuple[int, int, int, int] | None = None,
                 photometric: str | None = None) -> TestRaster:
    """Write a GeoTIFF with a textured background and a bright square at ``feature_px``.

    ``feature`` may give one value per band (to tell bands apart).  ``nodata_px`` fills a block
    with ``nodata``; ``alpha_zero_px`` zeroes the last (alpha) band over a block.
    """
    transform = transform if transform is not None else ORIGINS.get(crs or "", Affine.identity())
    rows, cols = np.mgrid[0:height, 0:width]
    texture = ((rows * 7 + cols * 3) % 11).astype(np.float64)  # 0..10, keeps percentiles sane
    fvals = list(feature) if isinstance(feature, (list, tuple)) else [feature] * count
    data = np.empty((count, height, width), dtype=np.float64)
    c0, r0, c1, r1 = feature_px
    contrast = abs(max(fvals) - background)
    for b in range(count):
        band = background + texture / 10 * 0.1 * contrast  # up to 10 % of the contrast
        band[r0:r1, c0:c1] = fvals[b]
        data[b] = band
    if nodata_px is not None and nodata is not None:
        a0, b0, a1, b1 = nodata_px
        data[:, b0:b1, a0:a1] = nodata
    if alpha_zero_px is not None:
        data[-1] = 255
        a0, b0, a1, b1 = alpha_zero_px
        data[-1, b0:b1, a0:a1] = 0
    profile = dict(driver="GTiff", width=width, height=height, count=count, dtype=dtype,
                   nodata=nodata)
    if not transform.is_identity:  # identity: write a non-georeferenced file
        profile["transform"] = transform
    if crs is not None:
        profile["crs"] = crs
    if photometric:
        profile["photometric"] = photometric
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # wanted when no transform
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data.astype(dtype))
            if colorinterp is not None:
                dst.colorinterp = list(colorinterp)
    return TestRaster(Path(path), crs, transform, width, height, feature_px)


def bright_extent(image: np.ndarray, threshold: int = 128) -> tuple[int, int, int, int]:
    """Pixel-edge extent (col0, row0, col1, row1) of the pixels brighter than ``threshold``."""
    rows, cols = np.nonzero(image[..., 0] > threshold)
    assert rows.size, "no bright pixels in the chip"
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1
