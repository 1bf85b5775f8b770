"""Caption templates at three detail levels, built from a scene's annotations.

Why every template variant is returned: a caption has no single right wording, so the chosen
answer is one random template while ``references`` holds all variants of the same detail level;
BLEU/CIDEr are then computed against the full set, like the several human captions per image of
COCO-style benchmarks.  Content (scene, counts, majority colours, land cover) is deterministic
given the annotations, so the content itself is learnable.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from .scene_generator import OBJECT_CLASSES, Scene, SceneObject

__all__ = ["SCENE_NOUN", "LC_CAPTION", "count_phrase", "caption_for"]

SCENE_NOUN: dict[str, str] = {
    "airport": "an airport", "harbor": "a harbor", "residential": "a residential area",
    "industrial": "an industrial area", "farmland": "farmland", "forest": "a forest",
    "parking lot": "a parking lot", "river": "a river", "sports field": "a sports field",
    "bare land": "bare land",
}
LC_CAPTION: dict[str, str] = {
    "water": "water", "vegetation": "vegetation", "built-up": "built-up area",
    "road": "paved surface", "bare soil": "bare soil", "agriculture": "agricultural land",
}
# The object class a caption leads with, per scene (first one present wins).
_MAIN: dict[str, tuple[str, ...]] = {
    "airport": ("airplane",), "harbor": ("ship",), "residential": ("building",),
    "industrial": ("storage tank", "building"), "farmland": ("building",),
    "forest": ("vehicle", "building"), "parking lot": ("vehicle",), "river": ("bridge",),
    "sports field": ("tennis court",), "bare land": (),
}
_CONTEXT: dict[tuple[str, str], str] = {
    ("airport", "airplane"): " parked near a runway", ("harbor", "ship"): " on the water",
    ("residential", "building"): " along the streets", ("farmland", "building"): " among crop fields",
    ("forest", "vehicle"): " on a forest road", ("forest", "building"): " in a clearing",
    ("parking lot", "vehicle"): " parked in rows", ("river", "bridge"): " crossing the water",
    ("bare land", "building"): " on open ground", ("bare land", "vehicle"): " on open ground",
    ("bare land", "storage tank"): " on open ground",
}
_QUESTIONS: dict[str, tuple[str, ...]] = {
    "brief": ("Describe this image briefly.", "Give a short caption for this image.",
              "[caption] Summarise the scene in a few words."),
    "medium": ("Describe this image.", "Write a caption for this image.",
               "What does this image show?"),
    "detailed": ("Describe this image in detail.", "Give a detailed description of this scene.",
                 "[caption] Describe everything you see in this image."),
}


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def count_phrase(objs: list[SceneObject]) -> str:
    """'a white airplane', '3 white airplanes' or '3 airplanes' (colour only when two thirds of
    the objects share it)."""
    n = len(objs)
    cls = objs[0].cls
    colour, k = Counter(o.colour for o in objs).most_common(1)[0]
    adj = f"{colour} " if k * 3 >= n * 2 else ""
    if n == 1:
        word = adj + cls
        return ("an " if word[0] in "aeiou" else "a ") + word
    return f"{n} {adj}{cls}s"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _groups(scene: Scene) -> dict[str, list[SceneObject]]:
    g: dict[str, list[SceneObject]] = {}
    for o in scene.objects:
        g.setdefault(o.cls, []).append(o)
    return g


def _main_class(scene: Scene, groups: dict[str, list[SceneObject]]) -> str | None:
    for c in _MAIN[scene.scene_class]:
        if c in groups:
            return c
    if not groups:
        return None
    return max(groups, key=lambda c: (len(groups[c]), -OBJECT_CLASSES.index(c)))


def caption_for(scene: Scene, level: str, rng: np.random.Generator
                ) -> tuple[str, str, list[str]]:
    """(question, answer, references) for a caption at ``level`` brief|medium|detailed."""
    noun = SCENE_NOUN[scene.scene_class]
    if level == "brief":
        refs = [f"An aerial image of {noun}.", f"{_cap(noun)} seen from above.",
                f"A top-down view of {noun}."]
    else:
        groups = _groups(scene)
        main = _main_class(scene, groups)
        if main is None:
            heads = [f"{_cap(noun)}.", f"This image shows {noun}."]
        else:
            cp = count_phrase(groups[main]) + _CONTEXT.get((scene.scene_class, main), "")
            heads = [f"{_cap(noun)} with {cp}.", f"This image shows {noun} with {cp}."]
        if level == "medium":
            refs = heads
        elif level == "detailed":
            others = [count_phrase(groups[c]) for c in OBJECT_CLASSES if c in groups and c != main]
            ranked = sorted(scene.land_cover_fractions.items(), key=lambda kv: -kv[1])
            dom = LC_CAPTION[ranked[0][0]]
            extra = f", with some {LC_CAPTION[ranked[1][0]]}" if ranked[1][1] >= 0.15 else ""
            tails_obj = ([f" There are also {_join(others)}.", f" It also contains {_join(others)}."]
                         if others else ["", ""])
            tails_lc = [f" The main land cover is {dom}{extra}.",
                        f" Most of the area is {dom}{extra}."]
            refs = [h + o + lc for h in heads for o, lc in zip(tails_obj, tails_lc)]
            refs += [h + o + lc for h in heads for o, lc in zip(tails_obj, tails_lc[::-1])]
            refs = list(dict.fromkeys(refs))
        else:
            raise ValueError(f"unknown caption level {level!r}")
    qs = _QUESTIONS[level]
    return qs[int(rng.integers(len(qs)))], refs[int(rng.integers(len(refs)))], refs
