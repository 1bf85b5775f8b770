"""Multi-level instruction samples (caption, VQA, grounding, classification) from scene annotations.

Why built from annotations: every answer is computed from the same objects and land-cover map that
were rendered, so it is correct by construction, and answers are short and canonical (a class
name, a digit, yes/no, a colour, one position word, GeoChat box text) so that exact-match scoring
means something.  Question phrasings vary (several templates per type) so the model must read the
question rather than memorise one string.

Grid boxes are always relative to the whole image (0-100), hence independent of the resolution the
model sees.  ``SyntheticInstructionDataset`` renders scene ``i`` from ``default_rng([seed, i])`` so
any item can be regenerated alone; ``iter_samples`` draws evaluation samples from a separate stream
(tagged :data:`EVAL_STREAM`) so an evaluation split never repeats a training scene of the same seed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from engine.grounding import GridBox, format_grounded, pixels_to_grid, position_word
from .captions import SCENE_NOUN, caption_for
from .scene_generator import (
    COLOUR_NAMES, LAND_COVER_CLASSES, OBJECT_CLASSES, SCENE_CLASSES, SIZE_NAMES, Scene, SceneObject,
    generate_scene,
)

__all__ = [
    "TASKS", "VQA_QTYPES", "EVAL_STREAM", "Sample", "object_grid_box", "position_word",
    "knowledge_targets", "named_classes", "object_annotations", "make_sample", "make_samples", "SyntheticInstructionDataset",
    "iter_samples", "plural", "article",
]

TASKS: tuple[str, ...] = ("caption", "vqa", "ground", "classify")
VQA_QTYPES: tuple[str, ...] = (
    "presence", "counting", "colour", "position", "comparison", "scene", "land_cover",
)
"""VQA question types (``Sample.qtype`` of vqa samples); other tasks use qtype ``caption_brief``,
``caption_medium``, ``caption_detailed``, ``ground_all``, ``ground_ref`` and ``classify``."""

EVAL_STREAM = 1_000_003
"""Extra seed word of evaluation scenes, keeping them apart from training scenes."""

LC_PHRASE = {"water": "water", "vegetation": "vegetation", "built-up": "built-up area",
             "road": "road", "bare soil": "bare soil", "agriculture": "agricultural land"}


@dataclass
class Sample:
    """One instruction: image, task, question, canonical answer and what it is about.

    ``knowledge_targets`` names the knowledge-base entries that are relevant per level ("scene":
    the scene class, "object": object classes present, "region": land covers over 10 %), the
    supervision for retrieval; ``boxes`` are the answer's grid boxes (ground task) or the boxes of
the objects a colour / position answer is about (vqa);
    ``references`` are all acceptable answers (several caption templates) for caption metrics.
    """

    image: np.ndarray
    task: str
    question: str
    answer: str
    qtype: str
    knowledge_targets: dict[str, list[str]]
    boxes: list[GridBox] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def plural(cls: str) -> str:
    return cls + "s"


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def object_grid_box(obj: SceneObject, image_size: int, oriented: bool = False) -> GridBox:
    """The object's box on the 0-100 grid: axis-aligned (angle 0), or oriented (its unrotated
    length x width about its centre plus its angle) when ``oriented``."""
    if not oriented:
        x1, y1, x2, y2 = obj.box
        return pixels_to_grid(x1, y1, x2, y2, 0.0, image_size, image_size, obj.cls)
    cx, cy = obj.centre
    return pixels_to_grid(cx - obj.length / 2, cy - obj.width / 2, cx + obj.length / 2,
                          cy + obj.width / 2, obj.angle, image_size, image_size, obj.cls)


def named_classes(question: str, classes: tuple[str, ...] = OBJECT_CLASSES) -> list[str]:
    """The classes a question names ("How many airplanes ...?" -> ["airplane"])."""
    q = question.lower()
    return [c for c in classes if re.search(rf"\b{re.escape(c)}s?\b", q)]


def knowledge_targets(scene: Scene, question: str = "") -> dict[str, list[str]]:
    """Knowledge-base entries relevant to the question about the scene, per semantic level.

    Why the question decides: retrieval trained to find *any* present class settles on the
    commonest (building, vehicle) whatever is asked.  The object level's targets are the object
    classes the question names, the region level's the land covers it names; a question naming
    none (captions, scene questions) targets what is present (objects, land cover over 10 %).
    The scene level's target is always the scene class."""
    present = {o.cls for o in scene.objects}
    lc_named = [c for c in LAND_COVER_CLASSES
                if re.search(rf"\b{re.escape(LC_PHRASE[c].split()[0])}\b", question.lower())]
    return {
        "scene": [scene.scene_class],
        "object": named_classes(question) or [c for c in OBJECT_CLASSES if c in present],
        "region": lc_named or [c for c in LAND_COVER_CLASSES if scene.land_cover_fractions.get(c, 0.0) > 0.1],
    }


