"""``scan --ray`` with a LLaVA-family folder on a GPU cluster: Ray Data's vLLM processor.

Why: the actor pool (:mod:`engine.scan.ray_runner`) loads one transformers pipeline per actor and
answers one fixed batch of tiles per call; on GPUs, vLLM's continuous batching and paged attention
keep every GPU busy across batches, and Ray Data's LLM processor (``ray.data.llm``) runs one vLLM
engine per GPU with the CPU work (reading tiles, georeferencing) on CPU workers around it.

The dataset has one row per tile (its window as JSON and the index of its scan batch):

1. preprocess (CPU workers, :func:`tile_request`): read the tile exactly as a local run does
   (:func:`engine.scan.tiling.read_tile`), then the row vLLM's engine stage takes: ``prompt`` (the
   Vicuna prompt the LLaVA backend builds, with its one ``<image>``), ``multimodal_data``
   (``{"image": the RGB chip}``, :func:`engine.backends.vllm_engine.build_requests`) and
   ``sampling_params`` (greedy, the scan's ``max_tokens``, the backend's stop strings);
2. the vLLM engine stage (one replica per GPU; the processor's own chat-template, tokenize and
   detokenize stages are off: the prompt is already in the model's template and vLLM tokenizes);
3. postprocess (CPU workers, :func:`tile_result`): the completion as the engine's Answer
   (:func:`engine.backends.vllm_engine.vllm_answer`), georeferenced by the local run's own
   :func:`engine.scan.runner.infer_batch` (which reads the tile window once more);
4. the driver collects the rows by scan batch and hands each complete batch to the writer, so
   commits, resume and the seam merge are those of every other scan.

A tile with no valid pixel is sent as a one-token request on a black chip and written as
``nodata``, so that every row goes through the same stages.  Which path a scan takes and why is
:func:`vllm_choice`; the actor pool stays the path on CPU clusters.
"""
from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .tiling import Tile, TilePlan

log = logging.getLogger("engine.scan.ray")

__all__ = ["vllm_choice", "processor_config", "sampling_params", "tile_rows", "tile_request", "tile_result",
           "vllm_ray_results"]

VLLM_BATCH = 16
"""Rows per call of a vLLM replica at least: vLLM batches continuously, the scan's batch only sets
how often the driver commits."""


def _ray_llm_error() -> str | None:
    import importlib

    try:
        importlib.import_module("ray.data.llm")
    except Exception as exc:   # ImportError, or a missing extra of ray[llm] (aiohttp, ...)
        return f"ray.data.llm does not import ({exc}; pip install 'ray[llm]')"
    return None


def vllm_choice(requested: str, family: str, gpus: int) -> tuple[bool, str | None]:
    """(whether the Ray scan runs on the vLLM processor, the one line why not when it was asked for)."""
    from engine.backends.vllm_engine import vllm_installed

    requested = (requested or "auto").lower()
    if requested == "transformers":
        return False, None
    reasons = []
    if family != "llava":
        reasons.append("the model is not a LLaVA-family folder")
    if gpus <= 0:
        reasons.append("the Ray cluster has no GPU for this scan (vLLM needs CUDA)")
    if not vllm_installed():
        reasons.append("the vllm package is not installed (pip install -r requirements/engine-vllm.txt)")
    if not reasons:
        error = _ray_llm_error()
        if error:
            reasons.append(error)
    if not reasons:
        return True, None
    if requested == "auto":
        return False, None
    return False, "vLLM not used for the Ray scan, running the actor pool with transformers: " + "; ".join(reasons)


def processor_config(model_dir: Path | str, replicas: int, batch: int, max_model_len: int = 4096,
                     dtype: str = "bfloat16") -> dict[str, Any]:
    """Keyword arguments of ``ray.data.llm.vLLMEngineProcessorConfig`` for a scan (one replica per GPU)."""
    return {"model_source": str(model_dir), "concurrency": max(1, int(replicas)),
            "batch_size": max(VLLM_BATCH, int(batch)),
            "engine_kwargs": {"dtype": dtype, "max_model_len": max_model_len, "limit_mm_per_prompt": {"image": 1},
                              "trust_remote_code": False},
            # The prompt is already in the model's template and vLLM tokenizes and detokenizes itself.
            "chat_template_stage": False, "tokenize_stage": False, "detokenize_stage": False,
            "prepare_multimodal_stage": False}


def sampling_params(max_tokens: int) -> dict[str, Any]:
    """``vllm.SamplingParams`` fields of every tile: greedy, as a local scan decodes."""
    from engine.backends.llava import STOP_STRINGS

    return {"max_tokens": int(max_tokens), "temperature": 0.0, "top_p": 1.0, "stop": list(STOP_STRINGS),
            "logprobs": 0}


def scan_prompt(task: str, question: str | None) -> tuple[str, str]:
    """(the Vicuna prompt of every tile, the question as shown to the analyst)."""
    from engine.backends.llava import build_instruction, vicuna_v1_prompt

    instruction, asked = build_instruction(task, question)
    return vicuna_v1_prompt(instruction), asked


