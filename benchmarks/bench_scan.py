"""Whole-raster scans: throughput, memory against raster size, and detection quality across seams.

Writes benchmarks/results/scan_cpu.json and prints a table.  Every configuration runs in a fresh
``python benchmarks/bench_scan.py --one PARAMS`` process, so its peak RSS (``ru_maxrss``) is that
scan's alone (for Ray, the driver's; each actor holds one more model).

* throughput: ground and classify on a 4096 x 4096 px mosaic of generated scenes (16 x 16 scenes of
  256 px, made with engine.data.sample_raster), serial (batch 1) vs batched vs Ray with 1 and 2
  workers; tiles of 256 px, the scene size (the embedded model sees scenes rendered at 256 px and
  shrunk to its 128 px input);
* memory: the same classify scan on a 2048 and a 16384 px raster (the 16k one is the 2k mosaic
  written 8 x 8 times, window by window) with 1024 px tiles, so the 16k scan stays short: peak RSS
  must not grow with the raster;
* quality: on a fresh mosaic, a ground scan whose tile grid is offset by half a scene from the
  scenes against region asks on whole scenes: precision and recall at IoU 0.5 in map coordinates.

``--quick`` runs a smaller mosaic (for a loaded machine); the JSON says which was run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "scan_cpu.json"
WORK = REPO / "runs" / "bench_scan"


def one(params: dict) -> dict:
    """Run one scan in this process; the summary plus this process's peak RSS."""
    from engine.service import EngineService, SilentContext
    from engine.scan.runner import run_scan

    if params.pop("_ray_init", None):
        import ray

        ray.init(num_cpus=int(params.pop("_ray_cpus", 2)), include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    summary = run_scan(params, SilentContext(), EngineService())
    summary["wall_s"] = round(time.perf_counter() - t0, 3)
    summary["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return summary


def run_one(params: dict) -> dict:
    out = Path(params["out"])
    for suffix in ("", "-journal"):
        Path(str(out) + suffix).unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(params)], capture_output=True, text=True,
                          env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tile_raster(src: Path, dst: Path, times: int) -> None:
    """``dst``: ``src`` repeated ``times`` x ``times``, written window by window (never whole in memory)."""
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    with rasterio.open(src) as s:
        data = s.read()
        profile = s.profile.copy()
        t = s.transform
    h, w = data.shape[1:]
    profile.update(width=w * times, height=h * times, transform=Affine(t.a, t.b, t.c, t.d, t.e, t.f),
                   compress="deflate", tiled=True, blockxsize=256, blockysize=256, BIGTIFF="IF_SAFER")
    with rasterio.open(dst, "w", **profile) as d:
        for r in range(times):
            for c in range(times):
                d.write(data, window=Window(c * w, r * h, w, h))


def match(pred: list, truth: list, iou: float = 0.5) -> tuple[int, int, int]:
    """(true positives, predictions, truths) with the evaluation's one-to-one IoU matching."""
    from engine.lab.metrics import match_geometries

    return match_geometries(pred, truth, iou), len(pred), len(truth)


def quality(mosaic: Path, truth: dict, batch: int) -> dict:
    """Scan (tiles offset half a scene from the scenes) vs one ask per whole scene, same area."""
    import shapely

    from engine.scan.writer import read_layer
    from engine.service import EngineService, SilentContext

    scene = truth["tile"] * truth["pixel_size"]
    xmin, ymin, xmax, ymax = truth["bounds"]
    area = shapely.box(xmin + scene / 2, ymin + scene / 2, xmax - scene / 2, ymax - scene / 2)
    objects = [shapely.box(*o["bbox_map"]) for t in truth["tiles"] for o in t["objects"]]
    objects = [o for o in objects if area.contains(o.centroid)]
    out = WORK / "quality.gpkg"
    scan = run_one({"raster": str(mosaic), "task": "ground", "tile": truth["tile"], "batch": batch,
                    "bbox": list(area.bounds), "out": str(out)})
    scanned = [shapely.from_wkt(r["wkt"]) for r in read_layer(out, "detections")]
    service, asked = EngineService(), []
    for t in truth["tiles"]:
        result = service.ask({"raster": str(mosaic), "bbox": t["bounds"], "task": "ground"}, SilentContext())
        asked += [g for g in (shapely.from_wkt(b["wkt"]) for b in result["boxes"]) if area.contains(g.centroid)]

    def pr(tp: int, n_pred: int, n_truth: int) -> dict:
        return {"precision": round(tp / n_pred, 4) if n_pred else None,
                "recall": round(tp / n_truth, 4) if n_truth else None, "tp": tp, "predicted": n_pred,
                "objects": n_truth}

    return {"area": "mosaic less half a scene on every side (scan tiles offset from the scenes)",
            "scan": {**pr(*match(scanned, objects)), "tiles": scan["tiles"]["total"]},
            "region_asks": pr(*match(asked, objects))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="a 2048 px mosaic instead of 4096 (loaded machines)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(json.loads(args.one))))
        return 0

    from engine.data.sample_raster import write_sample_geotiff

    WORK.mkdir(parents=True, exist_ok=True)
    grid = 8 if args.quick else 16
    mosaic = WORK / f"mosaic_{grid * 256}.tif"
    if not mosaic.exists():
        write_sample_geotiff(mosaic, seed=11, grid=(grid, grid))
    runs = []

    def record(name: str, task: str, **extra) -> None:
        params = {"raster": str(mosaic), "task": task, "tile": 256, "out": str(WORK / f"{name}_{task}.gpkg"), **extra}
        s = run_one(params)
        row = {"config": name, "task": task, "tiles": s["tiles"]["total"], "tile_px": s["tiles"]["tile_px"],
               "overlap_px": s["tiles"]["overlap_px"], "batch": s["batch"], "wall_s": s["wall_s"],
               "model_load_s": s["timing"]["model_load_s"], "tiles_s": s["timing"]["tiles_s"],
               "tiles_per_s": s["timing"]["tiles_per_s"], "features": s["features"], "peak_rss_mb": s["peak_rss_mb"]}
        runs.append(row)
        print(json.dumps(row), flush=True)

    for task in ("classify", "ground"):
        record("serial", task, batch=1)
        record("batched", task, batch=args.batch)
        if not args.skip_ray:
            for workers in (1, 2):
                record(f"ray{workers}", task, batch=args.batch, ray=True, ray_workers=workers,
                       _ray_init=True, _ray_cpus=2)

    small, big = WORK / "raster_2048.tif", WORK / "raster_16384.tif"
    if not small.exists():
        write_sample_geotiff(small, seed=5, grid=(8, 8))
    if not big.exists():
        tile_raster(small, big, 8)
    memory = []
    for raster in (small, big):
        s = run_one({"raster": str(raster), "task": "classify", "tile": 1024, "batch": args.batch, "max_tokens": 8,
                     "out": str(WORK / f"mem_{raster.stem}.gpkg")})
        import rasterio

        with rasterio.open(raster) as ds:
            size = f"{ds.width}x{ds.height}"
        memory.append({"raster": size, "tiles": s["tiles"]["total"], "peak_rss_mb": s["peak_rss_mb"],
                       "wall_s": s["wall_s"]})
        print(json.dumps(memory[-1]), flush=True)

    quality_result = None
    if not args.skip_quality:
        fresh = WORK / "fresh_mosaic.tif"
        truth = write_sample_geotiff(fresh, seed=2026, grid=(4, 4))
        quality_result = quality(fresh, truth, args.batch)
        print(json.dumps(quality_result), flush=True)

    import torch

    result = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
                          "load_average_at_end": list(os.getloadavg()),
                          "note": "shared machine: other jobs were running; see load_average_at_end"},
              "mosaic": {"path": mosaic.name, "size_px": grid * 256, "scenes": grid * grid, "scene_px": 256},
              "throughput": runs, "memory": memory, "quality": quality_result}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print_table(result)
    return 0


