"""The shipped georeferenced sample: a mosaic of generated scenes written as a real GeoTIFF.

Why: the demo and the plugin tests need a raster with a real CRS (UTM 33N by default), tiled and
compressed like production imagery, whose content is *known*.  The JSON sidecar
``<path>.truth.json`` records every tile's scene class, map bounds and object boxes in map
coordinates, so tests can check that a region the plugin sends to the engine lands on the right
pixels and that grounded answers come back where the objects are.

CLI: ``python -m engine.data.sample_raster resources/sample/sample_utm33n.tif``.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from .scene_generator import SCENE_CLASSES, generate_scene

__all__ = ["write_sample_geotiff", "tile_seed_classes", "MAX_SIZE_BYTES"]

MAX_SIZE_BYTES = 3 * 1024 * 1024
"""The shipped sample must stay small (it lives in the repository)."""


def tile_seed_classes(seed: int, n_tiles: int) -> list[str]:
    """Scene class per tile: a seeded permutation, so neighbouring tiles differ."""
    perm = np.random.default_rng([seed, 4242]).permutation(len(SCENE_CLASSES))
    return [SCENE_CLASSES[int(perm[i % len(SCENE_CLASSES)])] for i in range(n_tiles)]


SCENE_RENDER_SIZE = 256
"""Pixels of one synthetic scene as rendered (the training images are this, resized to the model input)."""
DEFAULT_PIXEL_SIZE = 0.5
"""Metres a synthetic scene pixel stands for: the sample raster's scale, recorded in checkpoints."""


def write_sample_geotiff(path: str | os.PathLike, seed: int = 7, grid: tuple[int, int] = (3, 3),
                         tile: int = SCENE_RENDER_SIZE, crs: str = "EPSG:32633",
                         origin: tuple[float, float] = (500000.0, 4650000.0),
                         pixel_size: float = DEFAULT_PIXEL_SIZE) -> dict:
    """Write the mosaic GeoTIFF and its truth sidecar; return the truth dictionary.

    ``grid`` is (rows, cols) of tiles, each one scene of ``tile`` px rendered from
    ``default_rng([seed, tile_index])``; ``origin`` is the map position of the top-left corner
    (west, north) and ``pixel_size`` the ground size of a pixel in CRS units.
    """
    import rasterio
    from rasterio.enums import ColorInterp
    from affine import Affine

    rows, cols = grid
    height, width = rows * tile, cols * tile
    mosaic = np.zeros((height, width, 3), np.uint8)
    ox, oy = float(origin[0]), float(origin[1])
    ps = float(pixel_size)
    transform = Affine(ps, 0.0, ox, 0.0, -ps, oy)  # north-up, origin = top-left corner
    classes = tile_seed_classes(seed, rows * cols)

    def to_map(px: float, py: float) -> tuple[float, float]:
        return ox + px * ps, oy - py * ps

    tiles = []
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            scene = generate_scene(np.random.default_rng([seed, i]), classes[i], tile)
            x0, y0 = c * tile, r * tile
            mosaic[y0:y0 + tile, x0:x0 + tile] = scene.image
            objs = []
            for o in scene.objects:
                bx1, by1, bx2, by2 = o.box
                mx1, my2 = to_map(x0 + bx1, y0 + by1)
                mx2, my1 = to_map(x0 + bx2, y0 + by2)
                objs.append({
                    "cls": o.cls, "colour": o.colour, "size": o.size,
                    "orientation": o.orientation, "angle": o.angle,
                    "bbox_pixel": [round(x0 + bx1, 2), round(y0 + by1, 2), round(x0 + bx2, 2),
                                   round(y0 + by2, 2)],
                    "bbox_map": [round(v, 3) for v in (mx1, my1, mx2, my2)],
                    "polygon_map": [[round(v, 3) for v in to_map(x0 + px, y0 + py)]
                                    for px, py in o.polygon],
                })
            left, top = to_map(x0, y0)
            right, bottom = to_map(x0 + tile, y0 + tile)
            tiles.append({
                "row": r, "col": c, "seed": [seed, i], "scene_class": scene.scene_class,
                "pixel_window": [x0, y0, tile, tile],
                "bounds": [left, bottom, right, top],
                "land_cover_fractions": scene.land_cover_fractions,
                "objects": objs,
            })
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    block = 256 if tile % 256 == 0 or width >= 256 else 16 * max(1, tile // 16)
    profile = {
        "driver": "GTiff", "width": width, "height": height, "count": 3, "dtype": "uint8",
        "crs": crs, "transform": transform, "tiled": True, "blockxsize": block,
        "blockysize": block, "compress": "deflate", "predictor": 2, "zlevel": 9,
        "photometric": "RGB", "interleave": "pixel",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.transpose(mosaic, (2, 0, 1)))
        dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
        dst.update_tags(source="rs-lvlm-qgis synthetic scenes", seed=str(seed))
    truth = {
        "raster": path.name, "crs": crs, "width": width, "height": height,
        "pixel_size": ps, "origin": [ox, oy], "transform": list(transform)[:6],
        "tile": tile, "grid": [rows, cols], "seed": seed,
        "bounds": [ox, oy - height * ps, ox + width * ps, oy],
        "tiles": tiles,
    }
    Path(str(path) + ".truth.json").write_text(json.dumps(truth, indent=1))
    return truth


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write the synthetic sample GeoTIFF + truth JSON.")
    ap.add_argument("out", help="output GeoTIFF path")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--rows", type=int, default=3)
    ap.add_argument("--cols", type=int, default=3)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--crs", default="EPSG:32633")
    ap.add_argument("--pixel-size", type=float, default=0.5)
    ap.add_argument("--origin", type=float, nargs=2, default=(500000.0, 4650000.0))
    a = ap.parse_args(argv)
    truth = write_sample_geotiff(a.out, a.seed, (a.rows, a.cols), a.tile, a.crs,
                                 tuple(a.origin), a.pixel_size)
    size = os.path.getsize(a.out)
    print(json.dumps({"raster": a.out, "bytes": size, "crs": truth["crs"],
                      "classes": [t["scene_class"] for t in truth["tiles"]],
                      "objects": sum(len(t["objects"]) for t in truth["tiles"])}))
    if size > MAX_SIZE_BYTES:
        print(f"warning: {a.out} is {size} bytes, over {MAX_SIZE_BYTES}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
