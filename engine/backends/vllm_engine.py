"""An optional vLLM engine for LLaVA-family folders on CUDA: the same prompts, images and answers.

Why: on a GPU, transformers' generate reaches a small fraction of the memory-bandwidth roofline
at batch 1; vLLM's paged attention and CUDA graphs reach most of it, and it batches a scan's
tiles natively.  The engine keeps one interface (:class:`engine.backends.base.Pipeline`): this
pipeline is fed the prompt the LLaVA backend builds (:func:`build_instruction`,
:func:`vicuna_v1_prompt`), streams text through vLLM's step loop and aborts on cancel.

Selection (:func:`choose_backend`): ``backend="vllm"`` asks for it, ``"auto"`` takes it when the
``vllm`` package imports and CUDA is present, ``"transformers"`` never does.  Asked for where it
cannot run (no CUDA, package missing, not a LLaVA folder), the engine falls back to transformers
and says why in one line (:data:`FALLBACK_WARNINGS` of the pipeline).
"""
from __future__ import annotations

import importlib.util
import itertools
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from engine.errors import BAD_REQUEST, EngineError
from engine.grounding import parse_boxes
from engine.tasks import BACKENDS

from .base import Answer, StopCheck, TokenCallback

log = logging.getLogger("engine.backends.vllm")

__all__ = ["BACKENDS", "choose_backend", "build_requests", "vllm_answer", "VllmPipeline"]

_request_ids = itertools.count()


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:                        # pragma: no cover - torch is always in the engine venv
        return False


def choose_backend(requested: str, family: str, device: str) -> tuple[str, str | None]:
    """(``"vllm"`` or ``"transformers"``, the one-line reason when vLLM was asked for and not used)."""
    requested = (requested or "auto").lower()
    if requested not in BACKENDS:
        raise EngineError(BAD_REQUEST, f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    if requested == "transformers":
        return "transformers", None
    reasons = []
    if family != "llava":
        reasons.append("the model is not a LLaVA-family folder")
    if device != "cuda" or not _cuda():
        reasons.append("vLLM needs a CUDA GPU")
    if not vllm_installed():
        reasons.append("the vllm package is not installed (pip install -r requirements/engine-vllm.txt)")
    if not reasons:
        return "vllm", None
    if requested == "auto":
        return "transformers", None
    return "transformers", "vLLM not used, answering with transformers: " + "; ".join(reasons)


def build_requests(images: Sequence[np.ndarray], prompt: str) -> list[dict[str, Any]]:
    """One vLLM request per image: the Vicuna prompt with its ``<image>`` and the RGB image."""
    from PIL import Image

    from engine.model.image_processing import to_rgb_uint8

    if prompt.count("<image>") != 1:
        raise ValueError("a LLaVA prompt holds exactly one <image> placeholder")
    return [{"prompt": prompt, "multi_modal_data": {"image": Image.fromarray(to_rgb_uint8(img))}} for img in images]


class VllmPipeline:
    """A vLLM ``LLM`` over a LLaVA-family folder, behind the engine's pipeline interface."""

    backend = "vllm"

    def __init__(self, llm: Any, model_dir: Path, image_size: int, dtype: str) -> None:
        self.llm = llm
        self.model_dir = Path(model_dir)
        self.name = self.model_dir.name
        self.device = "cuda"
        self._image_size = image_size
        self.dtype = dtype

    @classmethod
    def load(cls, model_dir: Path | str, dtype: str | None = None, max_model_len: int = 4096) -> "VllmPipeline":
        from vllm import LLM
        from transformers import LlavaConfig

        model_dir = Path(model_dir)
        config = LlavaConfig.from_pretrained(str(model_dir), local_files_only=True)
        dtype = dtype if dtype in ("bfloat16", "float16") else "bfloat16"
        llm = LLM(model=str(model_dir), dtype=dtype, max_model_len=max_model_len, limit_mm_per_prompt={"image": 1},
                  trust_remote_code=False)
        return cls(llm, model_dir, int(config.vision_config.image_size), dtype)

    @property
    def image_size(self) -> int:
        return self._image_size

    def info(self) -> dict:
        return {"name": self.name, "path": str(self.model_dir), "backend": self.backend, "dtype": self.dtype,
                "image_size": self.image_size, "use_sam": False, "use_experts": False, "knowledge_entries": 0}

    def answer(self, images: list[np.ndarray], task: str, question: str | None, *, max_new_tokens: int = 64,
               on_token: TokenCallback | None = None, should_stop: StopCheck | None = None,
               do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
               history: list[dict] | None = None) -> list[Answer]:
        """All images in one vLLM batch; text streamed per step, requests aborted on cancel."""
        from vllm import SamplingParams

        from .llava import STOP_STRINGS, build_instruction, vicuna_v1_prompt

        t0 = time.perf_counter()
        instruction, asked = build_instruction(task, question)
        requests = build_requests(images, vicuna_v1_prompt(instruction, history=history))
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                                top_p=top_p if do_sample else 1.0, stop=list(STOP_STRINGS), logprobs=0)
        engine = self.llm.llm_engine
        ids = [f"rs-lvlm-{next(_request_ids)}" for _ in requests]
        for rid, request in zip(ids, requests):
            engine.add_request(rid, request, params)
        texts, reasons, first = {rid: "" for rid in ids}, {rid: "max_tokens" for rid in ids}, []
        confidence = {rid: 0.0 for rid in ids}
        while engine.has_unfinished_requests():
            if should_stop is not None and should_stop():
                engine.abort_request(ids)
                reasons.update({rid: "cancelled" for rid in ids if reasons[rid] == "max_tokens"})
                break
            for output in engine.step():
                if output.request_id not in texts:
                    continue
                text = output.outputs[0].text
                piece = text[len(texts[output.request_id]):]
                texts[output.request_id] = text
                if piece and not first:
                    first.append(time.perf_counter())
                if piece and on_token is not None:
                    on_token(ids.index(output.request_id), piece)
                completion = output.outputs[0]
                if completion.token_ids and completion.cumulative_logprob is not None:
                    confidence[output.request_id] = math.exp(completion.cumulative_logprob / len(completion.token_ids))
                if output.finished:
                    reason = completion.finish_reason
                    reasons[output.request_id] = {"stop": "eos", "length": "max_tokens"}.get(reason, reason or "eos")
        t_gen = time.perf_counter()
        timing = {"generate_s": t_gen - t0, **({"first_token_s": first[0] - t0} if first else {})}
        return [vllm_answer(texts[rid], task, asked, reasons[rid], confidence[rid], timing) for rid in ids]


def vllm_answer(text: str, task: str, asked: str, stopped_reason: str, confidence: float,
                timing: dict | None = None) -> Answer:
    """One vLLM completion as the engine's Answer: boxes parsed from GeoChat's box text.

    vLLM reports the answer's log-probability, not per token span: each box gets the answer's
    geometric-mean token probability (``confidence``)."""
    text = text.strip()
    boxes = parse_boxes(text) if task == "ground" or "{<" in text else []
    return Answer(text=text, boxes=boxes, box_scores=[confidence] * len(boxes), retrieved=[],
                  stopped_reason=stopped_reason, prompt_question=asked, text_score=confidence,
                  timing=dict(timing or {}))