def object_annotations(scene: Scene) -> np.ndarray:
    """(n, 7) float32 rows of normalised x1, y1, x2, y2 and the class, colour and size indices
    of every object: the detector's dense supervision."""
    size = float(scene.size)
    rows = [[o.box[0] / size, o.box[1] / size, o.box[2] / size, o.box[3] / size, OBJECT_CLASSES.index(o.cls),
             COLOUR_NAMES.index(o.colour) if o.colour in COLOUR_NAMES else -1,
             SIZE_NAMES.index(o.size) if o.size in SIZE_NAMES else -1] for o in scene.objects]
    return np.asarray(rows, dtype=np.float32).reshape(-1, 7)


def _by_class(scene: Scene) -> dict[str, list[SceneObject]]:
    out: dict[str, list[SceneObject]] = {}
    for o in scene.objects:
        out.setdefault(o.cls, []).append(o)
    return out


def _single_out(objs: list[SceneObject], rng: np.random.Generator, allow_colour: bool = True
                ) -> tuple[str, SceneObject] | None:
    """A referring expression that picks exactly one object of a class, and that object."""
    cls = objs[0].cls
    if len(objs) == 1:
        o = objs[0]
        extra = [w for w, ok in ((o.size, rng.random() < 0.3),
                                 (o.colour, allow_colour and rng.random() < 0.3)) if ok]
        return " ".join(extra + [cls]), o
    options: list[Callable[[], tuple[str, SceneObject] | None]] = []

    def unique(key: Callable[[SceneObject], tuple]) -> list[tuple[str, SceneObject]]:
        groups: dict[tuple, list[SceneObject]] = {}
        for o in objs:
            groups.setdefault(key(o), []).append(o)
        return [(" ".join(k + (cls,)), g[0]) for k, g in groups.items() if len(g) == 1]

    def pick(key: Callable[[SceneObject], tuple]) -> Callable[[], tuple[str, SceneObject] | None]:
        def f() -> tuple[str, SceneObject] | None:
            cands = unique(key)
            return cands[int(rng.integers(len(cands)))] if cands else None
        return f

    areas = sorted(objs, key=lambda o: o.area)

    def extreme() -> tuple[str, SceneObject] | None:
        if areas[-1].area >= 1.3 * areas[-2].area and rng.random() < 0.6:
            return f"largest {cls}", areas[-1]
        if areas[1].area >= 1.3 * areas[0].area:
            return f"smallest {cls}", areas[0]
        if areas[-1].area >= 1.3 * areas[-2].area:
            return f"largest {cls}", areas[-1]
        return None

    if allow_colour:
        options += [pick(lambda o: (o.colour,)), pick(lambda o: (o.size, o.colour))]
    options += [pick(lambda o: (o.size,)), extreme]
    for i in rng.permutation(len(options)):
        got = options[int(i)]()
        if got is not None:
            return got
    return None


# --- VQA ------------------------------------------------------------------------------------

QA = tuple[str, str] | tuple[str, str, list[SceneObject]]
"""(question, answer) or (question, answer, the objects the answer is about): colour and
position answers name their objects, which training writes as references before the word."""


def _presence(scene: Scene, rng: np.random.Generator) -> QA | None:
    counts = scene.counts()
    want = rng.random() < 0.5
    pool = [c for c in OBJECT_CLASSES if (counts[c] > 0) == want]
    if not pool:
        return None
    c = pool[int(rng.integers(len(pool)))]
    q = [f"Is there {article(c)} {c} in the image?", f"Are there any {plural(c)} in this image?",
         f"Does this image contain {article(c)} {c}?", f"Can you see {article(c)} {c}?"]
    return q[int(rng.integers(len(q)))], "yes" if want else "no"


