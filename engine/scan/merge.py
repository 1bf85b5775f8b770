"""Seam merge: boxes from overlapping tiles become one detection per object, in map coordinates.

Why: a scan reads the raster tile by tile, so an object on a seam is seen by two or four tiles,
each reporting all or part of it.  The analyst wants it once.  Two steps:

1. **Edge drop** (:func:`keep_box`): a box that touches an edge its tile shares with a neighbour
   is cut by that edge; when more than half of it lies outside the tile's core, the neighbour
   (which owns that part of the raster and sees more of the object) reports it, so it is dropped.
2. **Merge** (:func:`merge_boxes`): boxes of the same label are linked when they are the same
   object: from one tile, IoU >= ``iou``; from different tiles, intersection over the smaller area
   >= ``ioa`` (a part inside the whole), or two cut boxes meeting across a seam along at least half
   of the shorter side (an object split with no overlap).  Linked boxes form connected components
   (found with a shapely STRtree over the map polygons and a union-find), and each component becomes
   one detection: the envelope of its members on the raster's pixel grid, with the best score.

Connected components do not depend on the order the boxes arrive in, so a scan that runs its
batches in another order (Ray) or resumes after a kill gives the same detections.
:class:`SeamMerger` applies the merge incrementally, batch by batch: a new box can only link to
boxes of its own tile and its 8 neighbours, so only the components around a batch are redone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from shapely import STRtree
from shapely.geometry import Polygon

__all__ = ["RawBox", "Detection", "keep_box", "touches_edges", "same_object", "merge_boxes", "SeamMerger",
           "DEFAULT_IOU", "DEFAULT_IOA", "DEFAULT_TOL_PX"]

DEFAULT_IOU = 0.5
DEFAULT_IOA = 0.5
DEFAULT_TOL_PX = 1.0
"""Raster pixels: a box edge this close to a tile edge or to another box touches it (a scan passes
one step of the model's 0-100 grid, in raster pixels, when that is coarser)."""


@dataclass
class RawBox:
    """One box of one tile's answer: ``key`` = (tile id, index in the answer), stable across runs."""

    key: tuple[int, int]
    label: str
    score: float
    geom: Polygon                              # raster CRS
    px: tuple[float, float, float, float]      # bounds on the raster pixel grid (c0, r0, c1, r1)
    angle: float = 0.0
    cut: bool = False                          # touches an edge its tile shares with a neighbour

    @property
    def tile_id(self) -> int:
        return self.key[0]


@dataclass
class Detection:
    """A merged object: ``key`` is its smallest member's key (stable whatever the order of work)."""

    key: tuple[int, int]
    label: str
    score: float
    geom: Polygon
    tile_id: int
    parts: int
    members: list[tuple[int, int]] = field(default_factory=list)

    @property
    def key_text(self) -> str:
        return f"{self.key[0]}:{self.key[1]}"


def touches_edges(px: Sequence[float], window: Sequence[int], interior: Sequence[bool],
                  tol: float = DEFAULT_TOL_PX) -> bool:
    """Whether a pixel box touches one of the window's sides that has a neighbour (l, t, r, b)."""
    c0, r0, c1, r1 = px
    wc, wr, ww, wh = window
    near = (c0 <= wc + tol, r0 <= wr + tol, c1 >= wc + ww - tol, r1 >= wr + wh - tol)
    return any(n and i for n, i in zip(near, interior))


def keep_box(px: Sequence[float], window: Sequence[int], core: Sequence[int], interior: Sequence[bool],
             tol: float = DEFAULT_TOL_PX) -> bool:
    """False for a box cut by a shared tile edge with more than half of it outside the tile's core."""
    if not touches_edges(px, window, interior, tol):
        return True
    c0, r0, c1, r1 = px
    kc, kr, kw, kh = core
    area = max(c1 - c0, 0.0) * max(r1 - r0, 0.0)
    if area <= 0:
        return False
    inside = max(min(c1, kc + kw) - max(c0, kc), 0.0) * max(min(r1, kr + kh) - max(r0, kr), 0.0)
    return inside >= 0.5 * area


def _seam_contact(a: RawBox, b: RawBox, tol: float) -> bool:
    """Two cut boxes that meet across a seam along at least half of the shorter side."""
    if not (a.cut and b.cut):
        return False
    (ac0, ar0, ac1, ar1), (bc0, br0, bc1, br1) = a.px, b.px
    rows = min(ar1, br1) - max(ar0, br0)
    cols = min(ac1, bc1) - max(ac0, bc0)
    side_by_side = (abs(ac1 - bc0) <= tol or abs(bc1 - ac0) <= tol) and \
        rows >= 0.5 * min(ar1 - ar0, br1 - br0)
    stacked = (abs(ar1 - br0) <= tol or abs(br1 - ar0) <= tol) and \
        cols >= 0.5 * min(ac1 - ac0, bc1 - bc0)
    return side_by_side or stacked


def same_object(a: RawBox, b: RawBox, iou: float = DEFAULT_IOU, ioa: float = DEFAULT_IOA,
                tol: float = DEFAULT_TOL_PX) -> bool:
    """The linking rule of the module docstring."""
    if a.label.strip().lower() != b.label.strip().lower():
        return False
    inter = a.geom.intersection(b.geom).area
    if a.tile_id == b.tile_id:
        union = a.geom.area + b.geom.area - inter
        return union > 0 and inter / union >= iou
    smaller = min(a.geom.area, b.geom.area)
    return (smaller > 0 and inter / smaller >= ioa) or _seam_contact(a, b, tol)


def merge_component(members: Sequence[RawBox], to_polygon: Callable[[Sequence[float]], Polygon]) -> Detection:
    """One detection for linked boxes: their envelope on the pixel grid (the best box if rotated)."""
    ordered = sorted(members, key=lambda m: m.key)
    best = max(ordered, key=lambda m: (m.score, [-k for k in m.key]))
    if len(ordered) == 1 or any(abs(m.angle) > 1e-9 for m in ordered):
        geom = best.geom
    else:
        geom = to_polygon((min(m.px[0] for m in ordered), min(m.px[1] for m in ordered),
                           max(m.px[2] for m in ordered), max(m.px[3] for m in ordered)))
    return Detection(ordered[0].key, best.label, best.score, geom, best.tile_id, len(ordered),
                     [m.key for m in ordered])


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[tuple[int, int], tuple[int, int]] = {}

    def add(self, k: tuple[int, int]) -> None:
        self.parent.setdefault(k, k)

    def find(self, k: tuple[int, int]) -> tuple[int, int]:
        root = k
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[k] != root:
            self.parent[k], k = root, self.parent[k]
        return root

    def union(self, a: tuple[int, int], b: tuple[int, int]) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = sorted((ra, rb))
            self.parent[hi] = lo


def _links(new: Sequence[RawBox], pool: Sequence[RawBox], tol_map: float, iou: float, ioa: float,
           tol_px: float) -> Iterable[tuple[RawBox, RawBox]]:
    """Pairs (new box, pool box) that are the same object; candidates from an STRtree query."""
    if not pool:
        return
    tree = STRtree([p.geom for p in pool])
    for a in new:
        for j in tree.query(a.geom.buffer(tol_map, join_style="mitre")):
            b = pool[int(j)]
            if b.key != a.key and same_object(a, b, iou, ioa, tol_px):
                yield a, b


def merge_boxes(boxes: Sequence[RawBox], to_polygon: Callable[[Sequence[float]], Polygon],
                tol_map: float, iou: float = DEFAULT_IOU, ioa: float = DEFAULT_IOA,
                tol_px: float = DEFAULT_TOL_PX) -> list[Detection]:
    """All detections of a set of boxes (order-independent), sorted by key.

    ``to_polygon`` maps a raster pixel box to a map polygon (the scan's georef); ``tol_map`` is one
    raster pixel in map units and ``tol_px`` the touch tolerance in raster pixels (the STRtree is
    queried ``tol_px * tol_map`` around each box, so boxes that only touch are found).
    """
    uf = _UnionFind()
    for b in boxes:
        uf.add(b.key)
    for a, b in _links(boxes, boxes, tol_map * tol_px, iou, ioa, tol_px):
        uf.union(a.key, b.key)
    groups: dict[tuple[int, int], list[RawBox]] = {}
    for b in boxes:
        groups.setdefault(uf.find(b.key), []).append(b)
    return sorted((merge_component(g, to_polygon) for g in groups.values()), key=lambda d: d.key)


class SeamMerger:
    """The merge kept up to date batch by batch (see the module docstring).

    ``neighbours(tile_id)`` gives the tile and its neighbours.  :meth:`add` returns the keys of
    the detections that no longer exist and the detections to write in their place.
    """

    def __init__(self, neighbours: Callable[[int], list[int]], to_polygon: Callable[[Sequence[float]], Polygon],
                 tol_map: float, iou: float = DEFAULT_IOU, ioa: float = DEFAULT_IOA,
                 tol_px: float = DEFAULT_TOL_PX) -> None:
        self._neighbours, self._to_polygon = neighbours, to_polygon
        self._tol, self._iou, self._ioa, self._tol_px = tol_map * tol_px, iou, ioa, tol_px
        self._boxes: dict[tuple[int, int], RawBox] = {}
        self._by_tile: dict[int, list[tuple[int, int]]] = {}
        self._uf = _UnionFind()
        self._members: dict[tuple[int, int], list[tuple[int, int]]] = {}

    @property
    def detection_count(self) -> int:
        return len(self._members)

    def add(self, boxes: Sequence[RawBox]) -> tuple[list[tuple[int, int]], list[Detection]]:
        """Add one batch's boxes; return (keys of replaced detections, new or changed detections)."""
        if not boxes:
            return [], []
        tiles = {b.tile_id for b in boxes}
        near = {t for tile in tiles for t in self._neighbours(tile)}
        pool = [self._boxes[k] for t in sorted(near) for k in self._by_tile.get(t, [])]
        for b in boxes:
            self._boxes[b.key] = b
            self._by_tile.setdefault(b.tile_id, []).append(b.key)
            self._uf.add(b.key)
            self._members[b.key] = [b.key]
        pool = pool + list(boxes)
        old_roots: set[tuple[int, int]] = set()
        for a, b in _links(boxes, pool, self._tol, self._iou, self._ioa, self._tol_px):
            ra, rb = self._uf.find(a.key), self._uf.find(b.key)
            if ra == rb:
                continue
            old_roots.update((ra, rb))
            self._uf.union(ra, rb)
            root = self._uf.find(ra)
            other = rb if root == ra else ra
            self._members[root].extend(self._members.pop(other))
        new_keys = {b.key for b in boxes}
        roots = {self._uf.find(b.key) for b in boxes}
        replaced = sorted(r for r in old_roots if r not in new_keys)
        detections = [merge_component([self._boxes[k] for k in self._members[r]], self._to_polygon)
                      for r in sorted(roots)]
        return replaced, detections
