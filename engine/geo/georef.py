"""From boxes on a chip to polygons on the ground, and the CRS helpers the geo code shares.

Why this module exists: the model answers in the chip's pixel grid (or GeoChat's 0-100 grid on
it), but the analyst needs features at the right place on the map.  The chip carries the exact
affine from its pixel grid to the raster CRS (:attr:`engine.geo.chip.Chip.transform`, which may
be anisotropic and, for rotated rasters, rotated), so a box's corners are mapped through that
affine with no approximation, and only then reprojected with PROJ (pyproj) when another output
CRS is asked for.

Conventions
-----------
* Chip pixel coordinates address *edges*: ``(0, 0)`` is the top-left corner of the top-left chip
  pixel, ``(W, H)`` the bottom-right corner of the last one (the rasterio / GDAL convention).
* A box ``(x1, y1, x2, y2, angle)`` is the axis-aligned rectangle ``x1..x2 x y1..y2`` rotated by
  ``angle`` degrees *clockwise in image space* (y down) about its centre, as in GeoChat / DOTA.
* A box becomes a 4-corner polygon whose vertices are exact; when reprojected to another CRS the
  vertices stay exact and the edges between them are straight lines in the output CRS (boxes are
  small, so the curvature of a reprojected edge is far below a pixel).  Region outlines, which
  can be large, are densified before reprojection instead.
* Exterior rings are oriented counter-clockwise (RFC 7946 / OGC simple features order).
"""
from __future__ import annotations

import json
import math
import re
import threading
from typing import Any, Sequence

import numpy as np
import shapely
from pyproj import CRS as ProjCRS
from pyproj import Transformer
from pyproj.exceptions import ProjError
from rasterio.crs import CRS
from rasterio.errors import CRSError
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry
from shapely.geometry.polygon import orient

from engine.errors import UNKNOWN_CRS, EngineError
from engine.geo.chip import Chip
from engine.grounding import GridBox, box_corners, grid_to_pixels

__all__ = [
    "parse_crs",
    "crs_to_string",
    "transform_geometry",
    "geometry_is_finite",
    "box_corners",
    "chip_boxes_to_polygons",
    "grid_boxes_to_polygons",
    "region_polygon",
    "chip_box_to_raster_pixels",
]

Box = tuple[float, float, float, float, float]


MAX_CRS_CHARS = 65536
"""Longest CRS text accepted (the longest EPSG WKT is about 5,000 characters)."""

# PROJ parameters that name files (grids, init files) and the WKT keyword that does the same.
_FILE_PARAMS = re.compile(r"(nadgrids|geoidgrids|grids|init|file|parameterfile)\s*[=\[(]\s*\"?([^\s\"\])]*)",
                          re.IGNORECASE)


def _refuse_unsafe_crs_text(text: str, what: str) -> None:
    """Refuse CRS text that would make PROJ read a file, fetch a URL or run a pipeline.

    Grid names without a folder (``+nadgrids=@null``, ``us_noaa_conus.tif``) stay allowed: PROJ
    looks those up in its own data folders only.
    """
    if len(text) > MAX_CRS_CHARS:
        raise EngineError(UNKNOWN_CRS, f"{what} is {len(text)} characters long; at most {MAX_CRS_CHARS}")
    lowered = text.lower()
    if "://" in lowered or "proj=pipeline" in lowered.replace(" ", "") or "\0" in text:
        raise EngineError(UNKNOWN_CRS, f"refused {what}: a CRS may not be a URL or a PROJ pipeline")
    for match in _FILE_PARAMS.finditer(text):
        for name in match.group(2).split(","):
            name = name.lstrip("@")
            if match.group(1).lower() == "init":  # +init=epsg:4326 names a code in PROJ's own file
                name = name.split(":", 1)[0]
            if "/" in name or "\\" in name or ":" in name or name.startswith("."):
                raise EngineError(UNKNOWN_CRS, f"refused {what}: it names the file {name[:120]!r}; grids and "
                                               "init files may only be named, not given as paths")


