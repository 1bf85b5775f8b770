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
    from .protocol.schema import ASK_FIELDS, add_arguments

    p = sub.add_parser("ask", help="answer one question about a raster region; prints the result JSON")
    add_arguments(p, ASK_FIELDS)
    _add_knowledge(p)


def _run_ask(args: argparse.Namespace) -> int:
    from .protocol.schema import ASK_FIELDS, params_from_args
    from .service import EngineService

    result = EngineService(knowledge_dir=args.knowledge).ask(params_from_args(args, ASK_FIELDS))
    print(json.dumps(result, ensure_ascii=False))
    return 0


def _add_scan(sub: argparse._SubParsersAction) -> None:
    from .protocol.schema import SCAN_FIELDS, add_arguments

    p = sub.add_parser("scan", help="tile a whole raster (or an area) through the model into a resumable GeoPackage; "
                                    "prints a JSON summary")
    add_arguments(p, SCAN_FIELDS)
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run the batches on Ray: a local cluster, or the cluster at ADDRESS (docs/scale.md)")
    p.add_argument("--ray-workers", type=int, help="model actors on Ray (default: one per GPU, else per CPU)")
    _add_knowledge(p)


def _add_knowledge(p: argparse.ArgumentParser) -> None:
    p.add_argument("--knowledge", metavar="DIR", default=None,
                   help="knowledge index to retrieve from instead of the model's own (one rebuilt with "
                        "build-knowledge --entries; the plugin passes the profile's)")


def _run_scan(args: argparse.Namespace) -> int:
    from .protocol.schema import SCAN_FIELDS, params_from_args
    from .scan import run_scan
    from .service import EngineService, SilentContext

    params = params_from_args(args, SCAN_FIELDS)
    if args.ray is not None:
        params["ray"] = args.ray or True
    if args.ray_workers is not None:
        params["ray_workers"] = args.ray_workers
    print(json.dumps(run_scan(params, SilentContext(), EngineService(knowledge_dir=args.knowledge)),
                     ensure_ascii=False))
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from .protocol.server import ProtocolServer
    from .scan import scan_handler
    from .service import EngineService

    service = EngineService(default_model=args.model, default_device=args.device, knowledge_dir=args.knowledge)
    handlers = {"info": service.info, "ask": service.ask, "scan": scan_handler(service)}     # ping, cancel, shutdown: the server's own
    return ProtocolServer(handlers).serve_forever()


def _run_info(args: argparse.Namespace) -> int:
    from .service import EngineService

    result = EngineService(default_model=args.model, default_device=args.device,
                           knowledge_dir=args.knowledge).info({})
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
    "build-knowledge": "engine.knowledge.build",
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
                                metavar="{ask,scan,serve,info," + ",".join(DELEGATED) + "}")
    _add_ask(sub)
    _add_scan(sub)
    for name, helptext in (("serve", "speak the JSON-lines protocol on stdin/stdout"),
                           ("info", "versions, device and model parameter counts")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", help="checkpoint folder (default: the embedded model)")
        p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
        _add_knowledge(p)
    for name in DELEGATED:
        sub.add_parser(name, help=f"see python -m engine {name} --help", add_help=False)
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    runners = {"ask": _run_ask, "scan": _run_scan, "serve": _run_serve, "info": _run_info}
    try:
        return runners[args.command](args)
    except EngineError as exc:
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return EXIT_BAD_INPUT
