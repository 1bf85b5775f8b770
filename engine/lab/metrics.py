"""Evaluation metrics: VQA and classification accuracy, grounding Acc@0.5 / mIoU, BLEU-4 / CIDEr.

Why these: they are the numbers RS-LVLM papers report (GeoChat, LHRS-Bot, VHM, EarthDial), so the
embedded model's results read the same way.  Answers are compared after a light normalisation
(case, punctuation, articles, number words, British/American spellings) because the model writes
free text; boxes are compared as rotated polygons because GeoChat boxes carry an angle; captions
are scored with pycocoevalcap's own BLEU and CIDEr scorers, with a simple tokeniser standing in for
the Java-based PTBTokenizer so no JVM is needed.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Sequence

from engine.grounding import GridBox, box_corners, parse_boxes

__all__ = [
    "normalize_answer", "vqa_accuracy", "classification_accuracy", "box_polygon", "box_iou",
    "match_boxes", "grounding_scores", "caption_tokens", "caption_scores",
]

_NUMBER_WORDS = {
    "zero": "0", "none": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_SPELLING = {"color": "colour", "gray": "grey", "center": "centre", "harbour": "harbor",
             "colored": "coloured", "builtup": "built-up"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[^\w\s\-]")


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and articles removed, number words as digits, one spelling."""
    if not isinstance(text, str):
        return ""
    t = _PUNCT.sub(" ", text.lower().replace("built up", "built-up"))
    words = [w.strip("-") for w in t.split()]
    words = [_SPELLING.get(w, w) for w in words if w and w not in _ARTICLES]
    words = [_NUMBER_WORDS.get(w, w) for w in words]
    return " ".join(words)


def vqa_accuracy(preds: Sequence[str], refs: Sequence[str], qtypes: Sequence[str]) -> dict:
    """Normalised exact-match accuracy: ``{"overall", "per_qtype": {qtype: acc}, "n",
    "n_per_qtype"}``."""
    if not (len(preds) == len(refs) == len(qtypes)):
        raise ValueError("preds, refs and qtypes must have the same length")
    hits: dict[str, int] = defaultdict(int)
    tot: dict[str, int] = defaultdict(int)
    for p, r, q in zip(preds, refs, qtypes):
        tot[q] += 1
        hits[q] += int(normalize_answer(p) == normalize_answer(r))
    n = len(preds)
    return {
        "overall": (sum(hits.values()) / n) if n else 0.0,
        "per_qtype": {q: hits[q] / tot[q] for q in sorted(tot)},
        "n": n,
        "n_per_qtype": {q: tot[q] for q in sorted(tot)},
    }


def classification_accuracy(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Fraction of predicted class names equal to the reference after normalisation."""
    if len(preds) != len(refs):
        raise ValueError("preds and refs must have the same length")
    if not refs:
        return 0.0
    return sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(preds, refs)) / len(refs)


def box_polygon(b: GridBox):
    """The box as a shapely polygon (the GeoChat convention of ``engine.grounding``)."""
    from shapely.geometry import Polygon

    return Polygon(box_corners(b.x1, b.y1, b.x2, b.y2, b.angle))


def box_iou(a: GridBox, b: GridBox) -> float:
    """Intersection over union of two (possibly rotated) boxes; 0 for degenerate boxes."""
    if a.angle == b.angle == 0:  # fast exact path for axis-aligned boxes
        ix = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
        iy = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
        inter = ix * iy
        union = (a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - inter
        return inter / union if union > 0 else 0.0
    pa, pb = box_polygon(a), box_polygon(b)
    if pa.area <= 0 or pb.area <= 0:
        return 0.0
    inter = pa.intersection(pb).area
    union = pa.area + pb.area - inter
    return float(inter / union) if union > 0 else 0.0


def match_boxes(pred: Sequence[GridBox], ref: Sequence[GridBox]) -> list[float]:
    """Greedy one-to-one matching by IoU; returns the matched IoU of every reference box
    (0 when it got no prediction)."""
    pairs = sorted(((box_iou(p, r), i, j) for i, p in enumerate(pred) for j, r in enumerate(ref)),
                   reverse=True)
    used_p: set[int] = set()
    out = [0.0] * len(ref)
    done: set[int] = set()
    for iou, i, j in pairs:
        if iou <= 0 or i in used_p or j in done:
            continue
        used_p.add(i)
        done.add(j)
        out[j] = iou
    return out


def match_geometries(pred: Sequence, truth: Sequence, threshold: float = 0.5) -> int:
    """Greedy one-to-one matches with IoU >= ``threshold`` between shapely geometries (map
    coordinates): the pairs in order of IoU, each geometry used once.  The mosaic evaluation,
    the demo and the scan benchmark all count hits this way."""
    pairs = sorted(((p.intersection(t).area / max(p.union(t).area, 1e-12), i, j)
                    for i, p in enumerate(pred) for j, t in enumerate(truth)), reverse=True)
    used_p: set[int] = set()
    used_t: set[int] = set()
    for iou, i, j in pairs:
        if iou < threshold:
            break
        if i in used_p or j in used_t:
            continue
        used_p.add(i)
        used_t.add(j)
    return len(used_t)


def grounding_scores(pred_texts: Sequence[str], ref_boxes: Sequence[Sequence[GridBox]]) -> dict:
    """``{"acc@0.5", "acc@0.7", "mean_iou", "n"}`` over all reference boxes.

    Each prediction text is parsed with :func:`engine.grounding.parse_boxes`; predicted and
    reference boxes of a sample are matched greedily by IoU.  Acc@0.5 is the fraction of
    reference boxes matched with IoU >= 0.5; mean IoU averages the matched IoU (0 if unmatched).
    Extra predicted boxes are not rewarded: they can only take a match from a better one.
    """
    if len(pred_texts) != len(ref_boxes):
        raise ValueError("pred_texts and ref_boxes must have the same length")
    ious: list[float] = []
    for text, refs in zip(pred_texts, ref_boxes):
        if refs:
            ious.extend(match_boxes(parse_boxes(text), list(refs)))
    n = len(ious)
    return {
        "acc@0.5": (sum(i >= 0.5 for i in ious) / n) if n else 0.0,
        "acc@0.7": (sum(i >= 0.7 for i in ious) / n) if n else 0.0,
        "mean_iou": (sum(ious) / n) if n else 0.0,
        "n": n,
    }


def caption_tokens(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces: a JVM-free PTBTokenizer stand-in."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", str(text).lower()).split())


def caption_scores(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> dict:
    """``{"bleu4", "cider"}`` from pycocoevalcap's Bleu(4) and Cider scorers.

    CIDEr's document frequencies come from the reference set itself, so it is only meaningful
    over several images (with one image every n-gram has zero weight).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(preds) != len(refs):
        raise ValueError("preds and refs must have the same length")
    if not preds:
        return {"bleu4": 0.0, "cider": 0.0}
    gts = {i: [caption_tokens(r) or "empty" for r in rs] or ["empty"] for i, rs in enumerate(refs)}
    res = {i: [caption_tokens(p) or "empty"] for i, p in enumerate(preds)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}
