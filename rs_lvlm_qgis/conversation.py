"""The answers of this session and the conversation on the current region.

GeoChat-style follow-ups ("and how many are white?" after "how many ships are there?") need the
earlier turns on *the same region*: a question about another region, raster or a fresh start
("New conversation") must not drag old answers into the prompt.  A turn's region key is built
from the request itself (raster file, region and its CRS), so "the same region" means exactly
what the engine was sent.  No Qt here beyond plain data: tested without a dock.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from . import answer_text, protocol

_REGION_KEYS = ("raster", "bbox", "bbox_crs", "region_wkt", "region_crs")


def region_key(params: Mapping[str, Any]) -> str:
    """Identity of the asked region: the raster and the region exactly as sent."""
    return json.dumps({k: params.get(k) for k in _REGION_KEYS if k in params}, sort_keys=True)


@dataclass
class Turn:
    """One answered question: what was asked, what came back, where."""

    key: str
    task: str
    question: str
    answer: str
    raw: str
    result: Dict[str, Any] = field(default_factory=dict)
    boxes: List[Dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_result(cls, params: Mapping[str, Any], result: Dict[str, Any]) -> "Turn":
        """A turn from the ask params and the engine's result (the question falls back to the
        one the engine used, so a "Describe" without a typed question still reads sensibly)."""
        question = str(params.get("question") or result.get("question") or "").strip()
        return cls(key=region_key(params), task=str(params.get("task") or result.get("task") or ""),
                   question=question, answer=answer_text.readable_answer(result),
                   raw=answer_text.raw_output(result), result=result,
                   boxes=answer_text.box_rows(result))

    def title(self) -> str:
        """One line for the history list: task, question and the start of the answer."""
        asked = self.question or protocol.task_label(self.task)
        answer = self.answer if len(self.answer) <= 60 else self.answer[:59] + "…"
        return f"{protocol.task_label(self.task)} · {asked} → {answer}"


class Conversation:
    """All turns of the session, with a marker where the current conversation starts."""

    def __init__(self, max_turns: int = 200) -> None:
        self.turns: List[Turn] = []
        self.max_turns = max_turns
        self._start = 0

    def add(self, turn: Turn) -> None:
        """Record an answered turn (the oldest are forgotten beyond ``max_turns``)."""
        self.turns.append(turn)
        overflow = len(self.turns) - self.max_turns
        if overflow > 0:
            del self.turns[:overflow]
            self._start = max(0, self._start - overflow)

    def reset(self) -> None:
        """Start a new conversation: later questions are sent without the earlier turns."""
        self._start = len(self.turns)

    def current(self, key: Optional[str] = None) -> List[Turn]:
        """The turns of the current conversation on region ``key`` (all regions if ``None``)."""
        return [t for t in self.turns[self._start:] if key is None or t.key == key]

    def history(self, key: str) -> List[Dict[str, str]]:
        """The ``history`` param for a follow-up on region ``key``: the earlier *questions*
        (Ask turns) and the model's own answers (``raw``, boxes included, as it wrote them),
        bounded by the protocol module.  Captions, groundings and classifications stay out:
        the embedded model learnt follow-ups of questions, and a caption written before a
        question made it answer "How many buildings are there?" with "3-up" instead of "3"."""
        return protocol.history_param(
            [{"question": t.question, "answer": t.raw or t.answer} for t in self.current(key) if t.task == "vqa"])
