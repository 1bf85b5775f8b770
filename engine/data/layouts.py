"""Scene layouts: what each scene class contains and where, in the canvas's local frame.

Why hand-written layouts rather than random object soup: a scene class must be recognisable from
its *arrangement* (runway + apron, quay + piers, house grid along streets ...), as in real aerial
imagery, while objects are shared between classes (buildings everywhere, vehicles in most) so
that no single object gives the class away.  All sizes are written for a 256 px render and scaled
by ``cv.u``; ``k`` is a per-scene scale factor (ground sampling distance varies).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .canvas import Canvas
from .textures import (
    REGION_PALETTE, TEX_CANOPY, TEX_GRASS, TEX_ROWS_D1, TEX_ROWS_D2, TEX_ROWS_H, TEX_ROWS_V,
    TEX_SCRUB, TEX_SMOOTH, TEX_SOIL, TEX_WATER, jitter_rgb,
)

__all__ = ["LAYOUTS", "layout_angle"]

WHITE_PAINT = (214, 214, 206)


def _pal(cv: Canvas, name: str, amount: float = 8.0) -> tuple[int, int, int]:
    """A jittered variant of a named surface colour."""
    opts = REGION_PALETTE[name]
    return jitter_rgb(cv.rng, opts[int(cv.rng.integers(len(opts)))], amount)


def _blob(rng: np.random.Generator, cx: float, cy: float, r: float, n: int = 10,
          irregular: float = 0.3) -> np.ndarray:
    """An irregular closed patch (clearings, soil patches, farmyards)."""
    t = np.sort(rng.uniform(0, 2 * np.pi, n))
    rr = r * (1 + rng.uniform(-irregular, irregular, n))
    return np.stack([cx + rr * np.cos(t), cy + rr * np.sin(t)], axis=1)


def _stadium(cx: float, cy: float, L: float, W: float, n: int = 12) -> np.ndarray:
    """Running-track outline: a rectangle with semicircular ends."""
    r = W / 2
    a = np.linspace(-np.pi / 2, np.pi / 2, n)
    right = np.stack([cx + (L / 2 - r) + r * np.cos(a), cy + r * np.sin(a)], axis=1)
    left = np.stack([cx - (L / 2 - r) - r * np.cos(a), cy - r * np.sin(a)], axis=1)
    return np.concatenate([right, left])


def _try(cv: Canvas, n: int, attempts: int, fn: Callable[[], object]) -> int:
    """Call ``fn`` until it has placed ``n`` things or ``attempts`` tries are used."""
    placed = 0
    for _ in range(attempts):
        if placed >= n:
            break
        if fn() is not None:
            placed += 1
    return placed


def _uni(cv: Canvas, lo: float, hi: float) -> float:
    """Uniform draw in [lo, hi]; bounds are swapped when reversed (e.g. a shallow apron)."""
    if hi < lo:
        lo, hi = hi, lo
    return float(cv.rng.uniform(lo, hi))


def _trees(cv: Canvas, n: int, allowed: tuple[str, ...], spread: float = 0.5) -> None:
    S, u = cv.size, cv.u
    for _ in range(n):
        cv.tree((_uni(cv, -spread, spread) * S, _uni(cv, -spread, spread) * S),
                _uni(cv, 4, 9) * u, allowed=allowed)


def _on_line(cv: Canvas, cls: str, length: float, xs: np.ndarray, ys: np.ndarray, j: int,
             allowed: tuple[str, ...]) -> object:
    """Place an object on vertex ``j`` of a polyline, aligned with the line (boats, cars)."""
    ang = float(np.degrees(np.arctan2(ys[j + 1] - ys[j - 1], xs[j + 1] - xs[j - 1])))
    return cv.place(cls, length, (float(xs[j]), float(ys[j])), ang, allowed=allowed, pad=3.0)


def layout_angle(rng: np.random.Generator, free: float) -> float:
    """Scene rotation: a right angle, plus with probability ``free`` a random tilt."""
    a = float(rng.choice([0.0, 90.0, 180.0, 270.0]))
    if rng.random() < free:
        a += float(rng.uniform(-40, 40))
    return a


BIG = 0.8  # local regions extend to +-BIG*S so they still cover the image when rotated


def airport(cv: Canvas, k: float) -> None:
    S, u, rng = cv.size, cv.u, cv.rng
    ground = "grass" if rng.random() < 0.75 else "soil"
    cv.rect(-BIG * S, -BIG * S, BIG * S, BIG * S, "vegetation" if ground == "grass" else "bare soil",
            TEX_GRASS if ground == "grass" else TEX_SOIL, _pal(cv, ground))
    asphalt = _pal(cv, "asphalt")
    ry = _uni(cv, -0.36, -0.18) * S
    rw = _uni(cv, 26, 34) * u
    cv.band([[-BIG * S, ry], [BIG * S, ry]], rw, "road", TEX_SMOOTH, asphalt)
    for x in np.arange(-BIG * S, BIG * S, 26 * u):  # centre-line dashes
        cv.rect(x, ry - 1.0 * u, x + 13 * u, ry + 1.0 * u, None, TEX_SMOOTH, WHITE_PAINT)
    for s in (-1, 1):
        cv.rect(-BIG * S, ry + s * (rw / 2 - 2.5 * u) - 0.7 * u, BIG * S,
                ry + s * (rw / 2 - 2.5 * u) + 0.7 * u, None, TEX_SMOOTH, WHITE_PAINT)
    ty = ry + rw / 2 + _uni(cv, 14, 22) * u
    cv.band([[-BIG * S, ty], [BIG * S, ty]], 10 * u, "road", TEX_SMOOTH, asphalt)
    apron_y1 = ty + _uni(cv, 12, 20) * u
    apron_x = _uni(cv, -0.15, 0.15) * S
    apron_w = _uni(cv, 0.65, 1.0) * S
    concrete = _pal(cv, "concrete")
    for lx in (apron_x - apron_w * 0.3, apron_x + apron_w * 0.3):
        cv.rect(lx - 5 * u, ty, lx + 5 * u, apron_y1 + 2, "road", TEX_SMOOTH, asphalt)
    cv.rect(apron_x - apron_w / 2, apron_y1, apron_x + apron_w / 2, BIG * S, "road", TEX_SMOOTH,
            concrete)
    term = None
    for _ in range(12):
        term_y = _uni(cv, 0.3, 0.44) * S
        term = cv.place("building", _uni(cv, 70, 130) * u, (apron_x + _uni(cv, -0.15, 0.15) * S, term_y),
                        0.0, colour=str(rng.choice(["white", "grey", "grey", "blue"])),
                        width=_uni(cv, 18, 26) * u, flat=True, allowed=("road",))
        if term is not None:
            break
    stand_y = (term_y - 14 * u) if term is not None else BIG * S
    n = int(rng.integers(1, 6))
    L0 = _uni(cv, 30, 56) * u * k

    def parked() -> object:
        L = L0 * _uni(cv, 0.75, 1.25)
        x = apron_x + _uni(cv, -0.5, 0.5) * apron_w
        y = min(stand_y - L * 0.55, _uni(cv, apron_y1 + L * 0.55, stand_y - L * 0.55))
        return cv.place("airplane", L, (x, y), -90.0 + _uni(cv, -8, 8), allowed=("road",), pad=4.0)

    _try(cv, n, 40, parked)
    if rng.random() < 0.4:
        _try(cv, 1, 6, lambda: cv.place(
            "airplane", _uni(cv, 26, 48) * u * k, (_uni(cv, -0.4, 0.4) * S, ry),
            float(rng.choice([0.0, 180.0])), allowed=("road",)))
    _try(cv, int(rng.integers(0, 4)), 12, lambda: cv.place(
        "vehicle", _uni(cv, 13, 18) * u, (apron_x + _uni(cv, -0.5, 0.5) * apron_w,
                                          _uni(cv, apron_y1, stand_y)),
        float(rng.choice([0.0, 90.0])), allowed=("road",)))


def harbor(cv: Canvas, k: float) -> None:
    S, u, rng = cv.size, cv.u, cv.rng
    sy = _uni(cv, -0.2, 0.05) * S
    cv.rect(-BIG * S, -BIG * S, BIG * S, sy, "built-up", TEX_SMOOTH, _pal(cv, "concrete"))
    if rng.random() < 0.5:
        cv.region(_blob(rng, _uni(cv, -0.4, 0.4) * S, sy - 0.3 * S, 0.2 * S), "bare soil",
                  TEX_SOIL, _pal(cv, "soil"))
    cv.rect(-BIG * S, sy, BIG * S, BIG * S, "water", TEX_WATER, _pal(cv, "water"))
    cv.rect(-BIG * S, sy - 1.5 * u, BIG * S, sy + 1.0 * u, None, TEX_SMOOTH, (90, 90, 88))
    road_y = sy - _uni(cv, 12, 18) * u
    cv.band([[-BIG * S, road_y], [BIG * S, road_y]], 10 * u, "road", TEX_SMOOTH, _pal(cv, "asphalt"))
    n_piers = int(rng.integers(1, 4))
    pier_xs = np.sort(rng.uniform(-0.38, 0.38, n_piers)) * S
    piers = []
    for px in pier_xs:
        if piers and px - piers[-1][0] < 60 * u:
            continue
        pl, pw = _uni(cv, 60, 110) * u, _uni(cv, 9, 15) * u
        cv.rect(px - pw / 2, sy - 2, px + pw / 2, sy + pl, "built-up", TEX_SMOOTH,
                _pal(cv, "concrete"))
        piers.append((px, pw, pl))
    for px, pw, pl in piers:  # ships moored along the piers
        for side in (-1, 1):
            if rng.random() < 0.75:
                L = _uni(cv, 34, 80) * u * k
                W = 0.2 * L
                cv.place("ship", L, (px + side * (pw / 2 + 3 * u + W / 2),
                                     sy + 4 * u + L / 2 + _uni(cv, 0, max(1.0, pl - L))),
                         float(rng.choice([90.0, -90.0])), allowed=("water",), pad=1.0)
    _try(cv, int(rng.integers(1, 5)), 30, lambda: cv.place(
        "ship", _uni(cv, 28, 90) * u * k, (_uni(cv, -0.45, 0.45) * S, _uni(cv, sy / S + 0.05, 0.48) * S),
        _uni(cv, -90, 90), allowed=("water",)))
    if rng.random() < 0.5:
        _try(cv, int(rng.integers(1, 4)), 20, lambda: cv.place(
            "building", _uni(cv, 40, 80) * u * k, (_uni(cv, -0.4, 0.4) * S, _uni(cv, -0.45, sy / S - 0.14) * S),
            0.0, width=_uni(cv, 24, 36) * u * k, flat=True, allowed=("built-up", "bare soil")))
    else:
        D = _uni(cv, 18, 34) * u * k
        cx0, cy0 = _uni(cv, -0.35, 0.2) * S, _uni(cv, -0.42, sy / S - 0.18) * S
        for i in range(int(rng.integers(1, 5))):
            cv.place("storage tank", D, (cx0 + (i % 2) * D * 1.3, cy0 + (i // 2) * D * 1.3),
                     allowed=("built-up", "bare soil"))
    _try(cv, int(rng.integers(0, 3)), 10, lambda: cv.place(
        "vehicle", _uni(cv, 14, 22) * u, (_uni(cv, -0.45, 0.45) * S, road_y), 0.0, allowed=("road",)))


def residential(cv: Canvas, k: float) -> None:
    S, u, rng = cv.size, cv.u, cv.rng
    cv.rect(-BIG * S, -BIG * S, BIG * S, BIG * S, "vegetation", TEX_GRASS, _pal(cv, "grass"))
    asphalt = _pal(cv, "asphalt")
    ry = _uni(cv, -0.12, 0.12) * S
    rw = _uni(cv, 12, 17) * u
    cv.band([[-BIG * S, ry], [BIG * S, ry]], rw, "road", TEX_SMOOTH, asphalt)
    rx = None
    if rng.random() < 0.6:
        rx = _uni(cv, -0.3, 0.3) * S
        cv.band([[rx, -BIG * S], [rx, BIG * S]], rw, "road", TEX_SMOOTH, asphalt)
    L0 = _uni(cv, 26, 36) * u * k
    gap = _uni(cv, 8, 18) * u
    cands = []
    for side in (-1, 1):
        for row in (0, 1):
            W = 0.7 * L0
            yc = ry + side * (rw / 2 + _uni(cv, 7, 11) * u + W / 2 + row * (W + 34 * u))
            for x in np.arange(-0.5 * S + L0 / 2 + _uni(cv, 0, gap), 0.5 * S, L0 + gap):
                cands.append((x, yc, side))
    rng.shuffle(cands)
    target = int(rng.integers(4, 10))
    roof = cv.colour_for("building")
    placed = 0
    for x, y, side in cands:
        if placed >= target:
            break
        L = L0 * _uni(cv, 0.85, 1.15)
        col = roof if rng.random() < 0.55 else cv.colour_for("building")
        b = cv.place("building", L, (x, y), _uni(cv, -4, 4), colour=col, width=0.7 * L,
                     allowed=("vegetation",), pad=3.0)
        if b is None:
            continue
        placed += 1
        if rng.random() < 0.4:
            pl = _uni(cv, 13, 20) * u * max(k, 0.9)
            cv.place("swimming pool", pl, (x + _uni(cv, -0.3, 0.3) * L,
                                           y + side * (0.35 * L + pl * 0.35 + 6 * u)),
                     float(rng.choice([0.0, 90.0])), allowed=("vegetation",))
    _try(cv, int(rng.integers(0, 4)), 12, lambda: cv.place(
        "vehicle", _uni(cv, 13, 17) * u, (_uni(cv, -0.45, 0.45) * S, ry + rng.choice([-1, 1]) * rw / 4),
        0.0, allowed=("road",), pad=3.0))
    _trees(cv, int(rng.integers(8, 26)), ("vegetation",))


def industrial(cv: Canvas, k: float) -> None:
    S, u, rng = cv.size, cv.u, cv.rng
    cv.rect(-BIG * S, -BIG * S, BIG * S, BIG * S, "built-up", TEX_SMOOTH, _pal(cv, "concrete"))
    for _ in range(int(rng.integers(0, 3))):
        cv.region(_blob(rng, _uni(cv, -0.5, 0.5) * S, _uni(cv, -0.5, 0.5) * S, _uni(cv, 0.12, 0.25) * S),
                  "bare soil", TEX_SOIL, _pal(cv, "soil"))
    asphalt = _pal(cv, "asphalt")
    ry = _uni(cv, -0.2, 0.2) * S
    cv.band([[-BIG * S, ry], [BIG * S, ry]], _uni(cv, 12, 18) * u, "road", TEX_SMOOTH, asphalt)
    if rng.random() < 0.5:
        cv.band([[_uni(cv, -0.3, 0.3) * S, -BIG * S], [_uni(cv, -0.3, 0.3) * S, BIG * S]], 12 * u,
                "road", TEX_SMOOTH, asphalt)
    hall_col = ("grey", "white", "blue", "red")
    _try(cv, int(rng.integers(1, 4)), 30, lambda: cv.place(
        "building", _uni(cv, 56, 110) * u * k, (_uni(cv, -0.32, 0.32) * S, _uni(cv, -0.35, 0.35) * S),
        float(rng.choice([0.0, 90.0])), colour=str(rng.choice(hall_col, p=[0.4, 0.3, 0.2, 0.1])),
        width=_uni(cv, 32, 54) * u * k, flat=True, allowed=("built-up", "bare soil"), pad=5.0))
    n_tanks = int(rng.integers(2, 9))
    D = _uni(cv, 18, 40) * u * k
    cols = int(rng.integers(2, 4))
    tank_col = str(rng.choice(["white", "grey", "white", "green"]))
    for _ in range(20):
        cx0, cy0 = _uni(cv, -0.42, 0.3) * S, _uni(cv, -0.42, 0.3) * S
        if cv.count("storage tank") >= n_tanks:
            break
        for i in range(n_tanks - cv.count("storage tank")):
            col = tank_col if rng.random() < 0.85 else cv.colour_for("storage tank")
            cv.place("storage tank", D * _uni(cv, 0.92, 1.08),
                     (cx0 + (i % cols) * D * 1.35, cy0 + (i // cols) * D * 1.35), colour=col,
                     allowed=("built-up", "bare soil"), pad=1.5)
    _try(cv, int(rng.integers(0, 5)), 20, lambda: cv.place(
        "vehicle", _uni(cv, 16, 26) * u, (_uni(cv, -0.45, 0.45) * S, ry + _uni(cv, -4, 4) * u),
        float(rng.choice([0.0, 180.0])), allowed=("road",), pad=3.0))


def farmland(cv: Canvas, k: float) -> None:
    S, u, rng = cv.size, cv.u, cv.rng
    cv.rect(-BIG * S, -BIG * S, BIG * S, BIG * S, "bare soil", TEX_SOIL, _pal(cv, "soil"))
    edges = np.sort(np.concatenate([[-0.5, 0.5], rng.uniform(-0.4, 0.4, int(rng.integers(2, 5)))]))
    track = 4.0 * u
    last = 0
    for a, b in zip(edges[:-1], edges[1:]):
        ys = [-0.5, _uni(cv, -0.3, 0.3), 0.5] if rng.random() < 0.4 else [-0.5, 0.5]
        for c, d in zip(ys[:-1], ys[1:]):
            tex = int(rng.choice([TEX_ROWS_H, TEX_ROWS_V, TEX_ROWS_V, TEX_ROWS_D1, TEX_ROWS_D2,
                                  TEX_SOIL, TEX_GRASS]))
            # outer fields run past the image edge; inner edges leave a track between fields
            x1, y1 = (-BIG * S if v == -0.5 else v * S + track / 2 for v in (a, c))
            x2, y2 = (BIG * S if v == 0.5 else v * S - track / 2 for v in (b, d))
            crops = REGION_PALETTE["crop"]
            pick = (last + 1 + int(rng.integers(len(crops) - 1))) % len(crops)
            last = pick
            cv.rect(x1, y1, x2, y2, "agriculture", tex, jitter_rgb(rng, crops[pick], 6))
    yard = (_uni(cv, -0.3, 0.3) * S, _uni(cv, -0.3, 0.3) * S)
    cv.region(_blob(rng, yard[0], yard[1], _uni(cv, 34, 48) * u, irregular=0.15), "bare soil",
              TEX_SOIL, _pal(cv, "soil"))
    _try(cv, int(rng.integers(1, 4)), 25, lambda: cv.place(
        "building", _uni(cv, 18, 34) * u * k, (yard[0] + _uni(cv, -30, 30) * u, yard[1] + _uni(cv, -30, 30) * u),
        float(rng.choice([0.0, 90.0])), width=_uni(cv, 12, 20) * u * k, flat=rng.random() < 0.3,
        colour=str(rng.choice(["red", "grey", "grey", "white", "green"])), allowed=("bare soil",)))
    if rng.random() < 0.4:
        _try(cv, int(rng.integers(1, 3)), 15, lambda: cv.place(
            "storage tank", _uni(cv, 12, 18) * u * k, (yard[0] + _uni(cv, -32, 32) * u,
                                                       yard[1] + _uni(cv, -32, 32) * u),
            allowed=("bare soil",)))
    if rng.random() < 0.3:
        _try(cv, 1, 10, lambda: cv.place(
            "vehicle", _uni(cv, 15, 20) * u, (yard[0] + _uni(cv, -30, 30) * u, yard[1] + _uni(cv, -30, 30) * u),
            _uni(cv, -90, 90), allowed=("bare soil",)))
    _trees(cv, int(rng.integers(0, 6)), ("bare soil",))


def forest(cv: Canvas, k: float) -> None:
    S, u, rng = cv.size, cv.u, cv.rng
    cv.rect(-BIG * S, -BIG * S, BIG * S, BIG * S, "vegetation", TEX_CANOPY, _pal(cv, "canopy"))
    has_road = rng.random() < 0.65
    has_clear = (not has_road) or rng.random() < 0.5
    if has_road:
        xs = np.linspace(-BIG * S, BIG * S, 9)
        ys = _uni(cv, -0.25, 0.25) * S + _uni(cv, 10, 35) * u * np.sin(xs / S * _uni(cv, 2, 5))
        cv.band(np.stack([xs, ys], 1), _uni(cv, 10, 14) * u, "road", TEX_SOIL,
                _pal(cv, "soil"))
        _try(cv, int(rng.integers(1, 3)), 20, lambda: _on_line(
            cv, "vehicle", _uni(cv, 13, 18) * u, xs, ys, int(rng.integers(2, 7)), ("road",)))
    if has_clear:
        cc = (_uni(cv, -0.25, 0.25) * S, _uni(cv, -0.25, 0.25) * S)
        soil = rng.random() < 0.4
        cv.region(_blob(rng, cc[0], cc[1], _uni(cv, 34, 60) * u, irregular=0.25),
                  "bare soil" if soil else "vegetation", TEX_SOIL if soil else TEX_GRASS,
                  _pal(cv, "soil" if soil else "grass"))
        allowed = ("bare soil",) if soil else ("vegetation",)
        _try(cv, int(rng.integers(1, 3)), 25, lambda: cv.place(
            "building", _uni(cv, 16, 28) * u * k, (cc[0] + _uni(cv, -25, 25) * u, cc[1] + _uni(cv, -25, 25) * u),
            _uni(cv, -20, 20), width=_uni(cv, 11, 16) * u * k, allowed=allowed))


def parking_lot(cv: Canvas, k: float) -> None:
    S, u, rng = cv.size, cv.u, cv.rng
    surround = "grass" if rng.random() < 0.6 else "concrete"
    cv.rect(-BIG * S, -BIG * S, BIG * S, BIG * S, "vegetation" if surround == "grass" else "built-up",
            TEX_GRASS if surround == "grass" else TEX_SMOOTH, _pal(cv, surround))
    x1, x2 = _uni(cv, -0.46, -0.3) * S, _uni(cv, 0.3, 0.46) * S
    y1, y2 = _uni(cv, -0.42, -0.25) * S, _uni(cv, 0.25, 0.45) * S
    cv.rect(x1, y1, x2, y2, "road", TEX_SMOOTH, _pal(cv, "asphalt"))
    kk = min(k, 1.1)
    L = _uni(cv, 15, 19) * u * kk
    stall_w = L * _uni(cv, 0.62, 0.72)
    n_rows = 2 if (y2 - y1) < 3.2 * (2 * L + 14 * u) / 2 else 3
    row_ys = np.linspace(y1 + L * 0.75, y2 - L * 0.75, n_rows)
    slots = []
    for ryy in row_ys:
        for x in np.arange(x1 + stall_w, x2 - stall_w / 2, stall_w):
            cv.rect(x - 0.6 * u, ryy - L * 0.62, x + 0.6 * u, ryy + L * 0.62, None, TEX_SMOOTH,
                    WHITE_PAINT)
            slots.append((x + stall_w / 2, ryy))
    order = rng.permutation(len(slots))
    target = int(rng.integers(4, 10))
    got = 0
    for i in order:
        if got >= target:
            break
        x, y = slots[i]
        if cv.place("vehicle", L * _uni(cv, 0.92, 1.08), (x, y),
                    float(rng.choice([90.0, -90.0])) + _uni(cv, -4, 4), allowed=("road",),
                    pad=0.5):
            got += 1
    if rng.random() < 0.6:
        side = rng.choice([-1, 1])
        cv.place("building", _uni(cv, 70, 120) * u, (_uni(cv, -0.2, 0.2) * S,
                                                      (y1 - 26 * u) if side < 0 else (y2 + 26 * u)),
                 0.0, width=_uni(cv, 28, 40) * u, flat=True, pad=3.0)
    if surround == "grass":
        _trees(cv, int(rng.integers(4, 14)), ("vegetation",))


def river(cv: Canvas, k: float) -> None:
    S, u, rng = cv.size, cv.u, cv.rng
    cv.rect(-BIG * S, -BIG * S, BIG * S, BIG * S, "vegetation", TEX_GRASS, _pal(cv, "grass"))
    for _ in range(int(rng.integers(0, 3))):
        cx, cy = _uni(cv, -0.5, 0.5) * S, _uni(cv, -0.5, 0.5) * S
        if rng.random() < 0.5:
            cv.region(_blob(rng, cx, cy, _uni(cv, 0.15, 0.3) * S), "vegetation", TEX_CANOPY,
                      _pal(cv, "canopy"))
        else:
            cv.rect(cx - 0.2 * S, cy - 0.15 * S, cx + 0.2 * S, cy + 0.15 * S, "agriculture",
                    int(rng.choice([TEX_ROWS_H, TEX_ROWS_V])), _pal(cv, "crop", 6))
    xs = np.linspace(-BIG * S, BIG * S, 25)
    amp, freq, ph = _uni(cv, 5, 30) * u, _uni(cv, 1.5, 4.0), _uni(cv, 0, 6.28)
    y0 = _uni(cv, -0.12, 0.12) * S
    ys = y0 + amp * np.sin(xs / S * freq + ph)
    width = _uni(cv, 34, 62) * u
    line = np.stack([xs, ys], 1)
    n_br = 1 if rng.random() < 0.75 else 2
    bxs = [_uni(cv, -0.3, 0.3) * S] if n_br == 1 else [_uni(cv, -0.35, -0.12) * S, _uni(cv, 0.12, 0.35) * S]
    asphalt = _pal(cv, "asphalt")
    crossings = []
    for bx in bxs:
        by = y0 + amp * np.sin(bx / S * freq + ph)
        slope = amp * freq / S * np.cos(bx / S * freq + ph)
        ang = float(np.degrees(np.arctan(slope))) + 90.0
        d = np.array([np.cos(np.radians(ang)), np.sin(np.radians(ang))])
        cv.band([[bx - d[0] * S, by - d[1] * S], [bx + d[0] * S, by + d[1] * S]], 11 * u, "road",
                TEX_SMOOTH, asphalt)
        crossings.append((bx, by, ang, np.cos(np.arctan(slope))))
    cv.band(line, width + 8 * u, "bare soil", TEX_SOIL, _pal(cv, "soil"))
    cv.band(line, width, "water", TEX_WATER, _pal(cv, "water"))
    for bx, by, ang, c in crossings:
        cv.place("bridge", (width / max(c, 0.5)) + _uni(cv, 16, 26) * u, (bx, by), ang,
                 width=_uni(cv, 11, 16) * u, pad=1.0)
    _try(cv, int(rng.integers(0, 3)), 12, lambda: _on_line(
        cv, "ship", _uni(cv, 24, 38) * u * k, xs, ys, int(rng.integers(6, 19)), ("water",)))
    _try(cv, int(rng.integers(0, 3)), 12, lambda: cv.place(
        "building", _uni(cv, 18, 28) * u * k, (_uni(cv, -0.42, 0.42) * S, _uni(cv, -0.42, 0.42) * S),
        _uni(cv, -10, 10), allowed=("vegetation", "agriculture"), pad=3.0))
    _trees(cv, int(rng.integers(6, 20)), ("vegetation",))


def sports_field(cv: Canvas, k: float) -> None:
    S, u, rng = cv.size, cv.u, cv.rng
    cv.rect(-BIG * S, -BIG * S, BIG * S, BIG * S, "vegetation", TEX_GRASS, _pal(cv, "grass"))
    track = rng.random() < 0.55
    if track:
        L, W = _uni(cv, 150, 185) * u, _uni(cv, 82, 96) * u
        cx, cy = _uni(cv, -0.12, 0.12) * S, _uni(cv, -0.3, -0.1) * S
        cv.region(_stadium(cx, cy, L, W), "built-up", TEX_SMOOTH, _pal(cv, "track"))
        cv.reserve(_stadium(cx, cy, L, W))
        for f in (0.93, 0.86):
            cv.region(_stadium(cx, cy, L - (1 - f) * W, W * f), None, TEX_SMOOTH, (196, 110, 92))
            cv.region(_stadium(cx, cy, L - (1 - f) * W - 2 * u, W * f - 2 * u), None, TEX_SMOOTH,
                      _pal(cv, "track", 4))
        iw = W * 0.72
        cv.region(_stadium(cx, cy, L - W + iw, iw), "vegetation", TEX_GRASS, _pal(cv, "grass"))
        pl, pw = (L - W) * 0.95, iw * 0.8
        for x1, y1, x2, y2 in ((cx - pl / 2, cy - pw / 2, cx + pl / 2, cy - pw / 2 + u),
                               (cx - pl / 2, cy + pw / 2 - u, cx + pl / 2, cy + pw / 2),
                               (cx - pl / 2, cy - pw / 2, cx - pl / 2 + u, cy + pw / 2),
                               (cx + pl / 2 - u, cy - pw / 2, cx + pl / 2, cy + pw / 2),
                               (cx - 0.5 * u, cy - pw / 2, cx + 0.5 * u, cy + pw / 2)):
            cv.rect(x1, y1, x2, y2, None, TEX_SMOOTH, WHITE_PAINT)
    n_courts = int(rng.integers(1, 4)) if track else int(rng.integers(2, 7))
    Lc = _uni(cv, 38, 52) * u * k
    Wc = 0.55 * Lc
    col = cv.colour_for("tennis court")
    for _ in range(25):
        if cv.count("tennis court") > 0:
            break
        per_row = int(rng.integers(1, 4))
        x0 = _uni(cv, -0.42, 0.3) * S
        y0 = (_uni(cv, 0.05, 0.3) if track else _uni(cv, -0.4, 0.2)) * S
        pad_box = (x0 - Wc, y0 - Lc * 0.7, x0 + (per_row - 1) * (Wc + 2 * u) + Wc,
                   y0 + Lc * 0.7 + ((n_courts - 1) // per_row) * (Lc + 4 * u))
        corners = [[pad_box[0], pad_box[1]], [pad_box[2], pad_box[1]], [pad_box[2], pad_box[3]],
                   [pad_box[0], pad_box[3]]]
        if not cv.is_on(corners, ("vegetation",)):
            continue
        cv.rect(*pad_box, "built-up", TEX_SMOOTH, _pal(cv, "concrete"))
        for i in range(n_courts):
            cv.place("tennis court", Lc, (x0 + (i % per_row) * (Wc + 2 * u),
                                          y0 + (i // per_row) * (Lc + 4 * u)), 90.0,
                     colour=col, pad=0.5, allowed=("built-up",))
    if rng.random() < 0.5:
        _try(cv, 1, 15, lambda: cv.place(
            "building", _uni(cv, 30, 50) * u, (_uni(cv, -0.4, 0.4) * S, _uni(cv, -0.4, 0.4) * S),
            float(rng.choice([0.0, 90.0])), width=_uni(cv, 18, 26) * u, flat=True,
            allowed=("vegetation",), pad=4.0))
    if rng.random() < 0.3:
        _try(cv, 1, 15, lambda: cv.place(
            "swimming pool", _uni(cv, 30, 46) * u, (_uni(cv, -0.4, 0.4) * S, _uni(cv, -0.4, 0.4) * S),
            float(rng.choice([0.0, 90.0])), allowed=("vegetation",), pad=4.0))
    _try(cv, int(rng.integers(0, 4)), 12, lambda: cv.place(
        "vehicle", _uni(cv, 13, 17) * u, (_uni(cv, -0.45, 0.45) * S, _uni(cv, -0.45, 0.45) * S),
        float(rng.choice([0.0, 90.0])), allowed=("vegetation",), pad=2.0))
    _trees(cv, int(rng.integers(5, 16)), ("vegetation",))


def bare_land(cv: Canvas, k: float) -> None:
    S, u, rng = cv.size, cv.u, cv.rng
    tex = TEX_SCRUB if rng.random() < 0.5 else TEX_SOIL
    cv.rect(-BIG * S, -BIG * S, BIG * S, BIG * S, "bare soil", tex, _pal(cv, "soil"))
    for _ in range(int(rng.integers(1, 4))):
        cv.region(_blob(rng, _uni(cv, -0.5, 0.5) * S, _uni(cv, -0.5, 0.5) * S, _uni(cv, 0.1, 0.3) * S,
                        n=12, irregular=0.35), "bare soil", int(rng.choice([TEX_SOIL, TEX_SCRUB])),
                  _pal(cv, "soil", 10))
    if rng.random() < 0.3:
        cv.region(_blob(rng, _uni(cv, -0.4, 0.4) * S, _uni(cv, -0.4, 0.4) * S, _uni(cv, 0.06, 0.12) * S),
                  "vegetation", TEX_GRASS, _pal(cv, "dry_grass"))
    xs = np.linspace(-BIG * S, BIG * S, 9)
    ys = _uni(cv, -0.3, 0.3) * S + _uni(cv, 5, 40) * u * np.sin(xs / S * _uni(cv, 1, 4))
    cv.band(np.stack([xs, ys], 1), _uni(cv, 5, 8) * u, "bare soil", TEX_SOIL,
            jitter_rgb(rng, (188, 174, 146), 6))
    kinds = ["building", "vehicle", "storage tank", "building"]
    n = int(rng.integers(1, 4))
    while not cv.objects:
        for _ in range(n):
            cls = str(rng.choice(kinds))
            L = {"building": _uni(cv, 16, 34), "vehicle": _uni(cv, 14, 20),
                 "storage tank": _uni(cv, 14, 26)}[cls] * u * k
            _try(cv, 1, 10, lambda cls=cls, L=L: cv.place(
                cls, L, (_uni(cv, -0.42, 0.42) * S, _uni(cv, -0.42, 0.42) * S),
                _uni(cv, -90, 90), flat=rng.random() < 0.5, pad=6.0))


LAYOUTS: dict[str, tuple[Callable[[Canvas, float], None], float]] = {
    "airport": (airport, 0.35),
    "harbor": (harbor, 0.35),
    "residential": (residential, 0.3),
    "industrial": (industrial, 0.25),
    "farmland": (farmland, 0.0),
    "forest": (forest, 0.5),
    "parking lot": (parking_lot, 0.3),
    "river": (river, 0.5),
    "sports field": (sports_field, 0.3),
    "bare land": (bare_land, 0.5),
}
"""Scene class -> (layout function, probability of a free rotation on top of a right angle)."""
