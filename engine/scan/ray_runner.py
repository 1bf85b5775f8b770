"""``--ray``: the scan's batches through a Ray Data actor pool, one loaded model per actor.

Why Ray Data with actors: loading the model is the slow part, so each actor loads it once and then
answers batch after batch (``map_batches`` over a dataset whose rows are the scan's batches); a
cluster adds actors, not reloads.  Each row is one fixed batch of tiles, so every tile goes through
the model with the same companions as in a local run, and the actor runs the very function the local
run does (:func:`engine.scan.runner.infer_batch`): the results are the same.  Only plain JSON crosses
the wire (tile windows in, georeferenced boxes as WKB hex out); the driver merges and writes, so the
output file lives on the driver alone.  Workers read the raster themselves: on a cluster its path
must be the same on every node (a shared file system; see docs/scale.md).

A LLaVA-family folder on a cluster with GPUs, with ``backend`` ``vllm`` (or ``auto`` where vLLM and
``ray.data.llm`` import), goes through Ray Data's vLLM processor instead (:mod:`engine.scan.ray_vllm`);
asked for vLLM where it cannot run (no GPU in the cluster, packages missing, not a LLaVA folder),
the scan runs on this actor pool and says why in its warnings.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from engine.errors import BAD_REQUEST, EngineError

from .tiling import Tile, TilePlan

log = logging.getLogger("engine.scan.ray")

__all__ = ["ray_results", "TileModelActor"]

ENGINE_ROOT = Path(__file__).resolve().parents[2]


class TileModelActor:
    """A Ray actor: loads the model once, then answers one batch of tiles per dataset row."""

    def __init__(self, config: str) -> None:
        import torch

        from engine.service import EngineService

        from .runner import InferenceSpec

        cfg = json.loads(config)
        torch.set_num_threads(max(1, int(cfg["threads"])))
        self.plan = TilePlan.from_worker_view(cfg["plan"])
        self.spec = InferenceSpec(**cfg["spec"])
        service = EngineService(default_model=cfg["model"], default_device=cfg["device"],
                                knowledge_dir=cfg.get("knowledge"))
        self.pipeline = service.pipeline(cfg["model"], cfg["device"], cfg["precision"], cfg["backend"])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .runner import infer_batch

        out = []
        for chunk in batch["chunk"]:
            tiles = [Tile.from_dict(d) for d in json.loads(str(chunk))]
            out.append(json.dumps([r.to_dict() for r in infer_batch(self.pipeline, self.plan, tiles, self.spec)]))
        return {"results": np.array(out, dtype=object)}


def _connect(address: str) -> Any:
    """The running Ray session, or a new one (a local cluster for ``""``, else ``address``)."""
    try:
        import ray
    except ImportError:
        raise EngineError(BAD_REQUEST, "--ray needs Ray in the engine's environment: pip install 'ray[data]' "
                                       "(see requirements/engine-cpu.txt)") from None
    if not ray.is_initialized():
        env = {"PYTHONPATH": os.pathsep.join([str(ENGINE_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        try:
            ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": env}, ignore_reinit_error=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise EngineError(BAD_REQUEST, f"cannot reach the Ray cluster {address or '(local)'}: {exc}") from None
    return ray


def ray_results(plan: TilePlan, chunks: Sequence[Sequence[Tile]], spec: Any, request: Any,
                model_dir: Path, knowledge_dir: Path | None = None) -> Iterator[list]:
    """Yield each batch's TileResults as the actors finish them (in any order); the actors
    retrieve from ``knowledge_dir`` when the engine was given one (serve --knowledge)."""
    from dataclasses import asdict

    from .runner import TileResult

    ray = _connect(request.ray or "")
    ray.data.DataContext.get_current().enable_progress_bars = False
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0)) if request.device != "cpu" else 0
    cpus = max(1, int(resources.get("CPU", 1)))
    workers = request.ray_workers or (gpus if gpus else cpus)
    workers = max(1, min(workers, len(chunks)))
    from engine.backends import backend_for

    from .ray_vllm import vllm_choice, vllm_ray_results

    on_vllm, why = vllm_choice(request.backend, backend_for(model_dir), gpus)
    if on_vllm:
        yield from vllm_ray_results(ray, plan, chunks, spec, model_dir, replicas=workers, batch=request.batch)
        return
    if why:   # asked for vLLM where it cannot run: said once, in the log and in the scan's warnings
        log.warning("%s", why)
        plan.warnings.append(why)
    threads = 1 if gpus else max(1, cpus // workers)
    config = json.dumps({"plan": plan.worker_view(), "spec": asdict(spec), "threads": threads,
                         "model": str(Path(model_dir).resolve()),
                         "device": "cuda" if gpus else "cpu", "precision": request.precision,
                         "backend": request.backend,
                         "knowledge": str(Path(knowledge_dir).resolve()) if knowledge_dir else None})
    rows = [{"chunk": json.dumps([t.to_dict() for t in chunk])} for chunk in chunks]
    log.info("ray: %d batches on %d actor(s) (%s, %d thread(s) each)", len(rows), workers,
             "1 GPU" if gpus else "CPU", threads)
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        TileModelActor, batch_size=1, batch_format="numpy", fn_constructor_kwargs={"config": config},
        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=threads, num_gpus=1 if gpus else 0)
    for row in ds.iter_rows():
        yield [TileResult.from_dict(d) for d in json.loads(str(row["results"]))]
