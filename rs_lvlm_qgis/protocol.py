"""The plugin side of the engine protocol: the task table and the ``ask`` request.

Why a module of its own: the dock, the Processing algorithms and the tests all build the same
request, and the words an analyst reads ("Describe", "Find objects") must never leak into the
protocol, whose task ids (``caption``, ``vqa``, ``ground``, ``classify``) are fixed by the
contract.  Everything here is plain data in, plain dict out, so it is tested without a dock.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .region import Region, crs_to_engine

# Earlier turns sent with a follow-up question; the engine bounds ``history`` the same way.
MAX_HISTORY_TURNS = 6
# A turn's text is cut to this many characters: the prompt only needs the gist of old answers.
MAX_TURN_CHARS = 1000


@dataclass(frozen=True)
class Task:
    """One row of the task table: the protocol id, what the analyst reads, and the hint."""

    id: str
    label: str
    placeholder: str
    needs_question: bool = False


TASKS: tuple = (
    Task("caption", "Describe", "Optional: what the description should focus on"),
    Task("vqa", "Ask", "e.g. How many storage tanks are there?", needs_question=True),
    Task("ground", "Find objects", "e.g. ships, or: the largest ship"),
    Task("classify", "Classify scene", "Optional"),
)
TASK_IDS = tuple(task.id for task in TASKS)


def task(task_id: str) -> Task:
    """The table row of a protocol task id (raises ``KeyError`` for an unknown id)."""
    for row in TASKS:
        if row.id == task_id:
            return row
    raise KeyError(task_id)


def task_label(task_id: str) -> str:
    """The analyst's name of a task id; an unknown id is shown as is rather than hidden."""
    try:
        return task(task_id).label
    except KeyError:
        return task_id


def history_param(turns: Sequence[Mapping[str, Any]]) -> List[Dict[str, str]]:
    """The ``history`` param: the last :data:`MAX_HISTORY_TURNS` turns as
    ``{"question", "answer"}`` strings, oldest first, each cut to :data:`MAX_TURN_CHARS`."""
    cleaned = []
    for turn in turns:
        question = str(turn.get("question") or "").strip()
        answer = str(turn.get("answer") or "").strip()
        if question or answer:
            cleaned.append({"question": question[:MAX_TURN_CHARS],
                            "answer": answer[:MAX_TURN_CHARS]})
    return cleaned[-MAX_HISTORY_TURNS:]


def ask_params(raster_file: str, region: Region, task_id: str, question: str,
               max_tokens: int, model_dir: str = "", device: str = "auto",
               precision: str = "auto",
               history: Optional[Sequence[Mapping[str, Any]]] = None) -> Dict[str, Any]:
    """The ``ask`` request params for the engine (names mirror the CLI flags).

    Rectangles travel as ``bbox`` + ``bbox_crs``, other shapes as ``region_wkt`` +
    ``region_crs``; ``history`` is only sent when there are earlier turns on the region.
    """
    params: Dict[str, Any] = {"raster": raster_file, "task": task_id, "max_tokens": int(max_tokens)}
    if question.strip():
        params["question"] = question.strip()
    crs = crs_to_engine(region.crs)
    if region.is_rectangle():
        box = region.geometry.boundingBox()
        params["bbox"] = [box.xMinimum(), box.yMinimum(), box.xMaximum(), box.yMaximum()]
        params["bbox_crs"] = crs
    else:
        params["region_wkt"] = region.geometry.asWkt()
        params["region_crs"] = crs
    if model_dir:
        params["model"] = model_dir
    if device and device != "auto":
        params["device"] = device
    if precision and precision != "auto":
        params["precision"] = precision
    turns = history_param(history or [])
    if turns:
        params["history"] = turns
    return params
