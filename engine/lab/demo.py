"""The demo behind ``make demo``: the main job of the product on the bundled sample GeoTIFF.

A caption, three questions and a grounding request on regions of the sample raster (given in
EPSG:3857, as a QGIS canvas would send them, while the raster is in UTM), printing answers and
retrieved knowledge, writing GeoPackage + Shapefile outputs and a quick-look PNG with the boxes.
The sample's truth file (written by ``make-sample``) is printed beside each answer, with whether
they agree, so a reader of the demo sees at once how right the model is.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from engine.paths import DEFAULT_MODEL_DIR, SAMPLE_RASTER


def _tiles(raster: Path) -> list[dict]:
    truth = raster.with_name(raster.name + ".truth.json")
    if truth.is_file():
        return json.loads(truth.read_text()).get("tiles", [])
    return []


def _to_3857(bounds: list[float], crs: str, keep: float = 0.96) -> list[float]:
    """The canvas-CRS box of the tile's central part: a reprojected box grows a little, so the
    tile is shrunk first to keep the region on one tile, as an analyst drawing on it would."""
    from rasterio.warp import transform_bounds

    left, bottom, right, top = bounds
    dx, dy = (right - left) * (1 - keep) / 2, (top - bottom) * (1 - keep) / 2
    return list(transform_bounds(crs, "EPSG:3857", left + dx, bottom + dy, right - dx, top - dy, densify_pts=21))


def _pick(tiles: list[dict], scene: str, fallback: int) -> dict:
    for tile in tiles:
        if tile.get("scene_class") == scene:
            return tile
    return tiles[fallback % len(tiles)]


def _objects(tile: dict, cls: str) -> list[dict]:
    return [o for o in tile.get("objects", []) if o.get("cls") == cls]


def _grounding_hits(result: dict, truth: list[dict], threshold: float = 0.5) -> int:
    """Truth objects matched one-to-one by an answered box with IoU >= threshold (map coordinates).

    The truth is each object's axis-aligned box (``bbox_map``), as the model is asked to draw it;
    its footprint polygon (an airplane's cross) would never reach IoU 0.5 with any box.
    """
    from shapely import wkt as shapely_wkt
    from shapely.geometry import box as shapely_box

    from engine.lab.metrics import match_geometries

    answered = [shapely_wkt.loads(b["wkt"]) for b in result["boxes"]]
    return match_geometries(answered, [shapely_box(*obj["bbox_map"]) for obj in truth], threshold)


def truth_for(task: str, question: str | None, tile: dict, result: dict) -> tuple[str, bool | None]:
    """(what the truth file says, whether the answer agrees; None where no exact check exists)."""
    text = result["text"].lower()
    q = (question or "").lower()
    if task == "ground":
        planes = _objects(tile, "airplane")
        hits = _grounding_hits(result, planes)
        return (f"{len(planes)} airplanes; {hits} found with IoU >= 0.5, {len(result['boxes'])} boxes answered",
                hits == len(planes) == len(result["boxes"]))
    if "how many" in q:
        n = len(_objects(tile, "airplane"))
        return str(n), text.strip(" .") in (str(n),)
    if "swimming pool" in q:
        present = bool(_objects(tile, "swimming pool"))
        return ("yes" if present else "no"), text.strip(" .").startswith("yes" if present else "no")
    scene = str(tile.get("scene_class", "?"))
    if task == "vqa":
        return scene, scene.split()[0] in text
    counts = {}
    for obj in tile.get("objects", []):
        counts[obj["cls"]] = counts.get(obj["cls"], 0) + 1
    listed = ", ".join(f"{n} {c}" for c, n in sorted(counts.items()))
    return f"{scene} scene; {listed or 'no objects'}", None


def quicklook(raster: Path, bounds_3857: list[float], result: dict, path: Path) -> None:
    """Draw the chip the model saw with its boxes (pixel coordinates of the chip) into a PNG."""
    from PIL import Image, ImageDraw

    from engine.geo.window import read_chip

    chip = read_chip(raster, bbox=tuple(bounds_3857), bbox_crs="EPSG:3857", size=512)
    image = Image.fromarray(chip.image)
    draw = ImageDraw.Draw(image)
    from shapely import wkt as shapely_wkt

    inverse = ~chip.transform
    for box in result["boxes"]:
        polygon = shapely_wkt.loads(box["wkt"])
        corners = [inverse @ (x, y) for x, y in list(polygon.exterior.coords)]
        draw.line(corners, fill=(255, 40, 40), width=3)
        x, y = corners[0]
        draw.text((x + 3, y + 3), f"{box['label']} {box['score']:.2f}", fill=(255, 255, 0))
    image.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--raster", type=Path, default=SAMPLE_RASTER)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    args = parser.parse_args(argv)
    import logging

    logging.getLogger().setLevel(logging.WARNING)  # the demo prints its own report
    from engine.service import EngineService, export_result, require_model_dir

    import rasterio

    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in args.out.glob("demo*"):
        stale.unlink()
    with rasterio.open(args.raster) as ds:
        crs = ds.crs.to_string()
        full = list(ds.bounds)
    tiles = _tiles(args.raster) or [{"bounds": full, "scene_class": "?"}]
    print(f"sample raster: {args.raster} ({crs}); regions are sent in EPSG:3857 like a QGIS canvas")
    require_model_dir(args.model)
    service = EngineService(default_model=args.model)
    info = service.info({})
    model = info["model"]
    print(f"device: {info['device']}; model: {model.get('name')} "
          f"({model.get('parameters_total', 0) / 1e6:.1f} M parameters)")
    airport = _pick(tiles, "airport", 0)
    harbor = _pick(tiles, "harbor", 1)
    residential = _pick(tiles, "residential", 2)
    requests = [
        ("caption", None, airport),
        ("vqa", "What type of scene is this?", harbor),
        ("vqa", "How many airplanes are there?", airport),
        ("vqa", "Is there a swimming pool?", residential),
        ("ground", "airplanes", airport),           # a bare phrase, as an analyst types it
    ]
    agreed = checked = 0
    for i, (task, question, tile) in enumerate(requests):
        bounds = _to_3857(tile["bounds"], crs)
        out = args.out / ("demo.gpkg" if task != "ground" else "demo_detections.gpkg")
        result = service.ask({"raster": str(args.raster), "bbox": bounds, "bbox_crs": "EPSG:3857", "task": task,
                              "question": question, "out": str(out)})
        if task == "ground":
            export_result(result, str(args.out / "demo.shp"))
            quicklook(args.raster, bounds, result, args.out / "demo_quicklook.png")
        print(f"\n[{i + 1}] {task} on the {tile.get('scene_class', '?')} tile"
              + (f" — {question}" if question else ""))
        print(f"    answer: {result['text']}")
        truth, ok = truth_for(task, question, tile, result)
        print(f"    truth:  {truth}" + ("" if ok is None else ("   [agrees]" if ok else "   [DIFFERS]")))
        if ok is not None:
            checked += 1
            agreed += int(ok)
        for box in result["boxes"]:
            print(f"    box: {box['label']} score {box['score']:.2f} -> {box['wkt'][:90]}...")
        top = [f"{r['level']}:{r['entry']} ({r['score']:.2f})" for r in result["retrieved"][:6]]
        print(f"    knowledge: {', '.join(top)}")
        print(f"    {result['timing']['total_s'] * 1000:.0f} ms")
    print(f"\n{agreed} of {checked} checkable answers agree with the sample's truth file")
    print(f"outputs in {args.out}: {', '.join(sorted(p.name for p in args.out.iterdir() if not p.name.startswith('.')))}")
    print(f"demo finished in {time.perf_counter() - t0:.1f} s")
    return 0