def print_table(result: dict) -> None:
    print(f"\nscan throughput on a {result['mosaic']['size_px']} px mosaic ({os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={result['machine']['omp_num_threads']})")
    print(f"{'config':<10}{'task':<10}{'tiles':>7}{'batch':>7}{'tiles/s':>9}{'tiles s':>9}{'wall s':>9}{'RSS MB':>9}")
    for r in result["throughput"]:
        print(f"{r['config']:<10}{r['task']:<10}{r['tiles']:>7}{r['batch']:>7}{r['tiles_per_s'] or 0:>9.2f}"
              f"{r['tiles_s']:>9.1f}{r['wall_s']:>9.1f}{r['peak_rss_mb']:>9.0f}")
    print("\npeak RSS against raster size (classify, 1024 px tiles)")
    for m in result["memory"]:
        print(f"  {m['raster']:>12}: {m['tiles']:>4} tiles, {m['peak_rss_mb']:.0f} MB, {m['wall_s']:.1f} s")
    if result.get("quality"):
        q = result["quality"]
        print(f"\nquality (IoU 0.5): scan P {q['scan']['precision']} R {q['scan']['recall']}; "
              f"region asks P {q['region_asks']['precision']} R {q['region_asks']['recall']}")


if __name__ == "__main__":
    raise SystemExit(main())
