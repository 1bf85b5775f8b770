"""Object-centric multi-level vision: detections as object tokens, pooled pyramid for the rest.

Why: the seed's object level must describe *objects*.  Here its tokens are the top-K detections
of :class:`engine.model.detector.CenterNetDetector`, best first, each carrying

* the pyramid feature at its peak (stride 4 and stride 8),
* its class, colour and size evidence (the detector's probabilities) and its score,
* an explicit embedding of its box coordinates (Fourier features of x1, y1, x2, y2, centre),

so counting is "how many tokens of this class score high", colour is read off the token, and
position questions read the coordinates instead of guessing them from a patch index.  With
``class_count_tokens`` the object level also holds one *count token* per class (its class
embedding plus the embedding of how many of its detections score at least ``count_min_score``,
capped at 9): measured on the shipped detector, that count is right for 0.86 of the classes
present in a scene while the language model, left to count tokens itself, answered 0.56 of the
counting questions.  Counting and comparison become a look-up by class.  The
region level is the stride-8 / stride-16 pyramid average-pooled to a grid, the scene level its
global mean plus a coarse grid, both as before: three levels from one backbone.

Grounding refers to object tokens: token ``k`` is tagged with the embedding of the reference
token ``<obj k>`` (by :class:`RsLvlmForConditionalGeneration`), and an answer that writes
``<obj k>`` is resolved to detection ``k``'s box by :mod:`engine.model.references`.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import RsLvlmConfig
from .detector import CenterNetDetector, Detections, DetectorOutput, decode_detections
from .vision import MultiLevelFeatures

__all__ = ["ObjectCentricVisionEncoder", "ObjectCentricOutput", "box_features", "fourier_features", "class_counts",
           "MAX_COUNT", "BOX_FEATURES", "FOURIER_FEATURES"]

_FREQS = 6
FOURIER_FEATURES = 2 * _FREQS + 1
"""Features per coordinate of :func:`fourier_features`."""
BOX_FEATURES = 6 * FOURIER_FEATURES
"""Width of :func:`box_features`."""
MAX_COUNT = 9
"""Counts are capped here, as the counting answers are ("9" means nine or more)."""


class ObjectCentricOutput(NamedTuple):
    levels: MultiLevelFeatures
    detections: Detections
    raw: DetectorOutput


def fourier_features(coords: torch.Tensor) -> torch.Tensor:
    """(..., C) coordinates in about [-1, 1] -> (..., C * (2 * _FREQS + 1)): each coordinate
    with the sines and cosines of _FREQS octaves, smooth in position."""
    freqs = (2.0 ** torch.arange(_FREQS, device=coords.device, dtype=coords.dtype)) * math.pi
    ang = coords[..., None] * freqs                                                # (..., C, F)
    return torch.cat([coords[..., None], ang.sin(), ang.cos()], dim=-1).flatten(-2)


def box_features(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) normalised boxes -> (..., 6 * (2 * _FREQS + 1)) Fourier features of x1, y1, x2,
    y2, cx, cy: smooth in position, so "left of" is a linear read-out."""
    cx, cy = (boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2
    return fourier_features(torch.cat([boxes, cx[..., None], cy[..., None]], dim=-1))


def class_counts(det: Detections, num_classes: int, min_score: float) -> torch.Tensor:
    """(B, num_classes) long: detections per class scoring at least ``min_score``, capped."""
    keep = (det.scores >= min_score).long()                                        # (B, K)
    counts = torch.zeros(det.scores.shape[0], num_classes, dtype=torch.long, device=det.scores.device)
    counts.scatter_add_(1, det.classes, keep)
    return counts.clamp_(max=MAX_COUNT)


class ObjectCentricVisionEncoder(nn.Module):
    """pixel_values -> (object tokens = detections, region grid, scene tokens), plus detections."""

    def __init__(self, config: RsLvlmConfig) -> None:
        super().__init__()
        self.config = config
        _, c4, c8, c16 = config.detector_channels
        dv = config.vision_hidden_size
        self.detector = CenterNetDetector(config)
        self.object_feature = nn.Linear(c4 + c8, dv)
        self.object_box = nn.Linear(BOX_FEATURES, dv)
        n_evidence = config.num_object_classes + config.num_colours + config.num_size_words + 1
        self.object_evidence = nn.Linear(n_evidence, dv)
        self.object_class = nn.Embedding(config.num_object_classes, dv)
        self.object_norm = nn.LayerNorm(dv, eps=config.vision_layer_norm_eps)
        if config.class_count_tokens:
            self.count_class = nn.Embedding(config.num_object_classes, dv)
            self.count_value = nn.Embedding(MAX_COUNT + 1, dv)
            self.count_norm = nn.LayerNorm(dv, eps=config.vision_layer_norm_eps)
        self.region_proj = nn.Linear(c8 + c16, dv)
        self.region_norm = nn.LayerNorm(dv, eps=config.vision_layer_norm_eps)
        self.scene_proj = nn.Linear(c16, dv)
        self.scene_norm = nn.LayerNorm(dv, eps=config.vision_layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> ObjectCentricOutput:
        dtype = self.object_feature.weight.dtype
        raw = self.detector(pixel_values.to(dtype))
        det = decode_detections(raw, self.config.num_object_tokens)
        b, k = det.cells.shape
        mid_up = F.interpolate(raw.mid, size=raw.fine.shape[-2:], mode="nearest")
        feats = torch.cat([raw.fine, mid_up], dim=1).flatten(2)                    # (B, C, h*w)
        peak = feats.gather(2, det.cells[:, None].expand(-1, feats.shape[1], -1)).transpose(1, 2)
        evidence = torch.cat([det.class_probs, det.colour_probs, det.size_probs, det.scores[..., None]], dim=-1)
        obj = (self.object_feature(peak) + self.object_box(box_features(det.boxes).to(dtype))
               + self.object_evidence(evidence.to(dtype)) + self.object_class(det.classes))
        obj = self.object_norm(obj)                                                # (B, K, Dv)
        if self.config.class_count_tokens:
            n = self.config.num_object_classes
            counts = class_counts(det, n, self.config.count_min_score)               # (B, n)
            classes = torch.arange(n, device=counts.device)
            count_tokens = self.count_norm(self.count_class(classes)[None] + self.count_value(counts))
            obj = torch.cat([obj, count_tokens.to(obj.dtype)], dim=1)              # (B, K + n, Dv)

        g = self.config.region_grid
        coarse_up = F.interpolate(raw.coarse, size=raw.mid.shape[-2:], mode="nearest")
        region = F.adaptive_avg_pool2d(torch.cat([raw.mid, coarse_up], dim=1), (g, g))
        region = self.region_norm(self.region_proj(region.flatten(2).transpose(1, 2)))   # (B, g*g, Dv)
        s = self.config.scene_grid
        scene = torch.cat([raw.coarse.mean(dim=(2, 3))[:, None],
                           F.adaptive_avg_pool2d(raw.coarse, (s, s)).flatten(2).transpose(1, 2)], dim=1)
        scene = self.scene_norm(self.scene_proj(scene))                            # (B, 1 + s*s, Dv)
        return ObjectCentricOutput(MultiLevelFeatures(obj, region, scene), det, raw)
