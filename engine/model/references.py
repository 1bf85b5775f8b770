"""Grounding by reference: answers point at object tokens, the engine writes their boxes.

Why: a language model of a few million parameters writes coordinates badly (measured: its box
centres correlated 0.03 / 0.17 with the truth), but choosing among the detector's boxes is a
classification it learns quickly.  So a grounding answer is the phrase followed by reference
tokens, ``airplane <obj3><obj7>``, where ``<obj k>`` is the k-th object token (detection k, best
first).  :func:`resolve_references` turns each reference back into the GeoChat box text
``{<x1><y1><x2><y2>|0}`` of that detection, so the protocol, the box parser and the
georeferencing downstream are unchanged, and the box's score is the detection's score.

Training writes the reference of each annotated box as a *slot* token (``<obj i>`` = the i-th
annotated box of the sample, see :func:`encode_reference_answer`); once the detections of the
batch are known, :func:`assign_references` rewrites every slot to the detection that matches its
box best (IoU), and ignores it in the loss when no detection matches.  A slot may also name the
*count token* of a class (:func:`count_slot_box`): a counting answer ``<obj K+c> 3`` points at the
object-level token that carries class c's count (K detections come first).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from engine.grounding import GRID_MAX, GridBox, format_box
from .detector import Detections, box_iou_matrix

__all__ = ["REFERENCE_RE", "reference_token", "reference_offsets", "assign_references", "resolve_references",
           "ResolvedBox",
           "MIN_MATCH_IOU", "constrain_references", "MIN_REFERENCE_SCORE", "phrase_class",
           "count_slot_box", "object_class_names"]

REFERENCE_RE = re.compile(r"<obj(\d+)>")
_JOINED_REFERENCE_RE = re.compile(r"(\s+and\s+)?<obj(\d+)>")
MIN_MATCH_IOU = 0.3
"""A slot whose best detection overlaps its box less than this is not taught (the detector
missed the object; teaching an arbitrary pointer would only add noise)."""


MIN_REFERENCE_SCORE = 0.2
"""Object tokens of detections scoring below this are filler (an image has fewer objects than
tokens): an answer may not point at them."""


def reference_token(k: int) -> str:
    return f"<obj{k}>"


def reference_offsets(ids: torch.Tensor, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(``ids - start``, whether that offset names one of ``count`` tokens): the one reading of
    "is this id a reference token, and to which item", shared by training, feedback and decoding
    so that their ranges cannot drift apart."""
    rel = ids - start
    return rel, (rel >= 0) & (rel < count)


def count_slot_box(class_index: int) -> list[float]:
    """The slot box that stands for class ``class_index``'s count token (a marker below the
    padding value -1, never a real box): :func:`assign_references` maps it to ``<obj K+c>``."""
    return [-2.0 - class_index] * 4