def _counting(scene: Scene, rng: np.random.Generator) -> QA:
    counts = scene.counts()
    present = [c for c in OBJECT_CLASSES if counts[c] > 0]
    absent = [c for c in OBJECT_CLASSES if counts[c] == 0]
    pool = present if (rng.random() < 0.85 or not absent) and present else absent
    c = pool[int(rng.integers(len(pool)))]
    q = [f"How many {plural(c)} are there?", f"How many {plural(c)} can you see in the image?",
         f"Count the {plural(c)}.", f"What is the number of {plural(c)} in this image?"]
    return q[int(rng.integers(len(q)))], str(min(9, counts[c]))


def _colour(scene: Scene, rng: np.random.Generator) -> QA | None:
    groups = _by_class(scene)
    for c in rng.permutation(sorted(groups)):
        objs = groups[str(c)]
        if len(objs) >= 2 and len({o.colour for o in objs}) == 1 and rng.random() < 0.35:
            return f"What colour are the {plural(str(c))}?", objs[0].colour, list(objs)
        got = _single_out(objs, rng, allow_colour=False)
        if got is not None:
            desc, o = got
            q = [f"What colour is the {desc}?", f"What is the colour of the {desc}?",
                 f"Which colour does the {desc} have?"]
            return q[int(rng.integers(len(q)))], o.colour, [o]
    return None


def _position(scene: Scene, rng: np.random.Generator) -> QA | None:
    groups = _by_class(scene)
    singled = []
    for c in sorted(groups):
        got = _single_out(groups[c], rng)
        if got is not None:
            singled.append(got)
    if not singled:
        return None
    order = rng.permutation(len(singled))
    if len(singled) >= 2 and rng.random() < 0.5:
        (d1, o1), (d2, o2) = singled[int(order[0])], singled[int(order[1])]
        dx = (o1.centre[0] - o2.centre[0]) / scene.size
        dy = (o1.centre[1] - o2.centre[1]) / scene.size
        if abs(dx) >= 0.1 and abs(dx) >= abs(dy):
            return f"Is the {d1} left or right of the {d2}?", "left" if dx < 0 else "right", [o1, o2]
        if abs(dy) >= 0.1:
            return f"Is the {d1} above or below the {d2}?", "above" if dy < 0 else "below", [o1, o2]
    for i in order:
        desc, o = singled[int(i)]
        word = position_word(o.centre[0], o.centre[1], scene.size)
        if word is not None:
            q = [f"Where is the {desc} in the image?", f"In which part of the image is the {desc}?",
                 f"Where is the {desc}? Answer top, bottom, left, right or centre."]
            return q[int(rng.integers(len(q)))], word, [o]
    return None


def _comparison(scene: Scene, rng: np.random.Generator) -> QA | None:
    counts = scene.counts()
    present = [c for c in OBJECT_CLASSES if counts[c] > 0]
    if not present:
        return None
    a = present[int(rng.integers(len(present)))]
    others = [c for c in OBJECT_CLASSES if c != a and counts[c] != counts[a]]
    if not others:
        return None
    b = others[int(rng.integers(len(others)))]
    if rng.random() < 0.5:
        a, b = b, a
    if rng.random() < 0.7:
        return f"Are there more {plural(a)} than {plural(b)}?", "yes" if counts[a] > counts[b] else "no"
    return f"Are there fewer {plural(a)} than {plural(b)}?", "yes" if counts[a] < counts[b] else "no"


def _scene_q(scene: Scene, rng: np.random.Generator) -> QA:
    if rng.random() < 0.6:
        q = SCENE_QUESTIONS
        return q[int(rng.integers(len(q)))], scene.scene_class
    other = scene.scene_class if rng.random() < 0.5 else str(rng.choice(SCENE_CLASSES))
    return f"Is this {SCENE_NOUN[other]}?", "yes" if other == scene.scene_class else "no"


def _land_cover(scene: Scene, rng: np.random.Generator) -> QA | None:
    fr = scene.land_cover_fractions
    ranked = sorted(fr.items(), key=lambda kv: -kv[1])
    if rng.random() < 0.55 and ranked[0][1] - ranked[1][1] >= 0.05:
        q = ["What is the dominant land cover?", "Which land cover type covers most of the image?",
             "What land cover is most common in this image?"]
        return q[int(rng.integers(len(q)))], ranked[0][0]
    for name in rng.permutation(LAND_COVER_CLASSES):
        f = fr[str(name)]
        if f >= 0.05 or f < 0.002:
            return f"Is there any {LC_PHRASE[str(name)]} in this image?", "yes" if f >= 0.05 else "no"
    return None


