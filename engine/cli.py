"""Command line of the engine: ``python -m engine <command>``.

Sub-commands that need heavy libraries import them lazily, so ``serve`` and ``--help`` start
quickly and a missing optional piece only breaks the command that needs it. Bad input ends with
a one-line message on stderr and exit status 2; a bug with status 1.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable

from .errors import EngineError

EXIT_BAD_INPUT = 2


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def _add_ask(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ask", help="answer one question about a raster region; prints the result JSON")
    p.add_argument("--raster", required=True, help="GeoTIFF / COG / VRT or any GDAL raster")
    p.add_argument("--bbox", nargs=4, type=float, metavar=("XMIN", "YMIN", "XMAX", "YMAX"))
    p.add_argument("--bbox-crs", help="CRS of --bbox / --region-wkt (default: the raster's)")
    p.add_argument("--region-wkt", help="a polygon region instead of --bbox")
    p.add_argument("--task", default="caption", help="caption | vqa | ground | classify")
    p.add_argument("--question")
    p.add_argument("--out", help="write results to FILE.gpkg | .shp | .geojson")
    p.add_argument("--out-crs", help="CRS of the output polygons (default: the raster's)")
    p.add_argument("--model", help="checkpoint folder (default: the embedded model)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16", "float16", "int8"),
                   help="auto: float32 on CPU, bfloat16 on CUDA; int8: int8 decoding on CPU (faster, see docs)")
    p.add_argument("--bands", type=int, nargs="+", help="1-based bands to use as R G B")


def _run_ask(args: argparse.Namespace) -> int:
    from .service import EngineService

    params = {"raster": args.raster, "bbox": args.bbox, "bbox_crs": args.bbox_crs, "region_wkt": args.region_wkt,
              "region_crs": args.bbox_crs, "task": args.task, "question": args.question, "out": args.out,
              "out_crs": args.out_crs, "model": args.model, "device": args.device, "max_tokens": args.max_tokens,
              "bands": args.bands, "precision": args.precision}
    result = EngineService().ask({k: v for k, v in params.items() if v is not None})
    print(json.dumps(result, ensure_ascii=False))
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from .protocol.server import ProtocolServer
    from .service import EngineService

    service = EngineService(default_model=args.model, default_device=args.device)
    handlers = {"info": service.info, "ask": service.ask, "ping": lambda params, ctx: {"pong": True},
                "cancel": lambda params, ctx: {}, "shutdown": lambda params, ctx: {}}
    return ProtocolServer(handlers).serve_forever()


def _run_info(args: argparse.Namespace) -> int:
    from .service import EngineService

    result = EngineService(default_model=args.model, default_device=args.device).info({})
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return 0


def _delegate(module: str) -> Callable[[list[str]], int]:
    """Sub-commands that own their arguments (training, evaluation...) get the rest of argv."""
    def run(argv: list[str]) -> int:
        import importlib

        from .backends.base import checkpoint_errors

        with checkpoint_errors():
            return int(importlib.import_module(module).main(argv) or 0)
    return run


DELEGATED = {
    "train": "engine.lab.train",
    "evaluate": "engine.lab.evaluate",
    "build-knowledge": "engine.knowledge.knowledge_base",
    "demo": "engine.lab.demo",
    "make-sample": "engine.data.sample_raster",
    "export-checkpoint": "engine.lab.export_checkpoint",
    "convert": "engine.convert",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        _configure_logging(False)
        try:
            return _delegate(DELEGATED[argv[0]])(argv[1:])
        except EngineError as exc:
            print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
            return EXIT_BAD_INPUT
    parser = argparse.ArgumentParser(prog="python -m engine", description="rs-lvlm-qgis inference engine")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{ask,serve,info," + ",".join(DELEGATED) + "}")
    _add_ask(sub)
    for name, helptext in (("serve", "speak the JSON-lines protocol on stdin/stdout"),
                           ("info", "versions, device and model parameter counts")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", help="checkpoint folder (default: the embedded model)")
        p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    for name in DELEGATED:
        sub.add_parser(name, help=f"see python -m engine {name} --help", add_help=False)
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    runners = {"ask": _run_ask, "serve": _run_serve, "info": _run_info}
    try:
        return runners[args.command](args)
    except EngineError as exc:
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return EXIT_BAD_INPUT