def parse_crs(value: Any, what: str = "CRS") -> CRS:
    """Any CRS spelling (``"EPSG:3857"``, WKT, PROJ string, rasterio or pyproj CRS) as a rasterio CRS.

    Raises ``EngineError(UNKNOWN_CRS)`` naming ``what`` (e.g. "bbox_crs") when PROJ cannot read
    it, so the analyst sees which of their inputs was wrong rather than a PROJ traceback; also
    for text that names files by path, URLs or PROJ pipelines (see :func:`_refuse_unsafe_crs_text`)
    and for operations that are not a CRS at all.
    """
    if isinstance(value, CRS):
        return value
    try:
        if isinstance(value, ProjCRS):
            return CRS.from_wkt(value.to_wkt())
        if isinstance(value, bool) or not isinstance(value, (str, int, dict)) \
                or (isinstance(value, str) and not value.strip()):
            raise CRSError(f"not a CRS: {value!r}")
        if isinstance(value, (str, dict)):
            _refuse_unsafe_crs_text(value if isinstance(value, str) else json.dumps(value, default=str), what)
        crs = CRS.from_user_input(value)
        if not (crs.is_geographic or crs.is_projected):
            kind = ProjCRS.from_wkt(crs.to_wkt()).type_name
            if kind == "Vertical CRS" or "CRS" not in kind:
                raise CRSError(f"a {kind}, not a horizontal CRS")
        return crs
    except EngineError:
        raise
    except (CRSError, ProjError, ValueError, TypeError, OverflowError) as exc:
        shown = repr(value) if len(repr(value)) <= 200 else repr(value)[:200] + "..."
        raise EngineError(UNKNOWN_CRS, f"unknown {what}: {shown} ({exc})") from None


def crs_to_string(crs: Any) -> str | None:
    """``"EPSG:xxxx"`` when the CRS has an EPSG code, else its WKT; None for no CRS.

    The short form is what QGIS, fiona and the protocol's ``crs`` field read most reliably; WKT is
    the lossless fallback for custom CRSs.  A raster without a CRS answers in its pixel
    coordinates, whose ``crs`` is null.
    """
    if crs is None:
        return None
    rcrs = parse_crs(crs)
    code = rcrs.to_epsg()
    if code is not None:
        return f"EPSG:{code}"
    return rcrs.to_wkt()


_local = threading.local()


def _transformer(src_wkt: str, dst_wkt: str) -> Transformer:
    """A cached PROJ transformer; per thread, since pyproj transformers are not thread-safe."""
    cache = getattr(_local, "transformers", None)
    if cache is None:
        cache = _local.transformers = {}
    key = (src_wkt, dst_wkt)
    tr = cache.get(key)
    if tr is None:
        if len(cache) > 64:
            cache.clear()
        # always_xy: x is easting/longitude everywhere, as in rasterio and GeoJSON.
        try:
            tr = Transformer.from_crs(ProjCRS.from_wkt(src_wkt), ProjCRS.from_wkt(dst_wkt), always_xy=True)
        except (ProjError, CRSError, ValueError) as exc:
            raise EngineError(UNKNOWN_CRS, f"PROJ cannot transform between these CRSs: {exc}") from None
        cache[key] = tr
    return tr