_VQA: dict[str, Callable[[Scene, np.random.Generator], QA | None]] = {
    "presence": _presence, "counting": _counting, "colour": _colour, "position": _position,
    "comparison": _comparison, "scene": _scene_q, "land_cover": _land_cover,
}


# --- grounding ------------------------------------------------------------------------------

def _ground(scene: Scene, rng: np.random.Generator, oriented: bool
            ) -> tuple[str, str, str, list[GridBox]]:
    groups = _by_class(scene)
    size = scene.size
    classes = sorted(groups)
    if rng.random() < 0.5:
        for c in rng.permutation(classes):
            got = _single_out(groups[str(c)], rng)
            if got is not None:
                desc, o = got
                box = object_grid_box(o, size, oriented)
                q = [f"[refer] Where is the {desc}?", f"[refer] Give the location of the {desc}.",
                     f"[refer] Locate the {desc}.", f"the {desc}", f"{desc}"]
                return (q[int(rng.integers(len(q)))], format_grounded([(o.cls, [box])]),
                        "ground_ref", [box])
    small = [c for c in classes if len(groups[c]) <= 4]
    if small:
        c = small[int(rng.integers(len(small)))]
        boxes = [object_grid_box(o, size, oriented)
                 for o in sorted(groups[c], key=lambda o: (o.box[1], o.box[0]))]
        if len(boxes) == 1:
            q = [f"[grounding] Locate the {c}.", f"[grounding] Where is the {c}?", c, f"the {c}"]
        else:
            q = [f"[grounding] Locate all {plural(c)}.", f"[grounding] Where are the {plural(c)}?",
                 f"[grounding] Find every {c} in the image.", plural(c), f"all {plural(c)}"]
        return q[int(rng.integers(len(q)))], format_grounded([(c, boxes)]), "ground_all", boxes
    o = max(scene.objects, key=lambda o: o.area)  # fallback: the largest object of its class
    box = object_grid_box(o, size, oriented)
    return (f"[refer] Where is the largest {o.cls}?", format_grounded([(o.cls, [box])]),
            "ground_ref", [box])


# --- samples --------------------------------------------------------------------------------

SCENE_QUESTIONS: tuple[str, ...] = (
    "What type of scene is this?", "What kind of area is shown in this image?", "What type of place is this?",
    "Which scene category best describes this image?", "Which scene class does this image belong to?",
    "What is the scene category of this image?", "What is this place?", "What kind of scene is shown?",
    "Classify this image.", "What does this area look like: which scene class?",
)
"""Scene-class questions, shared by the classify task and the VQA scene type: a wording learnt
in one task is understood in the other (measured: wordings seen only in one task failed)."""
_CLASSIFY_Q = SCENE_QUESTIONS + ("[classify] What is the scene category of this image?",)


def make_sample(scene: Scene, rng: np.random.Generator, task: str,
                image: np.ndarray | None = None, oriented: bool = False,
                qtypes: tuple[str, ...] = VQA_QTYPES) -> Sample:
    """One sample of ``task`` about ``scene``; ``image`` replaces the scene's image (e.g. the
    downsampled model input) and grid boxes do not depend on it.  A VQA sample draws its type
    from ``qtypes`` first (training oversamples colour, position and counting this way)."""
    img = scene.image if image is None else image
    sample = _make_sample(scene, rng, task, img, oriented, qtypes)
    sample.knowledge_targets = knowledge_targets(scene, sample.question)
    sample.meta.update(scene_class=scene.scene_class, asked_classes=named_classes(sample.question),
                       objects=object_annotations(scene), land_cover=scene.land_cover)
    return sample


