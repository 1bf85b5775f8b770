"""Procedural aerial scenes with annotations: the embedded model's training and test data.

Why synthetic: no remote-sensing data set or pretrained RS-LVLM can be downloaded where the
embedded default is built (see docs/DESIGN "Embedded default"), so the project renders its own
top-down imagery.  Every scene is a pure function of a ``numpy.random.Generator``: the same seed
gives the same pixels and annotations, so training can render on the fly and any test sample can
be regenerated alone.

A scene has one of :data:`SCENE_CLASSES`, objects of :data:`OBJECT_CLASSES` with colour, size and
orientation attributes and axis-aligned pixel boxes, and a per-pixel land-cover map over
:data:`LAND_COVER_CLASSES`.  These names are knowledge-base entry names; keep them stable.

Run ``python -m engine.data.scene_generator --sheet docs/images/synthetic_scenes.png`` to draw a
contact sheet (one scene per class) and time the renderer.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from .canvas import LAND_COVER_CLASSES, MAX_PER_CLASS, Canvas
from .layouts import LAYOUTS, layout_angle
from .objects import OBJECT_CLASSES, ORIENTATION_NAMES, SIZE_NAMES, SceneObject
from .textures import COLOUR_NAMES

__all__ = [
    "SCENE_CLASSES", "OBJECT_CLASSES", "LAND_COVER_CLASSES", "COLOUR_NAMES", "SIZE_NAMES",
    "ORIENTATION_NAMES", "MAX_PER_CLASS", "SceneObject", "Scene", "generate_scene",
    "contact_sheet",
]

SCENE_CLASSES: tuple[str, ...] = (
    "airport", "harbor", "residential", "industrial", "farmland", "forest", "parking lot",
    "river", "sports field", "bare land",
)


@dataclass
class Scene:
    """One rendered scene and its annotations.

    ``land_cover`` holds indices into :data:`LAND_COVER_CLASSES`; ``land_cover_fractions`` maps
    every land-cover name to its share of the image; ``instances`` marks object ``i``'s painted
    pixels with ``i + 1`` (0 elsewhere).
    """

    image: np.ndarray
    scene_class: str
    objects: list[SceneObject]
    land_cover: np.ndarray
    land_cover_fractions: dict[str, float]
    instances: np.ndarray | None = field(default=None, repr=False)
    angle: float = 0.0

    @property
    def size(self) -> int:
        return int(self.image.shape[0])

    def counts(self) -> dict[str, int]:
        """Number of objects of every object class (zeros included)."""
        out = {c: 0 for c in OBJECT_CLASSES}
        for o in self.objects:
            out[o.cls] += 1
        return out

    def dominant_land_cover(self) -> str:
        return max(self.land_cover_fractions.items(), key=lambda kv: kv[1])[0]


def generate_scene(rng: np.random.Generator, scene_class: str | None = None,
                   render_size: int = 256) -> Scene:
    """Render one scene of ``scene_class`` (drawn uniformly when None) at ``render_size`` px.

    Deterministic in ``rng``'s state.  Every scene holds at least one object, so each one can
    serve a grounding instruction.
    """
    if scene_class is None:
        scene_class = SCENE_CLASSES[int(rng.integers(len(SCENE_CLASSES)))]
    if scene_class not in LAYOUTS:
        raise ValueError(f"unknown scene class {scene_class!r}; expected one of {SCENE_CLASSES}")
    if render_size < 32:
        raise ValueError("render_size must be at least 32 px")
    layout, free = LAYOUTS[scene_class]
    cv = None
    for _ in range(8):
        cv = Canvas(render_size, rng, layout_angle(rng, free))
        k = float(rng.uniform(0.85, 1.2))
        layout(cv, k)
        if cv.objects:
            break
    assert cv is not None
    image, lc, inst = cv.render()
    counts = np.bincount(lc.reshape(-1), minlength=len(LAND_COVER_CLASSES)).astype(np.float64)
    fr = counts / counts.sum()
    fractions = {name: round(float(fr[i]), 4) for i, name in enumerate(LAND_COVER_CLASSES)}
    return Scene(image=image, scene_class=scene_class, objects=cv.objects, land_cover=lc,
                 land_cover_fractions=fractions, instances=inst, angle=cv.angle)


def contact_sheet(seed: int = 0, render_size: int = 256, show_boxes: bool = False
                  ) -> Image.Image:
    """One scene per class in a 5 x 2 grid with its class name (for docs and eyeballing)."""
    cols, rows, pad, label_h = 5, 2, 6, 16
    w = cols * render_size + (cols + 1) * pad
    h = rows * (render_size + label_h) + (rows + 1) * pad
    sheet = Image.new("RGB", (w, h), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    for i, cls in enumerate(SCENE_CLASSES):
        scene = generate_scene(np.random.default_rng([seed, i]), cls, render_size)
        tile = Image.fromarray(scene.image)
        if show_boxes:
            d = ImageDraw.Draw(tile)
            for o in scene.objects:
                d.rectangle(o.box, outline=(255, 0, 255))
        x = pad + (i % cols) * (render_size + pad)
        y = pad + (i // cols) * (render_size + label_h + pad)
        sheet.paste(tile, (x, y + label_h))
        draw.text((x + 2, y + 2), cls, fill=(20, 20, 20))
    return sheet


def _time_render(n: int, render_size: int) -> float:
    """Mean milliseconds per scene over ``n`` scenes cycling through the classes."""
    generate_scene(np.random.default_rng(0), "forest", render_size)  # texture bank warm-up
    t0 = time.perf_counter()
    for i in range(n):
        generate_scene(np.random.default_rng([1, i]), SCENE_CLASSES[i % len(SCENE_CLASSES)],
                       render_size)
    return (time.perf_counter() - t0) * 1000.0 / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sheet", help="write a contact sheet PNG here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--boxes", action="store_true", help="draw object boxes on the sheet")
    ap.add_argument("--time", type=int, default=0, help="time this many scenes")
    ap.add_argument("--render-size", type=int, default=256)
    args = ap.parse_args(argv)
    if args.sheet:
        sheet = contact_sheet(args.seed, args.render_size, args.boxes)
        # 256 colours without dithering: visually the same, a third of the bytes in the repo
        sheet = sheet.quantize(colors=256, method=Image.Quantize.FASTOCTREE,
                               dither=Image.Dither.NONE)
        sheet.save(args.sheet, optimize=True)
        print(f"wrote {args.sheet}")
    if args.time:
        print(f"{_time_render(args.time, args.render_size):.2f} ms per scene "
              f"({args.render_size} px, {args.time} scenes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