def transform_geometry(geom: BaseGeometry, src_crs: Any, dst_crs: Any,
                       densify_pts: int = 21) -> BaseGeometry:
    """Reproject a geometry, first adding ``densify_pts`` points along its longest edges.

    Densifying matters because a straight edge in one CRS is a curve in another (a bbox drawn
    in EPSG:3857 over a UTM raster); with ``densify_pts=0`` only the vertices are moved, which is
    what box corners want.  Coordinates that PROJ cannot map come back as ``inf``; callers
    decide what that means (see :func:`geometry_is_finite`).
    """
    src = parse_crs(src_crs)
    dst = parse_crs(dst_crs)
    if src == dst:
        return geom
    if densify_pts > 0 and not geom.is_empty:
        xmin, ymin, xmax, ymax = geom.bounds
        extent = max(xmax - xmin, ymax - ymin)
        if extent > 0 and math.isfinite(extent):
            geom = shapely.segmentize(geom, extent / (densify_pts + 1))
    tr = _transformer(src.to_wkt(), dst.to_wkt())

    def _fn(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return tr.transform(x, y, errcheck=False)

    return shapely.transform(geom, _fn, interleaved=False)


def geometry_is_finite(geom: BaseGeometry) -> bool:
    """True when every coordinate is a finite number (PROJ writes ``inf`` for failures)."""
    coords = shapely.get_coordinates(geom)
    return bool(np.isfinite(coords).all())


def chip_boxes_to_polygons(boxes: Sequence[Sequence[float]], chip: Chip,
                           out_crs: Any = None) -> list[Polygon]:
    """Boxes ``(x1, y1, x2, y2[, angle])`` in chip pixels to polygons in the raster CRS or ``out_crs``.

    Each corner goes through ``chip.transform`` exactly; reprojection (when ``out_crs`` differs
    from the raster's) moves the four vertices only.
    """
    dst = parse_crs(out_crs, "out_crs") if out_crs is not None else None
    if dst is not None and chip.crs is None:
        raise EngineError(UNKNOWN_CRS, "the raster has no CRS, so boxes cannot be reprojected")
    polys: list[Polygon] = []
    for b in boxes:
        x1, y1, x2, y2 = (float(v) for v in b[:4])
        angle = float(b[4]) if len(b) > 4 else 0.0
        ring = [chip.transform @ corner for corner in box_corners(x1, y1, x2, y2, angle)]
        poly = Polygon(ring)
        if dst is not None:
            poly = transform_geometry(poly, chip.crs, dst, densify_pts=0)
        polys.append(orient(poly, 1.0))
    return polys


def grid_boxes_to_polygons(grid_boxes: Sequence[GridBox], chip: Chip,
                           out_crs: Any = None) -> list[Polygon]:
    """GeoChat 0-100 grid boxes (relative to the chip image) to polygons, as
    :func:`chip_boxes_to_polygons`."""
    h, w = chip.image.shape[:2]
    return chip_boxes_to_polygons([grid_to_pixels(g, w, h) for g in grid_boxes], chip, out_crs)


def region_polygon(chip: Chip, out_crs: Any = None, densify_pts: int = 21) -> BaseGeometry:
    """The asked region, clipped to the raster, in the raster CRS or ``out_crs`` (densified)."""
    geom = shapely.from_wkt(chip.region_wkt)
    if out_crs is not None:
        if chip.crs is None:
            raise EngineError(UNKNOWN_CRS, "the raster has no CRS, so its region cannot be reprojected")
        geom = transform_geometry(geom, chip.crs, parse_crs(out_crs, "out_crs"), densify_pts)
    if isinstance(geom, Polygon):
        geom = orient(geom, 1.0)
    return geom


def chip_box_to_raster_pixels(box: Sequence[float], chip: Chip) -> tuple[float, float, float, float]:
    """Axis-aligned bounds ``(col_min, row_min, col_max, row_max)`` of a chip box in the source
    raster's pixel grid (the protocol's ``bbox_pixel``): chip pixel -> map -> raster pixel."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    angle = float(box[4]) if len(box) > 4 else 0.0
    inv = ~chip.raster_transform
    pts = [inv @ (chip.transform @ c) for c in box_corners(x1, y1, x2, y2, angle)]
    cols = [p[0] for p in pts]
    rows = [p[1] for p in pts]
    return (min(cols), min(rows), max(cols), max(rows))
