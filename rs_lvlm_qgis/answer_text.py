"""What an analyst reads of an answer: text without the model's box syntax.

The model writes its boxes as text (GeoChat's ``{<x1><y1><x2><y2>|θ}``, several as ``}{``).
Those characters are for the georeferencing code, not for people: in the answer view, a map
label or an exported ``answer`` field they read as noise and run across the map.  The engine's
``text`` is meant to be readable already and ``raw`` keeps the model's own output; this module
is the plugin's defence for an engine (or a stream of tokens) that still carries box syntax.
Pure functions, no Qt: tested without a dock.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any, Dict, Iterable, List, Mapping

# One box, braces and angle optional (the engine's parser accepts both too); a small model
# also writes broken boxes ("<47>|0", "{<3><9>}"), which are no text either.
_BOX = re.compile(r"\{?\s*(?:<\s*-?\d+(?:\.\d+)?\s*>\s*)+(?:\|\s*<?\s*-?\d+(?:\.\d+)?\s*>?)?\s*\}?")
# What a token stream ends with while a box is still being written: "{<29><1", "<29", "{".
_UNFINISHED = re.compile(r"(?:\{[^{}]*|(?:<\s*-?\d*\s*>?\s*)+(?:\|\s*<?\s*-?\d*\s*>?)?)$")
_TASK_TOKEN = re.compile(r"\[(?:grounding|refer|identify|caption|vqa|classify)\]\s*")
_SPACES = re.compile(r"[ \t]{2,}")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
_DOUBLED_PUNCT = re.compile(r"([,;])\s*(?=[,;.]|$)")


def has_box_syntax(text: str) -> bool:
    """True when ``text`` still holds at least one written box."""
    return bool(_BOX.search(text or ""))


def strip_boxes(text: str, streaming: bool = False) -> str:
    """``text`` without box syntax or task tokens, with the spacing tidied.

    ``streaming`` also drops an unfinished box at the end (a token stream stops mid-box).
    """
    text = _TASK_TOKEN.sub("", text or "")
    text = _BOX.sub(" ", text)
    if streaming:
        text = _UNFINISHED.sub("", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", _SPACES.sub(" ", text))
    text = _DOUBLED_PUNCT.sub("", text)
    return "\n".join(line.strip() for line in text.splitlines()).strip()


def plural(label: str, count: int) -> str:
    """``"1 airplane"``, ``"2 airplanes"``, ``"3 storage tanks"``, ``"2 boxes"``."""
    label = label.strip() or "object"
    if count == 1:
        return f"1 {label}"
    last = label.split()[-1]
    if last.endswith(("s", "x", "ch", "sh")):
        word = last + "es"
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        word = last[:-1] + "ies"
    else:
        word = last + "s"
    return f"{count} " + " ".join(label.split()[:-1] + [word])


def count_phrase(boxes: Iterable[Mapping[str, Any]]) -> str:
    """``"2 airplanes, 1 ship"`` for a list of boxes, labels in first-seen order."""
    counts = Counter(str(box.get("label") or "object").strip() for box in boxes)
    return ", ".join(plural(label, n) for label, n in counts.items())


def readable_answer(result: Mapping[str, Any]) -> str:
    """The sentence to show for an ask result.

    The engine's ``text`` when it is clean; when it still carries box syntax, for "Find objects"
    the count of the boxes (``"2 airplanes"``) if the rest is only their labels, else the text
    without the boxes.
    """
    text = str(result.get("text") or "")
    boxes: List[Mapping[str, Any]] = [b for b in (result.get("boxes") or []) if isinstance(b, dict)]
    if not has_box_syntax(text):
        return strip_boxes(text)
    stripped = strip_boxes(text)
    if result.get("task") not in (None, "ground") or not boxes:
        return stripped
    labels = {str(b.get("label") or "").strip().lower() for b in boxes}
    words = {part.strip().lower() for part in re.split(r"[,;\n]| and ", stripped) if part.strip()}
    return count_phrase(boxes) if words <= labels | {""} else stripped or count_phrase(boxes)


def raw_output(result: Mapping[str, Any]) -> str:
    """The model's own output: the engine's ``raw`` field, else ``text`` as the engine sent it."""
    return str(result.get("raw") or result.get("text") or "")


def box_rows(result: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """The result's boxes that can be drawn (have a ``wkt``), with label and score."""
    rows = []
    for box in result.get("boxes") or []:
        if isinstance(box, dict) and box.get("wkt"):
            score = box.get("score")
            rows.append({"label": str(box.get("label") or "object"),
                         "score": float(score) if isinstance(score, (int, float)) else None,
                         "wkt": str(box["wkt"])})
    return rows
