"""Training batches: the sample streams and the collator that turns samples into model tensors.

Why a module of its own: what a batch holds decides what the model learns (task mix, VQA types,
grounding references, detection targets), so it is written down in one place, apart from the
optimisation loop of :mod:`engine.lab.train`.

* :class:`SampleStream` renders scenes in a DataLoader worker and yields a fixed mix of samples
  per scene (e.g. one caption, three VQA questions, the first drawn colour/position/counting, two
  grounding questions, one classification) -- the mix a few thousand steps need so that no
  question type gets only a couple of thousand one-token answers.
* :class:`SceneStream` yields one sample per scene, for the detector's warm-up phase.
* :class:`Collator` left-pads prompts, writes grounding answers as reference slots
  (``airplane <obj0><obj1>``, see :mod:`engine.model.references`) with their boxes, builds the
  dense detection targets and the question-driven retrieval targets.
"""
from __future__ import annotations

import re
from typing import Iterator

import numpy as np
import torch

__all__ = ["SampleStream", "SceneStream", "Collator", "reference_answer", "evidence_answer", "follow_up_turn",
           "DEFAULT_TASK_MIX"]

DEFAULT_TASK_MIX: dict[str, int] = {"caption": 1, "vqa": 1, "ground": 1, "classify": 1}
_BOX_TEXT = re.compile(r"\{[^{}]*\}")


class SampleStream(torch.utils.data.IterableDataset):
    """An endless, deterministic stream of training samples rendered on the fly.

    Scenes are rendered in a DataLoader worker while the main process trains, so data costs no
    training time on two cores; a fresh scene for every few samples keeps a tiny model from
    memorising.  ``task_mix`` says how many samples of each task a scene gives; the first VQA
    sample of a scene draws its type from ``vqa_qtypes`` first, the others from all types.  Every
    ``follow_up_every``-th scene (0: never) asks its last VQA question as a follow-up, the
    scene's previous question and its readable answer written before it as an earlier turn, as
    the dock sends a follow-up: the model learns to answer the question asked now whatever came
    before (without such turns in training a follow-up was answered "1blue")."""

    def __init__(self, data_seed: int, n_scenes: int, image_size: int, start_scene: int = 0,
                 task_mix: dict[str, int] | None = None, vqa_qtypes: tuple[str, ...] | None = None,
                 follow_up_every: int = 0) -> None:
        self.data_seed, self.n_scenes, self.image_size, self.start_scene = data_seed, n_scenes, image_size, start_scene
        self.task_mix = dict(task_mix or DEFAULT_TASK_MIX)
        self.vqa_qtypes = tuple(vqa_qtypes) if vqa_qtypes else None
        self.follow_up_every = follow_up_every

    def __iter__(self) -> Iterator:
        from engine.data.instructions import VQA_QTYPES, SyntheticInstructionDataset, downsample, make_sample

        dataset = SyntheticInstructionDataset(seed=self.data_seed, n_scenes=self.n_scenes, image_size=self.image_size)
        qtypes = self.vqa_qtypes or VQA_QTYPES
        i = self.start_scene
        while True:
            scene, rng = dataset.scene(i % self.n_scenes)
            small = downsample(scene.image, self.image_size)
            earlier: list = []
            for task, n in self.task_mix.items():
                for j in range(n):
                    # the first VQA sample of a scene draws the oversampled types, the others any
                    sample = make_sample(scene, rng, task, small, qtypes=qtypes if j == 0 else VQA_QTYPES)
                    if self.follow_up_every and task == "vqa" and j == n - 1 and earlier \
                            and i % self.follow_up_every == 0:
                        sample.meta["history"] = [follow_up_turn(earlier[-1])]
                    earlier.append(sample)
                    yield sample
            i += 1


class SceneStream(SampleStream):
    """One classification sample per scene (its image and annotations feed the detector)."""

    def __init__(self, data_seed: int, n_scenes: int, image_size: int, start_scene: int = 0) -> None:
        super().__init__(data_seed + 104_729, n_scenes, image_size, start_scene, {"classify": 1})


def reference_answer(answer: str) -> tuple[str, int]:
    """``"airplane {<1><2><3><4>|0}{...}"`` -> ``("airplane <obj0><obj1>", 2)``: every box text
    becomes the slot token of its index (slot i = the sample's i-th box)."""
    count = [0]

    def repl(_: re.Match) -> str:
        count[0] += 1
        return f"<obj{count[0] - 1}>"

    return _BOX_TEXT.sub(repl, answer), count[0]


def follow_up_turn(sample) -> dict:
    """An earlier turn as the dock sends it: the question and the answer the analyst read."""
    from engine.grounding import readable_text

    return {"question": sample.question, "answer": readable_text(sample.answer, sample.task)}


def evidence_answer(answer: str, classes: list[str]) -> str:
    """``("red", ["ship"])`` -> ``"<obj0> red"``; ``("left", ["ship", "airplane"])`` ->
    ``"<obj0> and <obj1> left"`` (``classes``: the class of each object the answer is about).

    Why: an attribute answer is two steps, find the object the question describes (what
    grounding by reference already learns) and read its colour or place.  Written as a pointer
    first, the word is then read off the token the pointer names (object token k carries the
    embedding of ``<obj k>``), instead of being guessed in one step (measured: colour 0.29 while the
    detector's own colour head is right for 0.99 of the objects it finds).  Objects of one class
    are listed back to back; the objects of a relative-position question (two classes) are
    joined by "and" (consecutive references keep one class, see engine.model.references).
    Counting and comparison answers point the same way at the count token of each class they are
    about (``"<obj0> 3"``, slot 0 being a count slot, see engine.model.references.count_slot_box).
    The reader sees the word only: engine.grounding.readable_text keeps what follows the boxes."""
    joined = "".join(("" if i == 0 else " and " if cls != classes[i - 1] else "") + f"<obj{i}>"
                     for i, cls in enumerate(classes))
    return f"{joined} {answer}"


