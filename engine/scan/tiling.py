"""Tiles of a whole raster (or of an area of it) on the raster's own pixel grid.

Why on the pixel grid: a tile is then one exact rasterio window, read on its own (never the
whole raster, so memory does not grow with the raster), and its georeferencing is the raster's
affine restricted to that window, rotated rasters included.

The tiling of an axis of length ``L`` with tile ``T`` and overlap ``O``: tiles start every
``T - O`` pixels and the last one is shifted back to end on the raster's edge, so every tile is a
full ``T`` pixels (no padded, stretched edge tiles).  Each tile also has a *core*: the part of the
axis it owns, cut at the middle of each overlap.  Cores tile the area without gaps or overlaps,
so the "tiles" layer of a classify scan is a clean land-use map, and the seam merge
(:mod:`engine.scan.merge`) uses them to drop cut boxes that a neighbour sees better.

Default tile size (:func:`default_tile_px`): the ground size of the scenes the model was trained
on, when the checkpoint's ``config.json`` records it (``training_gsd``: ground units per pixel of
the training scenes, and ``training_scene_size``: their size in pixels), converted to this
raster's pixels; otherwise the model's input size (``image_size``) in pixels, which is said in the
scan's warnings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

from engine.errors import BAD_REQUEST, EMPTY_REGION, EngineError
from engine.geo.georef import chip_boxes_to_polygons
from engine.geo.window import Chip, read_chip, region_window

__all__ = ["Tile", "TilePlan", "plan_tiles", "read_tile", "shared_stretch", "default_tile_px", "axis_tiles"]


@dataclass(frozen=True)
class Tile:
    """One tile: its window and core in raster pixels (col, row, width, height), its neighbours."""

    id: int
    row: int
    col: int
    window: tuple[int, int, int, int]
    core: tuple[int, int, int, int]
    interior: tuple[bool, bool, bool, bool]  # has a neighbour on the left, top, right, bottom

    def to_dict(self) -> dict:
        return {"id": self.id, "row": self.row, "col": self.col, "window": list(self.window),
                "core": list(self.core), "interior": list(self.interior)}

    @classmethod
    def from_dict(cls, d: dict) -> "Tile":
        return cls(int(d["id"]), int(d["row"]), int(d["col"]), tuple(d["window"]), tuple(d["core"]),
                   tuple(bool(v) for v in d["interior"]))


@dataclass
class TilePlan:
    """The tiles of one scan plus what is needed to georeference and merge their answers."""

    raster: str
    crs: CRS | None
    transform: Affine
    width: int
    height: int
    tile_px: int
    overlap_px: int
    tiles: list[Tile]
    rows: int
    cols: int
    region: BaseGeometry | None          # the asked area in the raster CRS (None: whole raster)
    pixel_size: float                    # ground units per pixel (geometric mean of both axes)
    warnings: list[str] = field(default_factory=list)

    def grid_chip(self) -> Chip:
        """A pixel-less :class:`Chip` whose grid is the raster's: georef maps raster pixel boxes with it."""
        return Chip(image=np.zeros((self.height, 0, 3), np.uint8), valid=np.zeros((0, 0), bool),
                    transform=self.transform, crs=self.crs, region_wkt="", bounds=(0.0, 0.0, 0.0, 0.0),
                    scale=1.0, raster_path=self.raster, raster_transform=self.transform)

    def pixel_polygons(self, boxes: Sequence[Sequence[float]]) -> list[Polygon]:
        """Raster pixel boxes ``(c0, r0, c1, r1)`` as polygons in the raster CRS (via georef)."""
        return chip_boxes_to_polygons(boxes, self.grid_chip())

    def worker_view(self) -> dict:
        """What a remote worker needs to read and georeference tiles (plain JSON; no region)."""
        return {"raster": self.raster, "crs": self.crs.to_wkt() if self.crs is not None else None,
                "transform": list(self.transform)[:6], "width": self.width, "height": self.height,
                "tile_px": self.tile_px, "overlap_px": self.overlap_px, "rows": self.rows, "cols": self.cols,
                "pixel_size": self.pixel_size}

    @classmethod
    def from_worker_view(cls, d: dict) -> "TilePlan":
        return cls(d["raster"], CRS.from_wkt(d["crs"]) if d["crs"] else None, Affine(*d["transform"]),
                   d["width"], d["height"], d["tile_px"], d["overlap_px"], [], d["rows"], d["cols"], None,
                   d["pixel_size"])

    def neighbours(self, tile_id: int) -> list[int]:
        """Ids of the tile and of its 8 neighbours (the only tiles whose boxes can touch its own)."""
        r, c = divmod(tile_id, self.cols)
        return [rr * self.cols + cc for rr in range(r - 1, r + 2) for cc in range(c - 1, c + 2)
                if 0 <= rr < self.rows and 0 <= cc < self.cols]


