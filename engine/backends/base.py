"""What every model backend offers the engine: the ``Pipeline`` interface and its ``Answer``.

Why here and not in a backend: the service, the scan runner, the evaluator and the benchmarks
talk to any loaded model through this interface only, so the embedded RS-LVLM and a
LLaVA-family folder are interchangeable behind it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from engine.errors import BAD_CHECKPOINT, NO_MODEL, EngineError
from engine.grounding import GridBox

__all__ = ["Answer", "Pipeline", "TokenCallback", "StopCheck", "checkpoint_errors"]

TokenCallback = Callable[[int, str], None]
"""``on_token(row, text_piece)``: a piece of a row's answer, streamed as it is generated."""
StopCheck = Callable[[], bool]
"""``should_stop()``: polled between decode steps; true cancels every unfinished row."""


@dataclass
class Answer:
    """One image's answer: the model's text, its boxes with scores, what it retrieved."""

    text: str                      # the raw model output (box syntax included)
    boxes: list[GridBox]
    box_scores: list[float]
    retrieved: list[dict]
    stopped_reason: str
    prompt_question: str
    timing: dict = field(default_factory=dict)
    text_score: float | None = None  # geometric-mean probability of the answer's tokens (a class's confidence)


@runtime_checkable
class Pipeline(Protocol):
    """A loaded model that answers one task/question for a batch of image chips."""

    name: str
    device: str

    @property
    def image_size(self) -> int: ...

    def info(self) -> dict: ...

    def answer(self, images: list[np.ndarray], task: str, question: str | None, *, max_new_tokens: int = 64,
               on_token: TokenCallback | None = None, should_stop: StopCheck | None = None,
               do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
               history: list[dict] | None = None) -> list[Answer]: ...


@contextmanager
def checkpoint_errors() -> Iterator[None]:
    """Turn the model package's :class:`CheckpointError` into the engine's coded error."""
    from engine.model.errors import CheckpointError

    try:
        yield
    except CheckpointError as exc:
        raise EngineError(NO_MODEL if exc.missing else BAD_CHECKPOINT, exc.message) from None
