"""Drawing surface of the scene generator: land-cover regions, object placement and rendering.

Why one object for all layers: the land-cover label map, the texture-kind map, the base colours,
the shadow mask and the object instances are drawn by the same calls, so the annotations are the
rendering and cannot drift apart.  Layouts describe a scene in a *local* frame centred on the
image and optionally rotated (``angle``), which gives every scene class rotated variants for free.

Pixel convention: continuous coordinates, pixel ``i`` covers ``[i, i + 1)``; a shape paints the
pixels it touches (PIL's rasterisation rule), so an object's box encloses its painted pixels up to
the pixel grid.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from .objects import Part, SceneObject, build_object
from .textures import compose_textures, finish_image

__all__ = ["LAND_COVER_CLASSES", "LC", "MAX_PER_CLASS", "OBJECT_LAND_COVER", "Canvas"]

LAND_COVER_CLASSES: tuple[str, ...] = (
    "water", "vegetation", "built-up", "road", "bare soil", "agriculture",
)
"""Land-cover names; the label map stores their index."""
LC: dict[str, int] = {name: i for i, name in enumerate(LAND_COVER_CLASSES)}

MAX_PER_CLASS = 9
"""No scene holds more than this many objects of one class, so counts are single digits."""

MIN_LENGTH = 12.5
"""Shortest long side of an object at 256 px (about 6 px in the 128 px model input)."""

OBJECT_LAND_COVER: dict[str, str] = {
    "building": "built-up", "storage tank": "built-up", "tennis court": "built-up",
    "swimming pool": "water", "bridge": "road",
}
"""Objects large and permanent enough to count as land cover; the others leave it unchanged."""

# Per-class colour priors over ("white", "red", "blue", "green", "grey", "yellow").
_COLOUR_PRIORS: dict[str, tuple[float, ...]] = {
    "airplane": (0.55, 0.08, 0.08, 0.04, 0.2, 0.05),
    "ship": (0.3, 0.18, 0.17, 0.05, 0.25, 0.05),
    "storage tank": (0.5, 0.04, 0.04, 0.1, 0.27, 0.05),
    "vehicle": (0.25, 0.16, 0.15, 0.1, 0.2, 0.14),
    "building": (0.2, 0.25, 0.12, 0.08, 0.25, 0.1),
    "tennis court": (0.0, 0.2, 0.35, 0.45, 0.0, 0.0),
    "bridge": (0.25, 0.1, 0.0, 0.0, 0.6, 0.05),
    "swimming pool": (0.0, 0.0, 0.9, 0.1, 0.0, 0.0),
}
_COLOURS = ("white", "red", "blue", "green", "grey", "yellow")


def _off(pts: np.ndarray) -> list[tuple[float, float]]:
    """Continuous coordinates as PIL vertices.  PIL fills pixel ``i`` when ``floor(a) <= i <=
    floor(b)`` for an edge span ``[a, b]``, i.e. exactly the pixels ``[i, i + 1)`` that the
    continuous shape touches, so no offset is needed."""
    return [(float(x), float(y)) for x, y in pts]


def _draw_part(draw: ImageDraw.ImageDraw, part: Part, fill: object) -> None:
    if part.circle is not None:
        cx, cy, r = part.circle
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif part.points is not None:
        draw.polygon(_off(part.points), fill=fill)


class Canvas:
    """Layers of one scene under construction, in a local frame rotated by ``angle`` degrees."""

    def __init__(self, size: int, rng: np.random.Generator, angle: float = 0.0) -> None:
        self.size = size
        self.u = size / 256.0  # layouts are written for 256 px and scale with the render size
        self.rng = rng
        self.angle = float(angle)
        th = math.radians(angle)
        c, s = math.cos(th), math.sin(th)
        self._rot = np.array([[c, s], [-s, c]])
        self._centre = np.array([size / 2.0, size / 2.0])
        self.lc_img = Image.new("L", (size, size), LC["vegetation"])
        self.kind_img = Image.new("L", (size, size), 0)
        self.col_img = Image.new("RGB", (size, size), (0, 0, 0))
        self.shadow_img = Image.new("L", (size, size), 0)
        self._d_lc = ImageDraw.Draw(self.lc_img)
        self._d_kind = ImageDraw.Draw(self.kind_img)
        self._d_col = ImageDraw.Draw(self.col_img)
        self._d_shadow = ImageDraw.Draw(self.shadow_img)
        self.decor: list[Part] = []
        self.decor_lc: list[tuple[Part, int]] = []
        self.objects: list[SceneObject] = []
        self.object_parts: list[list[Part]] = []
        self._boxes: list[tuple[float, float, float, float]] = []
        self._lc_arr: np.ndarray | None = None

    # --- frames -------------------------------------------------------------------------------
    def tf(self, pts: np.ndarray | list) -> np.ndarray:
        """Local (centred, unrotated) coordinates to image coordinates."""
        p = np.asarray(pts, np.float64).reshape(-1, 2)
        return p @ self._rot + self._centre

    # --- land-cover regions -------------------------------------------------------------------
    def region(self, pts: np.ndarray | list, lc: str | None, tex: int,
               rgb: tuple[int, int, int], local: bool = True) -> None:
        """Paint a polygon of one surface; ``lc=None`` paints without changing the label map."""
        p = _off(self.tf(pts) if local else np.asarray(pts, np.float64))
        if lc is not None:
            self._d_lc.polygon(p, fill=LC[lc])
        self._d_kind.polygon(p, fill=tex)
        self._d_col.polygon(p, fill=rgb)
        self._lc_arr = None

    def rect(self, x1: float, y1: float, x2: float, y2: float, lc: str | None, tex: int,
             rgb: tuple[int, int, int]) -> None:
        """Axis-aligned rectangle in the local frame."""
        self.region([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], lc, tex, rgb)

    def band(self, line: np.ndarray | list, width: float, lc: str | None, tex: int,
             rgb: tuple[int, int, int]) -> None:
        """A strip of constant width along a polyline (roads, rivers, runways)."""
        pts = np.asarray(line, np.float64)
        seg = np.diff(pts, axis=0)
        seg /= np.linalg.norm(seg, axis=1, keepdims=True) + 1e-9
        nrm = np.stack([-seg[:, 1], seg[:, 0]], axis=1)
        vn = np.concatenate([nrm[:1], nrm[:-1] + nrm[1:], nrm[-1:]], axis=0)
        vn /= np.linalg.norm(vn, axis=1, keepdims=True) + 1e-9
        left = pts + vn * width / 2
        right = pts - vn * width / 2
        self.region(np.concatenate([left, right[::-1]]), lc, tex, rgb)

    def lc_array(self) -> np.ndarray:
        """The land-cover label map drawn so far (cached until the next region)."""
        if self._lc_arr is None:
            self._lc_arr = np.asarray(self.lc_img)
        return self._lc_arr

    def is_on(self, pts: np.ndarray | list, allowed: tuple[str, ...], local: bool = True) -> bool:
        """Whether a polygon lies inside the image on allowed land cover (checked at its
        vertices, edge midpoints and centroid) and clear of objects and reserved areas, e.g.
        before laying out a group of objects."""
        poly = self.tf(pts) if local else np.asarray(pts, np.float64)
        if poly.min() < 0.0 or poly.max() > self.size:
            return False
        x1, y1 = poly.min(axis=0)
        x2, y2 = poly.max(axis=0)
        return self._free((x1, y1, x2, y2), 1.0) and self._on(poly, allowed)

    def reserve(self, pts: np.ndarray | list, local: bool = True) -> None:
        """Keep objects and trees off an area (e.g. a running track) without annotating it."""
        poly = self.tf(pts) if local else np.asarray(pts, np.float64)
        x1, y1 = poly.min(axis=0)
        x2, y2 = poly.max(axis=0)
        self._boxes.append((float(x1), float(y1), float(x2), float(y2)))

    # --- objects ------------------------------------------------------------------------------
    def colour_for(self, cls: str) -> str:
        """A colour name drawn from the class's prior (e.g. airplanes are mostly white)."""
        return str(self.rng.choice(_COLOURS, p=np.asarray(_COLOUR_PRIORS[cls])))

    def count(self, cls: str) -> int:
        return sum(1 for o in self.objects if o.cls == cls)

    def _free(self, box: tuple[float, float, float, float], pad: float) -> bool:
        x1, y1, x2, y2 = box
        for b in self._boxes:
            if x1 - pad < b[2] and b[0] < x2 + pad and y1 - pad < b[3] and b[1] < y2 + pad:
                return False
        return True

    def _on(self, poly: np.ndarray, allowed: tuple[str, ...]) -> bool:
        lc = self.lc_array()
        ids = [LC[a] for a in allowed]
        pts = np.concatenate([poly, poly.mean(axis=0, keepdims=True),
                              (poly + np.roll(poly, 1, axis=0)) / 2])
        ix = np.clip(pts[:, 0].astype(int), 0, self.size - 1)
        iy = np.clip(pts[:, 1].astype(int), 0, self.size - 1)
        return bool(np.isin(lc[iy, ix], ids).all())

    def place(self, cls: str, length: float, centre: tuple[float, float], angle: float = 0.0,
              colour: str | None = None, allowed: tuple[str, ...] | None = None,
              width: float | None = None, flat: bool = False, pad: float = 2.0,
              local: bool = True) -> SceneObject | None:
        """Add an object if it fits: inside the image, on allowed land cover, not overlapping.

        Returns the new object, or None when it was rejected (the caller may try elsewhere).
        """
        if self.count(cls) >= self._cap:
            return None
        colour = colour or self.colour_for(cls)
        length = max(length, MIN_LENGTH * self.u)
        c = self.tf([centre])[0] if local else np.asarray(centre, np.float64)
        ang = angle + self.angle if local else angle
        obj, parts, shadows = build_object(cls, colour, length, (float(c[0]), float(c[1])), ang,
                                           self.size, self.rng, width=width, flat_roof=flat)
        poly = np.asarray(obj.polygon)
        if poly.min() < 1.0 or poly.max() > self.size - 1.0:
            return None
        if not self._free(obj.box, pad):
            return None
        if allowed is not None and not self._on(poly, allowed):
            return None
        self.objects.append(obj)
        self.object_parts.append(parts)
        self._boxes.append(obj.box)
        for sh in shadows:
            self._d_shadow.polygon(_off(sh), fill=255)
        return obj

    _cap = MAX_PER_CLASS

    def tree(self, centre: tuple[float, float], r: float, local: bool = True,
             allowed: tuple[str, ...] | None = None) -> bool:
        """Decor tree crown (not an annotated object) with its shadow; avoids objects."""
        c = self.tf([centre])[0] if local else np.asarray(centre, np.float64)
        x, y = float(c[0]), float(c[1])
        box = (x - r, y - r, x + r, y + r)
        if not self._free(box, 1.0):
            return False
        if allowed is not None:
            ix, iy = int(min(max(x, 0), self.size - 1)), int(min(max(y, 0), self.size - 1))
            if LAND_COVER_CLASSES[int(self.lc_array()[iy, ix])] not in allowed:
                return False
        h = r * 1.1
        for t in (0.5, 1.0):
            dx, dy = 0.62 * h * t, 0.78 * h * t
            self._d_shadow.ellipse([x - r + dx, y - r + dy, x + r + dx, y + r + dy], fill=255)
        g = self.rng.uniform(0.8, 1.15)
        base = (int(44 * g), int(80 * g), int(40 * g))
        self.decor.append(Part(base, circle=(x, y, r)))
        self.decor.append(Part((int(62 * g), int(102 * g), int(50 * g)),
                               circle=(x - 0.25 * r, y - 0.25 * r, 0.6 * r)))
        self.decor_lc.append((Part(base, circle=(x, y, r)), LC["vegetation"]))
        return True

    # --- rendering ----------------------------------------------------------------------------
    def render(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Textures, shadows, decor, objects, then the sensor model.

        Returns (image HxWx3 uint8, land-cover map HxW uint8, instance map HxW uint8 where
        value i+1 marks the pixels painted by object i).
        """
        rng = self.rng
        kind = np.asarray(self.kind_img)
        tex = compose_textures(kind, rng)
        base = np.asarray(self.col_img, np.float32) * tex[..., None]
        strength = np.float32(rng.uniform(0.4, 0.55) / 255.0)
        base *= (1.0 - strength * np.asarray(self.shadow_img, np.float32))[..., None]
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for p in self.decor:
            _draw_part(draw, p, p.rgb)
        for p, lc_id in self.decor_lc:
            _draw_part(self._d_lc, p, lc_id)
        inst = Image.new("L", (self.size, self.size), 0)
        d_inst = ImageDraw.Draw(inst)
        for i, (obj, parts) in enumerate(zip(self.objects, self.object_parts)):
            for p in parts:
                _draw_part(draw, p, p.rgb)
                _draw_part(d_inst, p, min(255, i + 1))
            if obj.cls in OBJECT_LAND_COVER:
                self._d_lc.polygon(_off(np.asarray(obj.polygon)),
                                   fill=LC[OBJECT_LAND_COVER[obj.cls]])
        image = finish_image(img, rng)
        return image, np.array(self.lc_img), np.array(inst)