def tile_rows(chunks: Sequence[Sequence[Tile]]) -> list[dict[str, Any]]:
    """The dataset's rows: one per tile, its window as JSON and the index of its scan batch."""
    return [{"tile": json.dumps(t.to_dict()), "chunk": k} for k, chunk in enumerate(chunks) for t in chunk]


@functools.lru_cache(maxsize=8)
def _plan(view: str) -> TilePlan:
    return TilePlan.from_worker_view(json.loads(view))


def _spec(spec: str):
    from .runner import InferenceSpec

    return InferenceSpec(**json.loads(spec))


def tile_request(row: dict[str, Any], plan: str, spec: str, prompt: str) -> dict[str, Any]:
    """Preprocess: a tile row -> the row vLLM's engine stage takes (prompt, image, sampling params)."""
    from engine.backends.vllm_engine import build_requests

    from .tiling import read_tile

    s = _spec(spec)
    chip = read_tile(_plan(plan), Tile.from_dict(json.loads(str(row["tile"]))), s.image_size, s.bands, s.stretch)
    image = chip.image if chip is not None else np.zeros((s.image_size, s.image_size, 3), dtype=np.uint8)
    request = build_requests([image], prompt)[0]
    return {"tile": row["tile"], "chunk": int(row["chunk"]), "nodata": chip is None, "prompt": request["prompt"],
            "multimodal_data": request["multi_modal_data"],
            "sampling_params": sampling_params(1 if chip is None else s.max_tokens)}


def _confidence(row: dict[str, Any]) -> float:
    """Geometric-mean probability of the generated tokens (1.0 when vLLM returned no log-probabilities)."""
    chosen = []
    for token, entry in zip(list(row.get("generated_tokens") or []), list(row.get("logprobs") or [])):
        if isinstance(entry, dict):
            info = entry.get(int(token), entry.get(str(token)))
            if info is None and len(entry) == 1:
                info = next(iter(entry.values()))
            if isinstance(info, dict) and info.get("logprob") is not None:
                chosen.append(float(info["logprob"]))
    return math.exp(sum(chosen) / len(chosen)) if chosen else 1.0


class _Answered:
    """A stand-in pipeline whose answer is the completion vLLM already wrote (for infer_batch)."""

    def __init__(self, answer: Any) -> None:
        self._answer = answer

    def answer(self, images: list, *_args: Any, **_kwargs: Any) -> list:
        return [self._answer] * len(images)


def tile_result(row: dict[str, Any], plan: str, spec: str, asked: str) -> dict[str, Any]:
    """Postprocess: a completed row -> the tile's TileResult (as JSON), georeferenced like a local run."""
    from engine.backends.vllm_engine import vllm_answer

    from .runner import TileResult, infer_batch

    tile = Tile.from_dict(json.loads(str(row["tile"])))
    s = _spec(spec)
    if row.get("nodata"):
        result = TileResult(tile.id, "nodata")
    else:
        n = int(row.get("num_generated_tokens") or 0)
        answer = vllm_answer(str(row.get("generated_text") or ""), s.task, asked,
                             "max_tokens" if n >= s.max_tokens else "eos", _confidence(row))
        result = infer_batch(_Answered(answer), _plan(plan), [tile], s)[0]
    return {"chunk": int(row["chunk"]), "result": json.dumps(result.to_dict())}


def build_processor(config: dict[str, Any], preprocess: Callable, postprocess: Callable) -> Callable:
    """``ray.data.llm.build_processor`` over ``vLLMEngineProcessorConfig(**config)``."""
    from ray.data.llm import build_processor as build, vLLMEngineProcessorConfig

    return build(vLLMEngineProcessorConfig(**config), preprocess=preprocess, postprocess=postprocess)


def vllm_ray_results(ray: Any, plan: TilePlan, chunks: Sequence[Sequence[Tile]], spec: Any, model_dir: Path,
                     replicas: int, batch: int, build: Callable = build_processor) -> Iterator[list]:
    """Yield each scan batch's TileResults (in the batch's tile order) once all its tiles are back."""
    from .runner import TileResult

    view, spec_json = json.dumps(plan.worker_view()), json.dumps(asdict(spec))
    prompt, asked = scan_prompt(spec.task, spec.question)
    processor = build(processor_config(Path(model_dir).resolve(), replicas, batch),
                      functools.partial(tile_request, plan=view, spec=spec_json, prompt=prompt),
                      functools.partial(tile_result, plan=view, spec=spec_json, asked=asked))
    rows = tile_rows(chunks)
    log.info("ray: %d tiles in %d batches on the vLLM processor (%d GPU replica(s))", len(rows), len(chunks), replicas)
    pending: dict[int, dict[int, TileResult]] = {}
    for row in processor(ray.data.from_items(rows)).iter_rows():
        k = int(row["chunk"])
        result = TileResult.from_dict(json.loads(str(row["result"])))
        pending.setdefault(k, {})[result.tile_id] = result
        if len(pending[k]) == len(chunks[k]):
            done = pending.pop(k)
            yield [done[t.id] for t in chunks[k]]
    if pending:
        raise RuntimeError(f"the vLLM processor returned incomplete batches: {sorted(pending)}")