def assign_references(input_ids: torch.Tensor, labels: torch.Tensor | None, slot_boxes: torch.Tensor,
                      detections: Detections, object_token_start: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rewrite slot tokens to detection references.

    input_ids, labels (B, T); slot_boxes (B, S, 4) normalised boxes of the annotated slots (rows
    padded with -1); detections of the same images.  Slot ``i`` is token id
    ``object_token_start + i``; it becomes ``object_token_start + k`` with k the best-IoU detection.
    """
    s = slot_boxes.shape[1]
    if s == 0:
        return input_ids, labels
    iou = box_iou_matrix(slot_boxes.to(detections.boxes.dtype), detections.boxes)   # (B, S, K)
    best_iou, best = iou.max(dim=-1)                                              # (B, S)
    valid = (slot_boxes[..., 0] >= 0) & (best_iou >= MIN_MATCH_IOU)
    is_count = slot_boxes[..., 0] < -1.5                                          # count-token slots
    count_class = (-slot_boxes[..., 0] - 2).round().long().clamp(min=0)
    best = torch.where(is_count.to(best.device), detections.boxes.shape[1] + count_class.to(best.device), best)
    valid = valid | is_count
    slot, is_slot = reference_offsets(input_ids, object_token_start, s)           # (B, T)
    idx = slot.clamp(0, s - 1)
    mapped = best.gather(1, idx) + object_token_start
    new_ids = torch.where(is_slot, mapped, input_ids)
    new_labels = labels
    if labels is not None:
        lslot, l_is_slot = reference_offsets(labels, object_token_start, s)
        lidx = lslot.clamp(0, s - 1)
        lmapped = torch.where(valid.gather(1, lidx), best.gather(1, lidx) + object_token_start,
                              torch.full_like(labels, -100))
        new_labels = torch.where(l_is_slot, lmapped, labels)
    return new_ids, new_labels


@dataclass
class ResolvedBox:
    box: GridBox
    score: float
    cls: int | None = None         # the detection's class index, when known


def resolve_references(text: str, boxes: list[list[float]], scores: list[float],
                       classes: list[int] | None = None) -> tuple[str, list[ResolvedBox]]:
    """Replace each ``<obj k>`` in ``text`` by detection k's box text (``boxes[k]`` normalised
    x1, y1, x2, y2; ``scores[k]`` its score, ``classes[k]`` its class); a reference past the
    detections (a count token's, ``<obj K+c>``) is dropped with the "and" joining it to the one
    before ("<obj17> and <obj19> yes" -> " yes").  Returns the rewritten text and the referenced
    boxes in order of appearance."""
    found: list[ResolvedBox] = []

    def repl(m: re.Match) -> str:
        k = int(m.group(2))
        if k >= len(boxes):
            return ""
        x1, y1, x2, y2 = (float(v) * GRID_MAX for v in boxes[k])
        box = GridBox(x1, y1, x2, y2, 0.0)
        found.append(ResolvedBox(box, float(scores[k]), None if classes is None else int(classes[k])))
        return (m.group(1) or "") + format_box(box)

    return _JOINED_REFERENCE_RE.sub(repl, text), found


def object_class_names(config) -> tuple[str, ...]:
    """The detector's class names of a model config (empty for a model without a detector):
    what reference classes are checked against and evidence boxes are labelled with."""
    return tuple(getattr(config, "object_classes", ()) or ())


def phrase_class(text: str, class_names: tuple[str, ...]) -> int | None:
    """The class named last in ``text`` after its last reference ("..., airplane " -> airplane):
    the class the next reference of a grounded phrase must have."""
    tail = REFERENCE_RE.split(text)[-1].lower() if text else ""
    best, at = None, -1
    for i, name in enumerate(class_names):
        for m in re.finditer(rf"\b{re.escape(name)}s?\b", tail):
            if m.start() > at or (m.start() == at and best is not None and len(name) > len(class_names[best])):
                best, at = i, m.start()
    return best


def constrain_references(logits: torch.Tensor, generated: torch.Tensor, scores: torch.Tensor,
                         classes: torch.Tensor, object_token_start: int,
                         preferred: list[list[torch.Tensor]] | None = None,
                         must_list: list[bool] | None = None) -> torch.Tensor:
    """Constrained decoding of references: logits (B, V) for the next token, given the tokens
    generated so far (B, t) and the referable items' scores and classes (B, R).

    A reference may not point at a filler detection (score below :data:`MIN_REFERENCE_SCORE`)
    nor at one the answer already referred to (one box per object), and a reference that
    follows another one stays in its class (``airplane <obj2><obj5>`` lists airplanes).  A
    reference that opens a group takes the first of ``preferred[row]`` (masks (R,), best first:
    the detections fitting the phrase's description, then its class; see
    engine.model.referring) that still leaves one to point at.  A row with ``must_list[row]``
    may write nothing but a further reference while one is allowed (a plural request listing
    the rest of its class).  The model's own preference decides everything else."""
    k = scores.shape[1]
    ref = logits[:, object_token_start:object_token_start + k]
    banned = scores.to(logits.device) < MIN_REFERENCE_SCORE                      # (B, K)
    follows = torch.zeros_like(banned[:, 0])
    if generated.shape[1]:
        rel, is_ref = reference_offsets(generated.to(logits.device), object_token_start, k)  # (B, t)
        used = torch.zeros_like(banned)
        used.scatter_(1, rel.clamp(0, k - 1), is_ref)
        banned = banned | used
        last = rel[:, -1]
        follows = is_ref[:, -1]
        last_class = classes.to(logits.device).gather(1, last.clamp(0, k - 1)[:, None])      # (B, 1)
        banned = banned | (follows[:, None] & (classes.to(logits.device) != last_class))
    for row, masks in enumerate(preferred or ()):
        if bool(follows[row]):
            continue
        for mask in masks:
            mask = mask.to(logits.device)
            if bool((mask & ~banned[row]).any()):
                banned[row] = banned[row] | ~mask
                break
    logits = logits.clone()
    logits[:, object_token_start:object_token_start + k] = ref.masked_fill(banned, float("-inf"))
    for row, go_on in enumerate(must_list or ()):
        if go_on and bool((~banned[row]).any()):
            logits[row, :object_token_start] = float("-inf")
            logits[row, object_token_start + k:] = float("-inf")
    return logits