def _make_sample(scene: Scene, rng: np.random.Generator, task: str, img: np.ndarray, oriented: bool,
                 qtypes: tuple[str, ...]) -> Sample:
    if task == "classify":
        q = _CLASSIFY_Q[int(rng.integers(len(_CLASSIFY_Q)))]
        return Sample(img, task, q, scene.scene_class, "classify", {})
    if task == "caption":
        level = str(rng.choice(["brief", "medium", "detailed"], p=[0.25, 0.4, 0.35]))
        q, answer, refs = caption_for(scene, level, rng)
        return Sample(img, task, q, answer, f"caption_{level}", {}, references=refs)
    if task == "vqa":
        for qt in list(rng.permutation(qtypes)) + list(rng.permutation(VQA_QTYPES)):
            qa = _VQA[str(qt)](scene, rng)
            if qa is not None:
                about = qa[2] if len(qa) > 2 else []
                meta = {}
                if qt in ("counting", "comparison"):   # the classes whose counts answer it, as asked
                    meta["count_classes"] = sorted(named_classes(qa[0]), key=lambda c: qa[0].lower().find(c))
                return Sample(img, task, qa[0], qa[1], str(qt), {}, meta=meta,
                              boxes=[object_grid_box(o, scene.size, oriented) for o in about])
        raise AssertionError("presence questions are always possible")  # pragma: no cover
    if task == "ground":
        q, answer, qtype, boxes = _ground(scene, rng, oriented)
        return Sample(img, task, q, answer, qtype, {}, boxes=boxes)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def make_samples(scene: Scene, rng: np.random.Generator, image: np.ndarray | None = None,
                 oriented: bool = False) -> list[Sample]:
    """One sample of each task (caption, vqa, ground, classify) with random templates."""
    return [make_sample(scene, rng, t, image, oriented) for t in TASKS]


def downsample(image: np.ndarray, image_size: int) -> np.ndarray:
    """Resize to the model input with an area (box) filter; read-only, since samples share it."""
    if image.shape[0] == image_size and image.shape[1] == image_size:
        out = image
    else:
        flt = Image.BOX if image_size < image.shape[0] else Image.BILINEAR
        out = np.asarray(Image.fromarray(image).resize((image_size, image_size), flt))
    out = np.ascontiguousarray(out)
    out.flags.writeable = False
    return out


def _balanced_class(seed: int, i: int, stream: tuple[int, ...]) -> str:
    """Scene classes in shuffled blocks of ten: exact balance in every block of ten indices."""
    n = len(SCENE_CLASSES)
    perm = np.random.default_rng([seed, i // n, *stream, 77]).permutation(n)
    return SCENE_CLASSES[int(perm[i % n])]


class SyntheticInstructionDataset:
    """Indexable, torch-free dataset: item ``i`` is the list of samples of scene ``i``.

    Scene ``i`` is rendered from ``np.random.default_rng([seed, i])`` at ``render_size`` and
    downsampled to ``image_size``; scene classes are balanced in every block of ten indices.
    """

    def __init__(self, seed: int, n_scenes: int, image_size: int = 128, render_size: int = 256,
                 oriented: bool = False) -> None:
        self.seed, self.n_scenes = int(seed), int(n_scenes)
        self.image_size, self.render_size, self.oriented = image_size, render_size, oriented

    def __len__(self) -> int:
        return self.n_scenes

    def scene_class(self, i: int) -> str:
        return _balanced_class(self.seed, i, ())

    def scene(self, i: int) -> tuple[Scene, np.random.Generator]:
        """The full-resolution scene of item ``i`` and the generator positioned after it."""
        if not 0 <= i < self.n_scenes:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, i])
        return generate_scene(rng, self.scene_class(i), self.render_size), rng

    def __getitem__(self, i: int) -> list[Sample]:
        if i < 0:
            i += self.n_scenes
        scene, rng = self.scene(i)
        small = downsample(scene.image, self.image_size)
        samples = make_samples(scene, rng, small, self.oriented)
        for s in samples:
            s.meta["index"] = i
        return samples

    def __iter__(self) -> Iterator[list[Sample]]:
        for i in range(self.n_scenes):
            yield self[i]


def iter_samples(seed: int, n: int, image_size: int = 128, render_size: int = 256,
                 oriented: bool = False) -> Iterator[Sample]:
    """Exactly ``n`` evaluation samples, tasks in turn (balanced), one fresh scene each.

    Scenes come from ``default_rng([seed, k, EVAL_STREAM])``: a stream no training dataset uses.
    Each run of four consecutive samples (one per task) shares a scene class, and classes are
    balanced in blocks of ten such runs, so every task sees every class equally often.
    """
    for k in range(n):
        rng = np.random.default_rng([seed, k, EVAL_STREAM])
        cls = _balanced_class(seed, k // len(TASKS), (EVAL_STREAM,))
        scene = generate_scene(rng, cls, render_size)
        s = make_sample(scene, rng, TASKS[k % len(TASKS)], downsample(scene.image, image_size),
                        oriented)
        s.meta["index"] = k
        yield s
