"""Grounding boxes written as text, in GeoChat's convention on a 0-100 grid.

Why text: the language model answers grounding questions by *writing* its boxes, so the box
format is part of the vocabulary the model is trained on and must be produced and read back
identically by the data generator, the tokenizer, the generator's post-processing and the
georeferencing code.  This module is the single place that defines it.

Format
------
One box::

    {<x1><y1><x2><y2>|θ}

* ``x1, y1, x2, y2`` are integers in ``0..100``: the left, top, right and bottom edges of the
  (unrotated) box as percentages of the image width (x, to the right) and height (y, downwards).
* ``θ`` is an integer angle in degrees in ``-90..90``: the rotation of the box about its centre,
  clockwise in image space (y down), i.e. the usual oriented-box convention of DOTA/GeoChat.
  ``|θ`` is optional (absent means 0); on parsing ``|<θ>`` (GeoChat's own spelling) is accepted
  too.  The formatter writes ``|θ`` without angle brackets.

Several boxes are concatenated: ``{...}{...}``.  A phrase may precede a group of boxes and is then
the label of every box in that group: ``"airplane {<10><20><30><40>|0}{<50><50><60><60>|0}, ship
{<1><2><3><4>|0}"``.

Parsing is tolerant because the input is model output: it never raises.  Missing braces are
accepted, coordinates are clamped to ``0..100`` and ordered (``x1 <= x2``, ``y1 <= y2``), angles
outside ``-90..90`` are folded back by the box's 180° symmetry, and pieces that are not four
numbers in angle brackets, or whose box has zero width or height after clamping, are skipped.

Pixel conversion
----------------
Grid values and pixel values both address *edges* in a continuous frame: grid 0 is the left (top)
edge of the first pixel column (row) and grid 100 the right (bottom) edge of the last, so
``x_px = x_grid / 100 * width`` exactly, with no rounding (:func:`grid_to_pixels`).  The reverse,
:func:`pixels_to_grid`, rounds to the nearest integer with halves rounded up (``floor(v + 0.5)``,
not Python's banker's rounding, so the result does not depend on parity) and clamps to
``0..100``; this is the only lossy step (at most half a grid cell, i.e. 0.5 % of the image).
The angle is the rotation in *pixel* space and is carried through unchanged; for the square chips
the model sees, pixel space and grid space are the same shape.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = [
    "GridBox",
    "format_box",
    "format_boxes",
    "format_grounded",
    "parse_boxes",
    "grid_to_pixels",
    "pixels_to_grid",
    "GRID_MAX",
    "box_corners",
    "PLACE_WORDS",
    "position_word",
]

GRID_MAX = 100
"""The grid runs from 0 to ``GRID_MAX`` inclusive on both axes."""


@dataclass
class GridBox:
    """A box on the 0-100 grid (edges; x right, y down), rotated by ``angle`` degrees clockwise
    about its centre, with an optional ``label`` (the phrase that introduced it)."""

    x1: float
    y1: float
    x2: float
    y2: float
    angle: float = 0.0
    label: str = ""


def _grid_int(v: float) -> int:
    """Round half up and clamp to the grid, so that formatted text is always valid."""
    if not math.isfinite(v):
        v = GRID_MAX if v > 0 else 0
    return int(min(GRID_MAX, max(0, math.floor(v + 0.5))))


def _angle_int(a: float) -> int:
    """Fold an angle into -90..90 (a box is symmetric under 180° rotation) and round it."""
    if not math.isfinite(a):
        return 0
    r = math.floor(a + 0.5)
    if -90 <= r <= 90:
        return int(r)
    return int(((r + 90) % 180) - 90)


def format_box(box: GridBox, with_angle: bool = True) -> str:
    """Write one box as ``{<x1><y1><x2><y2>|θ}`` (or without ``|θ`` when ``with_angle`` is False).

    Coordinates are rounded, clamped and ordered so that whatever the caller holds, the text is
    something :func:`parse_boxes` reads back to the same integers.
    """
    x1, x2 = sorted((_grid_int(box.x1), _grid_int(box.x2)))
    y1, y2 = sorted((_grid_int(box.y1), _grid_int(box.y2)))
    body = f"<{x1}><{y1}><{x2}><{y2}>"
    if with_angle:
        body += f"|{_angle_int(box.angle)}"
    return "{" + body + "}"


def format_boxes(boxes: Iterable[GridBox], with_angle: bool = True) -> str:
    """Write several boxes back to back (``{...}{...}``), labels ignored."""
    return "".join(format_box(b, with_angle) for b in boxes)


def format_grounded(label_boxes: Sequence[tuple[str, Sequence[GridBox]]],
                    with_angle: bool = True) -> str:
    """Write labelled groups: ``"airplane {..}{..}, ship {..}"``.

    A group with an empty label is written as its boxes only; a group with no boxes is skipped
    (there is nothing to ground).
    """
    parts = []
    for label, boxes in label_boxes:
        if not boxes:
            continue
        text = format_boxes(boxes, with_angle)
        label = label.strip()
        parts.append(f"{label} {text}" if label else text)
    return ", ".join(parts)


_NUM = r"([-+]?\d{1,12}(?:\.\d{0,12})?)"
_BOX_RE = re.compile(
    r"\{?\s*"
    + r"\s*".join([rf"<\s*{_NUM}\s*>"] * 4)
    + rf"(?:\s*\|\s*<?\s*{_NUM}\s*>?)?"
    + r"\s*\}?"
)
# Sentence or clause breaks: the label is the last clause before its boxes.
_CLAUSE_SPLIT = re.compile(r"[.;:\n!?]")
_LABEL_STRIP = " \t\r\n,;:.!?{}<>|\"'()[]-"


def _clean_label(text: str) -> str:
    """The phrase that introduces a group: the text after the last clause break, trimmed."""
    text = _CLAUSE_SPLIT.split(text)[-1]
    text = text.strip(_LABEL_STRIP)
    for lead in ("and ", "& "):
        if text.lower().startswith(lead):
            text = text[len(lead):]
    return " ".join(text.split())


def _to_float(s: str | None, default: float = 0.0) -> float:
    if s is None:
        return default
    try:
        v = float(s)
    except ValueError:
        return default
    return v


def parse_boxes(text: str) -> list[GridBox]:
    """Read every box in ``text`` (model output), never raising.

    Each box gets the label of the phrase written before its group; boxes written back to back
    (``}{``, or separated only by spaces) share the group's label.  Coordinates are clamped to
    0..100 and ordered; boxes of zero width or height after that are dropped; the angle is folded
    into -90..90.  Anything that does not match the box shape is ignored.
    """
    if not isinstance(text, str) or not text:
        return []
    out: list[GridBox] = []
    label = ""
    prev_end = 0
    for m in _BOX_RE.finditer(text):
        between = text[prev_end:m.start()]
        prev_end = m.end()
        if between.strip(" \t\r\n{}"):
            label = _clean_label(between)
        vals = [_to_float(g) for g in m.groups()[:4]]
        vals = [min(float(GRID_MAX), max(0.0, v)) for v in vals]
        x1, x2 = sorted((vals[0], vals[2]))
        y1, y2 = sorted((vals[1], vals[3]))
        if x2 <= x1 or y2 <= y1:
            continue
        angle = float(_angle_int(_to_float(m.group(5), 0.0)))
        out.append(GridBox(x1, y1, x2, y2, angle, label))
    return out


def grid_to_pixels(box: GridBox, width: int | float, height: int | float
                   ) -> tuple[float, float, float, float, float]:
    """Grid box to pixel edges ``(x1, y1, x2, y2, angle)`` of a ``width`` x ``height`` image.

    Exact (no rounding): grid 0 is the image's left/top edge, grid 100 its right/bottom edge.
    """
    w, h = float(width), float(height)
    return (box.x1 * w / GRID_MAX, box.y1 * h / GRID_MAX, box.x2 * w / GRID_MAX,
            box.y2 * h / GRID_MAX, float(box.angle))


def pixels_to_grid(x1: float, y1: float, x2: float, y2: float, angle: float,
                   width: int | float, height: int | float, label: str = "") -> GridBox:
    """Pixel edges of a ``width`` x ``height`` image to a grid box with integer coordinates.

    Rounds half up and clamps to 0..100 and orders the edges, so the result formats losslessly;
    the angle is rounded and folded into -90..90.
    """
    if width <= 0 or height <= 0:
        raise ValueError("image width and height must be positive")
    gx1, gx2 = sorted((_grid_int(x1 / width * GRID_MAX), _grid_int(x2 / width * GRID_MAX)))
    gy1, gy2 = sorted((_grid_int(y1 / height * GRID_MAX), _grid_int(y2 / height * GRID_MAX)))
    return GridBox(float(gx1), float(gy1), float(gx2), float(gy2), float(_angle_int(angle)), label)


def box_corners(x1: float, y1: float, x2: float, y2: float, angle: float = 0.0
                ) -> list[tuple[float, float]]:
    """The 4 corners of a box rotated ``angle`` degrees clockwise (image space) about its centre.

    Returned top-left, top-right, bottom-right, bottom-left of the unrotated box.  In image space
    (y down) the rotation matrix ``[[cos, -sin], [sin, cos]]`` turns x towards +y, which on
    screen is clockwise.  The one home of this maths: georeferencing and the metrics use it.
    """
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    hw, hh = abs(x2 - x1) / 2.0, abs(y2 - y1) / 2.0
    t = math.radians(angle or 0.0)
    c, s = math.cos(t), math.sin(t)
    return [(cx + dx * c - dy * s, cy + dx * s + dy * c) for dx, dy in ((-hw, -hh), (hw, -hh), (hw, hh), (-hw, hh))]


PLACE_WORDS: tuple[str, ...] = ("top", "bottom", "left", "right", "centre")
"""Where a point lies in an image: the answers to "Where is the ...?"."""


def position_word(cx: float, cy: float, size: float, decided: bool = False) -> str | None:
    """The place word of a point (``cx, cy`` in an image ``size`` wide and high, y down).

    One definition for the questions the data asks and the answers the decoder reads off a box:
    within 0.14 of the centre it is "centre", else the side it is farthest towards.  Near a
    boundary between two words (the centre ring, the diagonals) it is None, not a fair question,
    unless ``decided``, when the nearest word is given (an answer must say something)."""
    dx, dy = cx / size - 0.5, cy / size - 0.5
    m = max(abs(dx), abs(dy))
    if m < 0.14:
        return "centre"
    if not decided and (m < 0.2 or abs(abs(dx) - abs(dy)) < 0.07):
        return None
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _plural(noun: str) -> str:
    """English plural of the last word of a label (enough for object class names)."""
    words = noun.split()
    if not words:
        return noun
    last = words[-1]
    if last.endswith(("s", "x", "ch", "sh")):
        last += "es"
    elif last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return " ".join(words[:-1] + [last])


def readable_text(raw: str, task: str = "ground") -> str:
    """What a person reads for a model answer: box syntax replaced by counts or taken out.

    For ``ground`` an answer made of labelled box groups, ``"airplane {<29><18><45><31>|0}{<50>
    <50><60><60>|0}"``, reads ``"2 airplanes"``.  For every other task (and a ground answer with
    prose around its boxes) the box syntax is taken out and the sentence kept: a caption's
    grounded phrases are prose, not labels to count.  A ``vqa`` answer that shows its evidence
    first, ``"{<40><12><52><20>|0} red"``, reads ``"red"``.  The boxes themselves travel separately
    (the result's ``boxes``), and the raw text in its own field.
    """
    if not isinstance(raw, str) or not raw:
        return ""
    boxes = parse_boxes(raw)
    if not boxes:
        return raw.strip()
    if task == "vqa":
        # An answer that points at its evidence first ("{box} red", "{box} and {box} left"):
        # the answer is what follows the last box; the boxes go on the map.
        tail = " ".join(_BOX_RE.split(raw)[-1].split()).strip(" ,;:")
        if tail:
            return tail
    stripped = " ".join(_BOX_RE.sub(" ", raw).split())
    if task == "ground":
        counts: dict[str, int] = {}
        remainder = stripped
        for box in boxes:
            counts[box.label or "object"] = counts.get(box.label or "object", 0) + 1
        for label in counts:
            remainder = remainder.replace(label, " ")
        if not remainder.strip(" ,;.:-"):
            return ", ".join(f"{n} {label if n == 1 else _plural(label)}" for label, n in counts.items())
    return stripped.replace(" ,", ",").replace(" .", ".").strip(" ,;")
