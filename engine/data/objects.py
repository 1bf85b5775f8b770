"""Object shapes of the aerial-scene generator: footprints, rendered parts, shadows, attributes.

Why a separate module: the scene layouts decide *where* objects go; this module decides what an
object *is* (its footprint polygon, how it is painted, how tall it is for its shadow) and derives
its annotations (size, orientation) from the same geometry, so the labels can never disagree with
the pixels.

Geometry convention: continuous pixel coordinates with the image's top-left corner at (0, 0),
x to the right, y down, pixel ``i`` covering ``[i, i + 1)``.  Angles are degrees, clockwise in
image space, folded into ``(-90, 90]`` -- the same convention as the GeoChat box text in
``engine.grounding``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .textures import object_rgb

__all__ = [
    "OBJECT_CLASSES", "SIZE_NAMES", "ORIENTATION_NAMES", "SUN_DIRECTION", "Part", "SceneObject",
    "size_name", "orientation_name", "polygon_area", "build_object",
]

OBJECT_CLASSES: tuple[str, ...] = (
    "airplane", "ship", "storage tank", "vehicle", "building", "tennis court", "bridge",
    "swimming pool",
)
SIZE_NAMES: tuple[str, ...] = ("small", "medium", "large")
ORIENTATION_NAMES: tuple[str, ...] = ("horizontal", "vertical", "diagonal")

SUN_DIRECTION = (0.62, 0.78)
"""Unit vector along which shadows fall (sun in the north-west, shadows to the south-east)."""

# Footprint area as a fraction of the image area: below 0.5 % small, below 1.6 % medium.
_SMALL_MAX, _MEDIUM_MAX = 0.005, 0.016


@dataclass
class Part:
    """One painted piece of an object: a polygon (``points`` N x 2) or a circle (``circle``)."""

    rgb: tuple[int, int, int]
    points: np.ndarray | None = None
    circle: tuple[float, float, float] | None = None


@dataclass
class SceneObject:
    """An annotated object of a generated scene.

    ``box`` is the axis-aligned pixel box (x1, y1, x2, y2) of the footprint in the rendered image
    (continuous edges of the footprint; the pixels painted for the object are those it touches);
    ``angle`` the clockwise rotation of the long axis in degrees; ``length``/``width`` the
    unrotated extents, so (centre, length, width, angle) is the oriented box.
    """

    cls: str
    colour: str
    size: str
    orientation: str
    box: tuple[float, float, float, float]
    angle: float
    centre: tuple[float, float]
    length: float
    width: float
    polygon: list[tuple[float, float]] = field(default_factory=list)
    area_fraction: float = 0.0

    @property
    def area(self) -> float:
        """Footprint area in pixels (for 'largest' questions)."""
        return polygon_area(np.asarray(self.polygon)) if self.polygon else 0.0


def size_name(area_fraction: float) -> str:
    """Size word from footprint area relative to the image, so size is resolution independent."""
    if area_fraction < _SMALL_MAX:
        return "small"
    if area_fraction < _MEDIUM_MAX:
        return "medium"
    return "large"


def fold_angle(angle: float) -> float:
    """Fold an axis angle into (-90, 90] (a long axis is symmetric under 180 degrees)."""
    a = math.fmod(angle, 180.0)
    if a <= -90.0:
        a += 180.0
    elif a > 90.0:
        a -= 180.0
    return a


def orientation_name(angle: float) -> str:
    """Orientation word from the long-axis angle: within 22.5 degrees of an axis, else diagonal."""
    a = abs(fold_angle(angle))
    if a <= 22.5:
        return "horizontal"
    if a >= 67.5:
        return "vertical"
    return "diagonal"


def polygon_area(points: np.ndarray) -> float:
    """Shoelace area of a simple polygon."""
    x, y = points[:, 0], points[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def _rect(x1: float, y1: float, x2: float, y2: float) -> np.ndarray:
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], np.float64)


def _shade(rgb: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c * f))) for c in rgb)  # type: ignore[return-value]


def _mirror(top: list[tuple[float, float]]) -> np.ndarray:
    """Close a half outline (y <= 0) with its mirror image (y >= 0), for symmetric shapes."""
    bottom = [(x, -y) for x, y in reversed(top) if y != 0.0]
    return np.array(top + bottom, np.float64)


# --- local shapes: x along the long axis, centred on (0, 0) ------------------------------------

def _airplane(L: float, rgb: tuple[int, int, int], rng: np.random.Generator
              ) -> tuple[np.ndarray, list[Part], float, float]:
    w = 0.11 * L
    span = L * rng.uniform(0.85, 1.05)
    top = [(0.5 * L, 0.0), (0.42 * L, -w / 2), (0.12 * L, -w / 2), (-0.12 * L, -span / 2),
           (-0.21 * L, -span / 2), (-0.06 * L, -w / 2), (-0.36 * L, -w / 2),
           (-0.45 * L, -0.19 * L), (-0.5 * L, -0.19 * L), (-0.5 * L, 0.0)]
    foot = _mirror(top)
    parts = [Part(rgb, foot),
             Part(_shade(rgb, 1.08), _rect(-0.42 * L, -w * 0.18, 0.45 * L, w * 0.18))]
    if L > 28:
        for s in (-1, 1):
            parts.append(Part(_shade(rgb, 0.55), circle=(-0.05 * L, s * 0.22 * span, 0.03 * L)))
    return foot, parts, span, 0.12 * L


def _ship(L: float, rgb: tuple[int, int, int], rng: np.random.Generator
          ) -> tuple[np.ndarray, list[Part], float, float]:
    W = L * rng.uniform(0.2, 0.26)
    foot = np.array([[0.5 * L, 0], [0.3 * L, -W / 2], [-0.47 * L, -W / 2], [-0.5 * L, -0.3 * W],
                     [-0.5 * L, 0.3 * W], [-0.47 * L, W / 2], [0.3 * L, W / 2]], np.float64)
    parts = [Part(rgb, foot), Part(_shade(rgb, 0.86), foot * np.array([0.86, 0.7]))]
    light = (238, 238, 232) if sum(rgb) < 600 else (150, 152, 156)
    parts.append(Part(light, _rect(-0.43 * L, -0.3 * W, -0.26 * L, 0.3 * W)))
    if L > 50:
        n = int(rng.integers(2, 5))
        xs = np.linspace(-0.2 * L, 0.28 * L, n + 1)
        for a, b in zip(xs[:-1], xs[1:]):
            parts.append(Part(_shade(rgb, rng.uniform(0.75, 0.95)),
                              _rect(a + 0.01 * L, -0.28 * W, b - 0.01 * L, 0.28 * W)))
    return foot, parts, W, 0.09 * L


def _tank(D: float, rgb: tuple[int, int, int], rng: np.random.Generator
          ) -> tuple[np.ndarray, list[Part], float, float]:
    r = D / 2
    t = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    foot = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    parts = [Part(_shade(rgb, 0.8), circle=(0.0, 0.0, r)),
             Part(rgb, circle=(0.0, 0.0, r * 0.86)),
             Part(_shade(rgb, 1.1), circle=(-0.18 * r, -0.18 * r, r * 0.5)),
             Part(_shade(rgb, 0.7), circle=(0.0, 0.0, max(1.0, r * 0.1)))]
    return foot, parts, D, 0.45 * D + 2


def _vehicle(L: float, rgb: tuple[int, int, int], rng: np.random.Generator
             ) -> tuple[np.ndarray, list[Part], float, float]:
    W = L * rng.uniform(0.46, 0.56)
    foot = _rect(-L / 2, -W / 2, L / 2, W / 2)
    parts = [Part(rgb, foot),
             Part(_shade(rgb, 1.06), _rect(-0.28 * L, -0.36 * W, 0.08 * L, 0.36 * W)),
             Part((40, 44, 50), _rect(0.1 * L, -0.38 * W, 0.26 * L, 0.38 * W))]
    return foot, parts, W, 0.16 * L


def _building(L: float, rgb: tuple[int, int, int], rng: np.random.Generator, W: float,
              flat: bool) -> tuple[np.ndarray, list[Part], float, float]:
    foot = _rect(-L / 2, -W / 2, L / 2, W / 2)
    if flat:
        b = max(1.0, 0.06 * W)
        parts = [Part(_shade(rgb, 0.82), foot), Part(rgb, _rect(-L / 2 + b, -W / 2 + b,
                                                                L / 2 - b, W / 2 - b))]
        for _ in range(int(rng.integers(0, 4))):
            cx, cy = rng.uniform(-0.35 * L, 0.35 * L), rng.uniform(-0.3 * W, 0.3 * W)
            s = rng.uniform(0.05, 0.1) * W + 1
            parts.append(Part(_shade(rgb, 0.78), _rect(cx - s, cy - s, cx + s, cy + s)))
        height = 0.22 * W + 3
    else:  # gable roof: the sunlit half is brighter, which shows the ridge
        parts = [Part(_shade(rgb, 1.07), _rect(-L / 2, -W / 2, L / 2, 0.0)),
                 Part(_shade(rgb, 0.8), _rect(-L / 2, 0.0, L / 2, W / 2))]
        height = 0.35 * W + 3
    return foot, parts, W, height


def _tennis_court(L: float, rgb: tuple[int, int, int], rng: np.random.Generator
                  ) -> tuple[np.ndarray, list[Part], float, float]:
    W = 0.55 * L
    foot = _rect(-L / 2, -W / 2, L / 2, W / 2)
    white = (232, 232, 228)
    cl, cw = 0.78 * L, 0.62 * W  # playing area inside the surround
    lw = max(0.9, L / 48)
    parts = [Part(_shade(rgb, 0.82), foot), Part(rgb, _rect(-cl / 2, -cw / 2, cl / 2, cw / 2))]
    for x1, y1, x2, y2 in ((-cl / 2, -cw / 2, cl / 2, -cw / 2 + lw),
                           (-cl / 2, cw / 2 - lw, cl / 2, cw / 2),
                           (-cl / 2, -cw / 2, -cl / 2 + lw, cw / 2),
                           (cl / 2 - lw, -cw / 2, cl / 2, cw / 2),
                           (-lw * 0.8, -W / 2 + lw, lw * 0.8, W / 2 - lw),  # net
                           (-0.27 * cl, -cw / 2, -0.27 * cl + lw, cw / 2),
                           (0.27 * cl - lw, -cw / 2, 0.27 * cl, cw / 2),
                           (-0.27 * cl, -lw / 2, 0.27 * cl, lw / 2)):
        parts.append(Part(white, _rect(x1, y1, x2, y2)))
    return foot, parts, W, 1.5


def _bridge(L: float, rgb: tuple[int, int, int], rng: np.random.Generator, W: float
            ) -> tuple[np.ndarray, list[Part], float, float]:
    foot = _rect(-L / 2, -W / 2, L / 2, W / 2)
    rail = max(1.0, 0.12 * W)
    parts = [Part(rgb, foot),
             Part(_shade(rgb, 0.7), _rect(-L / 2, -W / 2, L / 2, -W / 2 + rail)),
             Part(_shade(rgb, 0.7), _rect(-L / 2, W / 2 - rail, L / 2, W / 2))]
    return foot, parts, W, 0.6 * W + 5


def _pool(L: float, rgb: tuple[int, int, int], rng: np.random.Generator
          ) -> tuple[np.ndarray, list[Part], float, float]:
    W = L * rng.uniform(0.5, 0.65)
    foot = _rect(-L / 2, -W / 2, L / 2, W / 2)
    rim = max(1.0, 0.12 * W)
    water = tuple(int(min(255, c * 0.55 + t * 0.45)) for c, t in zip(rgb, (90, 190, 230)))
    parts = [Part((226, 224, 216), foot),
             Part(water, _rect(-L / 2 + rim, -W / 2 + rim, L / 2 - rim, W / 2 - rim))]  # type: ignore[arg-type]
    return foot, parts, W, 0.0


def build_object(cls: str, colour: str, length: float, centre: tuple[float, float], angle: float,
                 image_size: int, rng: np.random.Generator, width: float | None = None,
                 flat_roof: bool = False) -> tuple[SceneObject, list[Part], list[np.ndarray]]:
    """Make one object: its annotation, its painted parts and its shadow polygons (image coords).

    ``length`` is the long-axis extent in pixels; ``width`` is used for buildings and bridges
    (other classes derive their width from their shape).  The shadow is the footprint swept along
    :data:`SUN_DIRECTION` by a distance proportional to the object's height.
    """
    rgb = object_rgb(rng, colour)
    if cls == "airplane":
        foot, parts, wid, height = _airplane(length, rgb, rng)
    elif cls == "ship":
        foot, parts, wid, height = _ship(length, rgb, rng)
    elif cls == "storage tank":
        foot, parts, wid, height = _tank(length, rgb, rng)
    elif cls == "vehicle":
        foot, parts, wid, height = _vehicle(length, rgb, rng)
    elif cls == "building":
        foot, parts, wid, height = _building(length, rgb, rng, width or 0.7 * length, flat_roof)
    elif cls == "tennis court":
        foot, parts, wid, height = _tennis_court(length, rgb, rng)
    elif cls == "bridge":
        foot, parts, wid, height = _bridge(length, rgb, rng, width or 0.2 * length)
    elif cls == "swimming pool":
        foot, parts, wid, height = _pool(length, rgb, rng)
    else:
        raise ValueError(f"unknown object class {cls!r}")
    if cls == "storage tank":
        angle = 0.0  # a circle has no axis
    angle = fold_angle(angle)
    th = math.radians(angle)
    c, s = math.cos(th), math.sin(th)
    rot = np.array([[c, s], [-s, c]])  # row vectors: x' = x c - y s, y' = x s + y c (clockwise)
    cx, cy = centre

    def tf(p: np.ndarray) -> np.ndarray:
        return p @ rot + np.array([cx, cy])

    world_parts: list[Part] = []
    for p in parts:
        if p.circle is not None:
            px, py, r = p.circle
            q = tf(np.array([[px, py]]))[0]
            world_parts.append(Part(p.rgb, circle=(float(q[0]), float(q[1]), r)))
        else:
            world_parts.append(Part(p.rgb, tf(p.points)))
    poly = tf(foot)
    shadows: list[np.ndarray] = []
    if height > 0:
        d = np.array(SUN_DIRECTION) * height
        steps = max(2, int(height / 2.5) + 1)
        for t in np.linspace(0.0, 1.0, steps)[1:]:
            shadows.append(poly + d * t)
    x1, y1 = poly.min(axis=0)
    x2, y2 = poly.max(axis=0)
    area = polygon_area(poly)
    frac = area / float(image_size * image_size)
    obj = SceneObject(
        cls=cls, colour=colour, size=size_name(frac), orientation=orientation_name(angle),
        box=(round(float(x1), 2), round(float(y1), 2), round(float(x2), 2), round(float(y2), 2)),
        angle=round(angle, 2), centre=(round(float(cx), 2), round(float(cy), 2)),
        length=round(float(length), 2), width=round(float(wid), 2),
        polygon=[(round(float(a), 2), round(float(b), 2)) for a, b in poly],
        area_fraction=round(frac, 6))
    return obj, world_parts, shadows