def axis_tiles(start: int, length: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """``(start, size, core_start, core_end)`` of the tiles along one axis (see the module doc)."""
    if length <= tile:
        return [(start, length, start, start + length)]
    stride = tile - overlap
    starts = list(range(start, start + length - tile, stride)) + [start + length - tile]
    if len(starts) > 1 and starts[-1] == starts[-2]:
        starts.pop()
    bounds = [start] + [(a + tile + b) // 2 for a, b in zip(starts, starts[1:])] + [start + length]
    return [(s, tile, bounds[i], bounds[i + 1]) for i, s in enumerate(starts)]


def default_tile_px(model_dir: Path, image_size: int, pixel_size: float, crs: CRS | None
                    ) -> tuple[int, str | None]:
    """The tile in raster pixels at the model's training ground size, and a note when guessed."""
    from engine.backends import checkpoint_config

    config = checkpoint_config(model_dir)
    gsd, scene = config.get("training_gsd"), config.get("training_scene_size")
    metric = crs is not None and crs.is_projected and (crs.linear_units or "").lower() in ("metre", "meter", "m")
    if isinstance(gsd, (int, float)) and isinstance(scene, (int, float)) and gsd > 0 and scene > 0:
        if not metric:
            return image_size, (f"the raster's CRS is not in metres, so the model's training ground size "
                                f"({gsd * scene:g} m) cannot be converted: tile = model input, {image_size} px")
        px = int(round(gsd * scene / pixel_size))
        if px < image_size:
            return image_size, (f"the model's training scenes ({gsd * scene:g} m) are {px} px of this raster, "
                                f"fewer than its input: tile = {image_size} px (coarser than training)")
        return px, None
    return image_size, (f"the checkpoint records no training ground size (training_gsd, training_scene_size): "
                        f"tile = the model input, {image_size} px; give --tile to change it")


def plan_tiles(raster: str, *, tile_px: int | None, overlap_px: int | None, model_dir: Path,
               image_size: int, bbox: Sequence[float] | None = None, bbox_crs: str | None = None,
               region_wkt: str | None = None, region_crs: str | None = None,
               default_overlap: float = 0.0) -> TilePlan:
    """Validate the raster and area and lay the tiles; bad input raises a coded EngineError.

    ``default_overlap`` is the overlap as a fraction of the tile when ``overlap_px`` is None.
    """
    area = region_window(raster, bbox=bbox, bbox_crs=bbox_crs, region_wkt=region_wkt, region_crs=region_crs)
    path, notes, region = area.path, area.notes, area.region
    transform, crs, width, height = area.transform, area.crs, area.width, area.height
    pixel_size = math.sqrt(abs(transform.a * transform.e - transform.b * transform.d)) or 1.0
    col0, row0, cols_px, rows_px = area.window
    if tile_px is None:
        tile_px, note = default_tile_px(model_dir, image_size, pixel_size, crs)
        if note:
            notes.append(note)
    elif tile_px < image_size:
        raise EngineError(BAD_REQUEST, f"tile {tile_px} px is smaller than the model input ({image_size} px): "
                                       f"the model would see blown-up pixels; use --tile {image_size} or more")
    if overlap_px is None:
        overlap_px = int(round(tile_px * default_overlap))
    if not 0 <= overlap_px <= tile_px // 2:
        raise EngineError(BAD_REQUEST, f"overlap must be between 0 and half the tile ({tile_px // 2} px), "
                                       f"got {overlap_px}")
    if min(cols_px, rows_px) < tile_px:
        notes.append(f"the area ({cols_px}x{rows_px} px) is smaller than one tile ({tile_px} px): "
                     "it is read as one stretched tile")
    xs = axis_tiles(col0, cols_px, tile_px, overlap_px)
    ys = axis_tiles(row0, rows_px, tile_px, overlap_px)
    tiles = []
    for r, (y, h, cy0, cy1) in enumerate(ys):
        for c, (x, w, cx0, cx1) in enumerate(xs):
            tiles.append(Tile(r * len(xs) + c, r, c, (x, y, w, h), (cx0, cy0, cx1 - cx0, cy1 - cy0),
                              (c > 0, r > 0, c < len(xs) - 1, r < len(ys) - 1)))
    plan = TilePlan(str(path), crs, transform, width, height, tile_px, overlap_px, tiles, len(ys), len(xs),
                    region, pixel_size, notes)
    if region is not None:
        polys = plan.pixel_polygons([_window_box(t.window) for t in tiles])
        plan.tiles = [t for t, poly in zip(tiles, polys) if poly.intersects(region)]
        if not plan.tiles:
            raise EngineError(EMPTY_REGION, "no tile of the raster overlaps the area")
    return plan


def _window_box(window: Sequence[int]) -> tuple[float, float, float, float]:
    col, row, w, h = window
    return (float(col), float(row), float(col + w), float(row + h))


def tile_polygon(plan: TilePlan, tile: Tile, core: bool = False) -> Polygon:
    """A tile's window (or core) as a polygon in the raster CRS."""
    return plan.pixel_polygons([_window_box(tile.core if core else tile.window)])[0]


def read_tile(plan: TilePlan, tile: Tile, size: int, bands: list[int] | None = None,
              stretch: Sequence[tuple[float, float]] | None = None) -> Chip | None:
    """The tile as a model-size chip (one windowed read), or None when it holds no valid pixel."""
    try:
        return read_chip(plan.raster, region_wkt=tile_polygon(plan, tile).wkt, size=size, bands=bands,
                         max_upsample_ratio=1e9, stretch_range=stretch)
    except EngineError as exc:
        if exc.code == EMPTY_REGION:
            return None
        raise


def shared_stretch(plan: TilePlan, bands: list[int] | None = None, grid: int = 8, size: int = 64
                   ) -> list[tuple[float, float]] | None:
    """One 2-98 % stretch per band for the whole scan, None when the raster needs none (8-bit, palette).

    Why: a per-tile stretch would give each tile of a 16-bit or float raster its own contrast, so the
    same roof would look different on either side of a seam.  The percentiles come from a ``grid`` x
    ``grid`` lattice of ``size`` px windows over the scanned area: bounded reads, whatever the size.
    """
    probe = next((c for c in (read_tile(plan, t, 8, bands) for t in plan.tiles[:16]) if c is not None), None)
    if probe is None or probe.stretch is None:
        return None
    c0 = min(t.window[0] for t in plan.tiles)
    r0 = min(t.window[1] for t in plan.tiles)
    c1 = max(t.window[0] + t.window[2] for t in plan.tiles)
    r1 = max(t.window[1] + t.window[3] for t in plan.tiles)
    values: list[list[np.ndarray]] = [[] for _ in probe.bands]
    with rasterio.open(plan.raster) as ds:
        for i in range(grid):
            for j in range(grid):
                w, h = min(size, c1 - c0), min(size, r1 - r0)
                col = c0 + (c1 - c0 - w) * j // max(grid - 1, 1)
                row = r0 + (r1 - r0 - h) * i // max(grid - 1, 1)
                win = Window(col, row, w, h)
                data = ds.read(probe.bands, window=win).astype(np.float64)
                valid = (ds.read_masks(probe.bands, window=win) > 0).all(axis=0) & np.isfinite(data).all(axis=0)
                for b in range(len(probe.bands)):
                    values[b].append(data[b][valid])
    ranges = []
    for b, parts in enumerate(values):
        vals = np.concatenate(parts) if parts else np.zeros(0)
        if vals.size == 0:
            return probe.stretch
        lo, hi = (float(v) for v in np.percentile(vals, [2, 98]))
        if hi <= lo:
            lo, hi = float(vals.min()), float(vals.max())
        ranges.append((lo, hi))
    if len(ranges) == 1 and len(probe.stretch) == 1:
        return ranges
    return ranges if len(ranges) == len(probe.stretch) else probe.stretch