class Collator:
    """Turns samples into model tensors: images, left-padded token ids, labels, retrieval
    targets and, for an object-centric model, detection targets and reference slot boxes."""

    def __init__(self, tokenizer, config, knowledge, question_encoder) -> None:
        from engine.model.references import object_class_names

        self.tokenizer, self.config, self.knowledge = tokenizer, config, knowledge
        self.image_size = int(config.image_size)
        self.question_encoder = question_encoder
        self.object_centric = getattr(config, "vision_backbone", "vit") == "centernet"
        self.with_detection_targets = self.object_centric    # off when the detector is frozen
        self.vqa_references = self.object_centric and bool(getattr(config, "vqa_references", False))
        self.count_references = self.object_centric and bool(getattr(config, "count_references", False))
        self.class_index = {name: i for i, name in enumerate(object_class_names(config))}
        self._question_cache: dict[str, np.ndarray] = {}

    def question_embeds(self, questions: list[str]) -> torch.Tensor:
        missing = [q for q in dict.fromkeys(questions) if q not in self._question_cache]
        if missing:
            for q, v in zip(missing, self.question_encoder.encode(missing)):
                self._question_cache[q] = v
            if len(self._question_cache) > 200_000:
                self._question_cache.clear()
        return torch.from_numpy(np.stack([self._question_cache[q] for q in questions]))

    def detection_targets(self, samples: list):
        """Dense CenterNet targets from each sample's ``meta["objects"]`` and land-cover map."""
        from engine.model.detector import build_detection_targets

        cells = self.image_size // 8
        maps = []
        for s in samples:
            lc = s.meta.get("land_cover")
            if lc is None:
                maps.append(None)
                continue
            step = lc.shape[0] / cells
            idx = (np.arange(cells) * step + step / 2).astype(int)
            maps.append(lc[np.ix_(idx, idx)])
        objects = [torch.from_numpy(np.asarray(s.meta.get("objects", np.zeros((0, 7))), dtype=np.float32))
                   for s in samples]
        return build_detection_targets(objects, maps, self.config)

    def detector_batch(self, samples: list) -> dict:
        """Images and dense detection targets only (the detector's warm-up phase)."""
        from engine.model.image_processing import preprocess_images

        return {"pixel_values": preprocess_images([s.image for s in samples], self.image_size),
                "detection_targets": self.detection_targets(samples)}

    def __call__(self, samples: list) -> dict:
        from engine.model.image_processing import preprocess_images
        from engine.model.prompts import encode_example
        from engine.model.references import count_slot_box

        answers, slots = [], []
        for s in samples:
            answer = s.answer
            boxes, slot_boxes = [], []
            counted = [c for c in s.meta.get("count_classes", ()) if c in self.class_index]
            if self.object_centric and s.task == "ground" and s.boxes:
                answer, n = reference_answer(answer)
                boxes = s.boxes[:n]
            elif self.vqa_references and s.task == "vqa" and s.boxes:
                answer, boxes = evidence_answer(answer, [b.label for b in s.boxes]), s.boxes
            elif self.count_references and s.task == "vqa" and counted:
                answer = evidence_answer(answer, counted)
                slot_boxes = [count_slot_box(self.class_index[c]) for c in counted]
            slots.append(slot_boxes + [[b.x1 / 100, b.y1 / 100, b.x2 / 100, b.y2 / 100] for b in boxes])
            answers.append(answer)
        encoded = [encode_example(self.tokenizer, s.task, s.question, a, s.meta.get("history"))
                   for s, a in zip(samples, answers)]
        length = max(len(ids) for ids, _ in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(samples), length), pad, dtype=torch.long)
        labels = torch.full((len(samples), length), -100, dtype=torch.long)
        attention = torch.zeros((len(samples), length), dtype=torch.long)
        for row, (ids, labs) in enumerate(encoded):  # left padding, as in generation
            input_ids[row, length - len(ids):] = torch.tensor(ids)
            labels[row, length - len(labs):] = torch.tensor(labs)
            attention[row, length - len(ids):] = 1
        targets = {}
        n = len(self.knowledge.level_ids)
        for level in ("object", "region", "scene"):
            t = torch.zeros((len(samples), n))
            for row, s in enumerate(samples):
                for name in s.knowledge_targets.get(level, []):
                    try:
                        idx = self.knowledge.id_of_name(name, level)
                    except KeyError:        # a user's class the knowledge base has no entry for
                        continue
                    if idx >= 0:
                        t[row, idx] = 1.0
            targets[level] = t
        batch = {"pixel_values": preprocess_images([s.image for s in samples], self.image_size),
                 "input_ids": input_ids, "attention_mask": attention, "labels": labels,
                 "question_embeds": self.question_embeds([s.question for s in samples]),
                 "retrieval_targets": targets}
        if self.object_centric:
            if self.with_detection_targets:
                batch["detection_targets"] = self.detection_targets(samples)
            width = max([1] + [len(r) for r in slots])
            boxes = torch.full((len(samples), width, 4), -1.0)
            for row, r in enumerate(slots):
                if r:
                    boxes[row, :len(r)] = torch.tensor(r)
            batch["slot_boxes"] = boxes
        return batch
