"""Read a model-ready chip for a region of any GDAL raster, keeping its exact georeferencing.

Why: the analyst draws a region in the map canvas's CRS (often EPSG:3857) over a raster in
another CRS (UTM, EPSG:4326...), and the model needs a small fixed-size RGB image.  Everything
the model later says about that image (boxes) must land back on the ground exactly, so the chip
keeps the affine from its own pixel grid to the raster CRS.

How a chip is made (:func:`read_chip`)
--------------------------------------
1. The region (bbox or polygon WKT, in ``bbox_crs``/``region_crs`` or, by default, the raster's
   CRS) is densified and reprojected to the raster CRS with PROJ, after a coarse pre-clip to the
   raster footprint in the region's own CRS (so a continent-sized region never asks PROJ for
   points outside the raster CRS's domain), then clipped exactly to the raster footprint.
2. The clipped region is mapped into the raster's *pixel* grid through the inverse geotransform
   and its bounds, snapped outwards to whole source pixels, give the read window.  Working in
   pixel space makes rotated geotransforms work with the same code: the chip is then aligned with
   the raster's (rotated) pixel grid and its affine is rotated too.
3. **Aspect:** only that window is read (``DatasetReader.read(window=..., out_shape=...)``; GDAL
   uses overviews when it can), resampled straight to the chip size.  The window's aspect is
   *not* preserved: a 2:1 window becomes a square chip whose pixels are twice as wide on the
   ground as they are tall.  Nothing is padded and no context outside the region is added; the
   chip's affine is simply anisotropic, so the georeferencing of boxes stays exact.  A warning is
   added when the aspect distortion exceeds 2:1.
4. Validity: GDAL masks (nodata, alpha band, internal mask, read with nearest resampling) and,
   for float data, NaN/inf mark pixels invalid; for a polygon region, chip pixels whose centre is
   outside the polygon are invalid too.  Invalid pixels are 0 in ``image`` and False in ``valid``.
5. Bands: red/green/blue by colour interpretation, else the first three non-alpha bands, else the
   first band as grey (replicated to 3 channels); a palette band is expanded through its colour
   table; ``bands=[...]`` (1-based, 1 or 3 of them) overrides.
6. Values: uint8 is kept as is; other types get a per-band 2-98 % percentile stretch over the
   chip's valid pixels (QGIS's default "cumulative count cut"), or ``stretch_range`` when given
   (so tiles of one raster can share a stretch).

Resampling: ``average`` when the window is shrunk on both axes, ``bilinear`` otherwise, ``nearest``
for palette indices and masks.  A resampling factor beyond ``max_upsample_ratio`` either way (the
region much larger than the chip, or a few source pixels blown up) is a warning, not an error.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import operator
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import rasterio
import shapely
from shapely import affinity
from shapely.errors import GEOSException
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, Resampling
from rasterio.features import rasterize
from rasterio.windows import Window
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

from engine.errors import (
    BAD_REQUEST,
    EMPTY_REGION,
    REGION_OFF_RASTER,
    TOO_MANY_BANDS,
    UNKNOWN_CRS,
    UNSUPPORTED_RASTER,
    EngineError,
)
from engine.geo.chip import Chip
from engine.geo.georef import geometry_is_finite, parse_crs, transform_geometry
from engine.geo.sources import check_source, open_raster, read_errors

__all__ = ["Chip", "read_chip", "RasterArea", "region_window"]

log = logging.getLogger(__name__)

_EPS = 1e-6
MAX_CHIP_PX = 4096
"""Largest chip side read (the same bound as a checkpoint's image_size, engine.backends.config_bounds)."""


def read_chip(raster: str | Path, *, bbox: Sequence[float] | None = None,
              bbox_crs: str | None = None, region_wkt: str | None = None,
              region_crs: str | None = None, size: int | tuple[int, int] = 224,
              bands: list[int] | None = None, max_upsample_ratio: float = 16.0,
              stretch: bool | None = None,
              stretch_range: Sequence[tuple[float, float]] | None = None) -> Chip:
    """Read the region of ``raster`` as a ``size`` chip (see the module docstring for the steps).

    ``bbox`` is ``(xmin, ymin, xmax, ymax)`` in ``bbox_crs``, x first whatever the CRS's axis
    order (longitude, latitude for EPSG:4326, as QGIS and GeoJSON write them); ``region_wkt`` a (multi)polygon in
    ``region_crs``; both CRSs default to the raster's; with neither, the whole raster is read.
    ``size`` is an int (square) or ``(height, width)``.  ``stretch``: None = automatic (uint8
    kept, others stretched), True = always stretch, False = never (values clipped to 0..255).
    ``stretch_range`` fixes the (low, high) per output band instead of percentiles.
    ``max_upsample_ratio`` bounds the resampling factor either way before a warning is added.

    Raises :class:`EngineError` with the codes of :mod:`engine.errors` for bad input.
    """
    out_h, out_w = _parse_size(size)
    path = _check_path(raster)
    notes: list[str] = []
    with _open(path) as ds, read_errors(path), _geometry_errors():
        _check_georef(ds, notes)
        region, clipped, is_polygon = _region_in_raster(ds, bbox, bbox_crs, region_wkt, region_crs)
        if clipped.area < region.area * (1 - 1e-6):
            notes.append(f"region extends beyond the raster; clipped to its extent "
                         f"({100 * clipped.area / region.area:.0f}% of the region kept)")
        if bbox is not None and is_polygon and isinstance(clipped, MultiPolygon):
            notes.append("the region crosses the antimeridian at the raster's edge: the chip spans the "
                         "raster's full width, with everything outside the region masked")
        win = _pixel_window(ds, clipped)
        band_idx, palette = _choose_bands(ds, bands)
        sx, sy = win.width / out_w, win.height / out_h
        chip_tf = ds.transform @ Affine.translation(win.col_off, win.row_off) @ Affine.scale(sx, sy)
        if palette:
            resampling = Resampling.nearest
        elif sx >= 1 and sy >= 1:
            resampling = Resampling.average
        else:
            resampling = Resampling.bilinear
        shape = (len(band_idx), out_h, out_w)
        data = ds.read(band_idx, window=win, out_shape=shape, resampling=resampling)
        masks = ds.read_masks(band_idx, window=win, out_shape=shape, resampling=Resampling.nearest)
        valid = (masks > 0).all(axis=0)
        if np.issubdtype(data.dtype, np.floating):
            valid &= np.isfinite(data).all(axis=0)
        if is_polygon:
            valid &= _inside(clipped, chip_tf, out_h, out_w)
        if not valid.any():
            raise EngineError(EMPTY_REGION, "no valid pixels in the region (all nodata or masked)")
        if palette:
            data = _apply_palette(ds, data[0])
            ranges = None
        else:
            data, ranges = _to_uint8(data, valid, stretch, stretch_range)
        if data.shape[0] == 1:
            data = np.repeat(data, 3, axis=0)
        image = np.ascontiguousarray(np.transpose(data, (1, 2, 0)))
        image[~valid] = 0
        crs = ds.crs
        raster_tf = ds.transform

    scale = max(sx, sy)
    if scale > max_upsample_ratio:
        notes.append(f"region is {win.width}x{win.height} source pixels, shrunk {scale:.1f}x "
                        f"to {out_w}x{out_h} (more than {max_upsample_ratio:g}x): fine detail is "
                        "lost; draw a smaller region or use tiling")
    if min(sx, sy) > 0 and 1 / min(sx, sy) > max_upsample_ratio:
        notes.append(f"region is only {win.width}x{win.height} source pixels, enlarged "
                        f"{1 / min(sx, sy):.1f}x (more than {max_upsample_ratio:g}x): the model "
                        "sees a blurred image")
    aspect = max(sx, sy) / min(sx, sy)
    if aspect > 2:
        notes.append(f"region aspect {win.width}:{win.height} is stretched to a "
                        f"{out_w}x{out_h} chip (distortion {aspect:.1f}:1)")
    for w in notes:
        log.warning("%s: %s", path, w)

    corners = [chip_tf @ c for c in ((0, 0), (out_w, 0), (out_w, out_h), (0, out_h))]
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    return Chip(image=image, valid=valid, transform=chip_tf, crs=crs,
                region_wkt=clipped.wkt, bounds=(min(xs), min(ys), max(xs), max(ys)),
                scale=float(scale), warnings=notes, raster_path=str(path),
                raster_transform=raster_tf, source_window=win, bands=list(band_idx),
                stretch=ranges)


@dataclasses.dataclass
class RasterArea:
    """Where an area lies in a raster, for callers that lay their own reads over it (tiling)."""

    path: Path | str
    crs: CRS | None
    transform: Affine
    width: int                        # the raster's, in pixels
    height: int
    region: BaseGeometry | None       # the area clipped to the raster, raster CRS; None = whole raster
    window: tuple[int, int, int, int]  # col_off, row_off, width, height of the area's pixels
    notes: list[str]


def region_window(raster: str | Path, *, bbox: Sequence[float] | None = None, bbox_crs: str | None = None,
                  region_wkt: str | None = None, region_crs: str | None = None) -> RasterArea:
    """Validate ``raster`` and the area as :func:`read_chip` does (same coded errors) and return
    its pixel window without reading pixels; with no area, the whole raster."""
    path = _check_path(raster)
    notes: list[str] = []
    with _open(path) as ds, read_errors(path), _geometry_errors():
        _check_georef(ds, notes)
        if bbox is None and region_wkt is None:
            region, window = None, (0, 0, ds.width, ds.height)
        else:
            _, region, _ = _region_in_raster(ds, bbox, bbox_crs, region_wkt, region_crs)
            win = _pixel_window(ds, region)
            window = (int(win.col_off), int(win.row_off), int(win.width), int(win.height))
        return RasterArea(path, ds.crs, ds.transform, ds.width, ds.height, region, window, notes)


# --------------------------------------------------------------------------- inputs


def _parse_size(size: int | tuple[int, int]) -> tuple[int, int]:
    try:
        if isinstance(size, (tuple, list)):
            h, w = (operator.index(v) for v in size)
        else:
            h = w = operator.index(size)
    except (TypeError, ValueError):
        raise EngineError(BAD_REQUEST, f"chip size must be an int or (height, width), got {size!r}") from None
    if h < 1 or w < 1:
        raise EngineError(BAD_REQUEST, f"chip size must be positive, got {size!r}")
    if h > MAX_CHIP_PX or w > MAX_CHIP_PX:  # an absurd model image_size must not allocate gigabytes
        raise EngineError(BAD_REQUEST, f"chip size {h}x{w} is larger than {MAX_CHIP_PX}x{MAX_CHIP_PX} pixels")
    return int(h), int(w)


def _check_path(raster: str | Path) -> Path | str:
    """The raster source if the engine may open it (regular files...; see engine.geo.sources)."""
    return check_source(raster)


def _open(path: Path | str) -> rasterio.io.DatasetReader:
    return open_raster(path)


@contextlib.contextmanager
def _geometry_errors() -> Iterator[None]:
    """A region GEOS cannot process (absurd coordinates...) as ``bad_request``, not a traceback."""
    try:
        yield
    except GEOSException as exc:
        raise EngineError(BAD_REQUEST, f"the region cannot be processed: {exc}") from None


def _check_georef(ds: rasterio.io.DatasetReader, notes: list[str]) -> None:
    if ds.transform.is_identity:
        gcps, _ = ds.gcps
        if gcps or ds.rpcs is not None:
            raise EngineError(UNSUPPORTED_RASTER,
                              f"{ds.name} is georeferenced by GCPs/RPCs only; warp it to a "
                              "geotransform first (e.g. gdalwarp)")
        if ds.crs is None:
            notes.append("raster is not georeferenced: coordinates are its pixel coordinates")


def _polygonal(geom: BaseGeometry) -> BaseGeometry:
    """Repair a geometry and keep only its polygon parts (intersections can add slivers/lines)."""
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom
    parts = [g for g in getattr(geom, "geoms", []) if isinstance(g, (Polygon, MultiPolygon))]
    return shapely.unary_union(parts) if parts else Polygon()


def _footprint(ds: rasterio.io.DatasetReader) -> Polygon:
    w, h = ds.width, ds.height
    return Polygon([ds.transform @ c for c in ((0, 0), (w, 0), (w, h), (0, h))])


def _region_in_raster(ds: rasterio.io.DatasetReader, bbox: Sequence[float] | None,
                      bbox_crs: str | None, region_wkt: str | None, region_crs: str | None
                      ) -> tuple[BaseGeometry, BaseGeometry, bool]:
    """(region in raster CRS, region clipped to the footprint, whether it is a polygon)."""
    footprint = _footprint(ds)
    if bbox is not None and region_wkt is not None:
        raise EngineError(BAD_REQUEST, "give either a bbox or a region polygon, not both")
    if bbox is not None:
        try:
            vals = [float(v) for v in bbox]
        except (TypeError, ValueError):
            raise EngineError(BAD_REQUEST, f"bbox must be 4 numbers, got {bbox!r}") from None
        if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
            raise EngineError(BAD_REQUEST, f"bbox must be 4 finite numbers, got {bbox!r}")
        geom, is_polygon = _bbox_geometry(vals, bbox, _is_geographic(ds, bbox_crs))
        src_text, what = bbox_crs, "bbox_crs"
    elif region_wkt is not None:
        geom = _wkt_geometry(region_wkt)
        src_text, is_polygon, what = region_crs, True, "region_crs"
    else:
        return footprint, footprint, False

    reprojected = False
    if src_text is not None:
        src = parse_crs(src_text, what)
        if ds.crs is None:
            raise EngineError(UNKNOWN_CRS, f"{ds.name} has no CRS, so a region in {src_text} cannot "
                                           "be placed on it; give the region in raster coordinates")
        if src != ds.crs:
            geom = _reproject_region(geom, src, ds.crs, footprint)
            reprojected = True
    clipped = _polygonal(geom.intersection(footprint))
    if bbox is not None and is_polygon and not reprojected and isinstance(geom, MultiPolygon):
        # an antimeridian bbox in both longitude conventions: its area is that of one copy
        geom = max(geom.geoms, key=lambda g: g.intersection(footprint).area)
    if clipped.is_empty or clipped.area <= 0:
        raise EngineError(REGION_OFF_RASTER, "the region does not overlap the raster "
                                             f"(raster bounds {tuple(round(v, 6) for v in ds.bounds)})")
    return geom, clipped, is_polygon


def _is_geographic(ds: rasterio.io.DatasetReader, crs_text: str | None) -> bool:
    """Whether the region's CRS (its own, else the raster's) is in degrees of longitude."""
    crs = parse_crs(crs_text, "bbox_crs") if crs_text is not None else ds.crs
    return bool(crs is not None and crs.is_geographic)


def _bbox_geometry(vals: list[float], bbox: Sequence[float], geographic: bool) -> tuple[BaseGeometry, bool]:
    """The bbox as a geometry, and whether it must be masked like a polygon.

    In degrees, ``xmin > xmax`` is a box crossing the antimeridian (QGIS and GeoJSON write it
    so): it is the band from ``xmin`` east to ``xmax + 360``, given in both longitude
    conventions (-180..180 and 0..360) so that it meets the raster's footprint whichever one the
    raster uses.  Elsewhere the corners are simply sorted.
    """
    x0, y0, x1, y1 = vals
    ymin, ymax = sorted((y0, y1))
    if geographic and x0 > x1:
        if ymax - ymin <= 0:
            raise EngineError(EMPTY_REGION, f"bbox {bbox!r} has zero area")
        east = x1 + 360.0
        return shapely.union(shapely.box(x0, ymin, east, ymax), shapely.box(x0 - 360.0, ymin, x1, ymax)), True
    xmin, xmax = sorted((x0, x1))
    if xmax - xmin <= 0 or ymax - ymin <= 0:
        raise EngineError(EMPTY_REGION, f"bbox {bbox!r} has zero area")
    return shapely.box(xmin, ymin, xmax, ymax), False


def _wkt_geometry(region_wkt: str) -> BaseGeometry:
    """A polygon region from WKT, repaired *before* its area is judged (a self-intersecting
    "bow tie" has zero signed area until it is split into its two valid parts)."""
    if not region_wkt.strip():
        raise EngineError(BAD_REQUEST, "region_wkt is empty; leave it out to read the whole raster")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # NaN coordinates: refused just below
            geom = shapely.from_wkt(region_wkt)
    except (GEOSException, TypeError, ValueError) as exc:
        raise EngineError(BAD_REQUEST, f"region is not valid WKT: {str(exc)[:200]}") from None
    if geom is None or geom.is_empty:
        raise EngineError(EMPTY_REGION, "region has zero area (empty)")
    if not geometry_is_finite(geom):
        raise EngineError(BAD_REQUEST, "region WKT holds coordinates that are not finite numbers (inf, nan)")
    geom = _polygonal(geom)
    if geom.is_empty or geom.area <= 0:
        raise EngineError(EMPTY_REGION, "region has zero area (empty, point or line)")
    return geom


def _reproject_region(geom: BaseGeometry, src: CRS, dst: CRS, footprint: Polygon) -> BaseGeometry:
    """Region to the raster CRS, pre-clipped in its own CRS to (a margin around) the footprint."""
    fp_src = transform_geometry(footprint, dst, src, densify_pts=50)
    wraps = src.is_geographic and fp_src.bounds[2] - fp_src.bounds[0] > 180  # crosses the antimeridian
    if geometry_is_finite(fp_src) and fp_src.is_valid and fp_src.area > 0 and not wraps:
        xmin, ymin, xmax, ymax = fp_src.bounds
        margin = 0.02 * max(xmax - xmin, ymax - ymin)
        geom = _polygonal(geom.intersection(fp_src.buffer(margin, join_style="mitre")))
        if geom.is_empty or geom.area <= 0:
            raise EngineError(REGION_OFF_RASTER, "the region does not overlap the raster")
    out = transform_geometry(geom, src, dst, densify_pts=21)
    if not geometry_is_finite(out):
        raise EngineError(REGION_OFF_RASTER, "the region cannot be expressed in the raster's CRS "
                                             "(outside its valid area)")
    return _polygonal(out)


def _pixel_window(ds: rasterio.io.DatasetReader, clipped: BaseGeometry) -> Window:
    """Bounds of the region in the source pixel grid, snapped outwards to whole pixels."""
    inv = ~ds.transform
    px = affinity.affine_transform(clipped, [inv.a, inv.b, inv.d, inv.e, inv.xoff, inv.yoff])
    cmin, rmin, cmax, rmax = px.bounds
    col0 = min(max(0, math.floor(cmin + _EPS)), ds.width - 1)
    row0 = min(max(0, math.floor(rmin + _EPS)), ds.height - 1)
    col1 = max(min(ds.width, math.ceil(cmax - _EPS)), col0 + 1)
    row1 = max(min(ds.height, math.ceil(rmax - _EPS)), row0 + 1)
    return Window(col0, row0, col1 - col0, row1 - row0)


def _choose_bands(ds: rasterio.io.DatasetReader, bands: list[int] | None) -> tuple[list[int], bool]:
    """1-based band indexes to read and whether the single band is a palette to expand."""
    count = ds.count
    if bands is not None:
        try:
            idx = [operator.index(b) for b in bands if not isinstance(b, bool)]
        except TypeError:
            idx = []
        if len(idx) != len(list(bands)) or len(idx) not in (1, 3) or \
                any(b < 1 or b > count for b in idx):
            raise EngineError(TOO_MANY_BANDS, f"bands {list(bands)!r} cannot be used: give 1 (grey) "
                                              f"or 3 (RGB) band numbers between 1 and {count}")
        return idx, False
    ci = list(ds.colorinterp)
    rgb = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
    if all(c in ci for c in rgb):
        return [ci.index(c) + 1 for c in rgb], False
    non_alpha = [i + 1 for i, c in enumerate(ci) if c != ColorInterp.alpha]
    if len(non_alpha) >= 3:
        return non_alpha[:3], False
    first = non_alpha[0] if non_alpha else 1
    palette = ci[first - 1] == ColorInterp.palette and ds.dtypes[first - 1] == "uint8"
    return [first], palette


# --------------------------------------------------------------------------- pixels


def _inside(region: BaseGeometry, chip_tf: Affine, h: int, w: int) -> np.ndarray:
    """Chip pixels whose centre is inside the region (all touched ones if none is)."""
    inv = ~chip_tf
    px = affinity.affine_transform(region, [inv.a, inv.b, inv.d, inv.e, inv.xoff, inv.yoff])
    mask = rasterize([(px, 1)], out_shape=(h, w), fill=0, dtype="uint8").astype(bool)
    if not mask.any():
        mask = rasterize([(px, 1)], out_shape=(h, w), fill=0, dtype="uint8",
                         all_touched=True).astype(bool)
    return mask


def _apply_palette(ds: rasterio.io.DatasetReader, index: np.ndarray) -> np.ndarray:
    cmap = ds.colormap(1 if ds.count == 1 else ds.colorinterp.index(ColorInterp.palette) + 1)
    lut = np.zeros((256, 3), dtype=np.uint8)
    for k, rgba in cmap.items():
        if 0 <= k < 256:
            lut[k] = rgba[:3]
    return np.transpose(lut[index], (2, 0, 1))


def _to_uint8(data: np.ndarray, valid: np.ndarray, stretch: bool | None,
              stretch_range: Sequence[tuple[float, float]] | None
              ) -> tuple[np.ndarray, list[tuple[float, float]] | None]:
    """Bands (B, H, W) of any type to uint8, and the per-band (low, high) used (None: unchanged)."""
    if stretch_range is None and (stretch is False or (stretch is None and data.dtype == np.uint8)):
        return np.clip(np.nan_to_num(data, nan=0.0), 0, 255).astype(np.uint8), None
    if stretch_range is not None and len(stretch_range) != data.shape[0]:
        raise EngineError(BAD_REQUEST, f"stretch_range needs {data.shape[0]} (low, high) pairs")
    out = np.zeros(data.shape, dtype=np.uint8)
    ranges: list[tuple[float, float]] = []
    for b in range(data.shape[0]):
        band = data[b].astype(np.float64)
        if stretch_range is not None:
            lo, hi = (float(v) for v in stretch_range[b])
        else:
            vals = band[valid]
            lo, hi = (float(v) for v in np.percentile(vals, [2, 98]))
            if hi <= lo:  # few distinct values: fall back to the full range
                lo, hi = float(vals.min()), float(vals.max())
        ranges.append((lo, hi))
        if hi > lo:
            scaled = (band - lo) * (255.0 / (hi - lo))
            out[b] = np.clip(np.nan_to_num(scaled, nan=0.0), 0, 255).round().astype(np.uint8)
    return out, ranges
