"""Instruction samples: answers agree with the annotations, boxes round-trip, datasets reproduce."""
from __future__ import annotations

import re

import numpy as np
import pytest

from engine.data.captions import SCENE_NOUN, caption_for
from engine.data.instructions import (
    TASKS, VQA_QTYPES, SyntheticInstructionDataset, iter_samples, knowledge_targets, make_sample, make_samples,
    named_classes, object_grid_box, position_word,
)
from engine.data.scene_generator import OBJECT_CLASSES, SCENE_CLASSES, generate_scene
from engine.grounding import format_box, grid_to_pixels, parse_boxes


def _scenes(n=30, seed=4):
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        yield generate_scene(rng, SCENE_CLASSES[i % len(SCENE_CLASSES)]), rng


def _class_in(question):
    # longest class name first ("storage tank" before "tank")
    for c in sorted(OBJECT_CLASSES, key=len, reverse=True):
        if re.search(rf"\b{c}s?\b", question):
            return c
    raise AssertionError(question)


def test_make_samples_gives_one_sample_per_task_with_knowledge_targets():
    scene, rng = next(_scenes(1))
    samples = make_samples(scene, rng)
    assert [s.task for s in samples] == list(TASKS)
    for s in samples:
        assert s.knowledge_targets["scene"] == [scene.scene_class]
        named = named_classes(s.question)
        assert set(s.knowledge_targets["object"]) == (set(named) or {o.cls for o in scene.objects})
        assert all(scene.land_cover_fractions[r] > 0.1 for r in s.knowledge_targets["region"])
    assert samples[3].answer == scene.scene_class


def test_retrieval_targets_follow_the_classes_the_question_names():
    scene, _ = next(_scenes(1))
    targets = knowledge_targets(scene, "How many airplanes are there?")
    assert targets["object"] == ["airplane"] and targets["scene"] == [scene.scene_class]


def test_scene_questions_are_shared_by_classify_and_vqa():
    seen_classify, seen_vqa = set(), set()
    for scene, rng in _scenes(60):
        seen_classify.add(make_sample(scene, rng, "classify").question)
        s = make_sample(scene, rng, "vqa", qtypes=("scene",))
        if s.qtype == "scene":
            seen_vqa.add(s.question)
    assert "What type of scene is this?" in seen_classify & seen_vqa


def test_vqa_answers_agree_with_annotations():
    seen = set()
    for scene, rng in _scenes(40):
        counts = scene.counts()
        for _ in range(6):
            s = make_sample(scene, rng, "vqa")
            assert s.qtype in VQA_QTYPES
            seen.add(s.qtype)
            if s.qtype == "counting":
                assert s.answer == str(counts[_class_in(s.question)])
            elif s.qtype == "presence":
                assert s.answer == ("yes" if counts[_class_in(s.question)] else "no")
            elif s.qtype == "comparison":
                a, b = re.match(r"Are there (more|fewer) (.+?)s than (.+?)s\?", s.question).group(2, 3)
                more = s.question.startswith("Are there more")
                want = counts[a] > counts[b] if more else counts[a] < counts[b]
                assert s.answer == ("yes" if want else "no")
            elif s.qtype == "colour":
                objs = [o for o in scene.objects if o.cls == _class_in(s.question)]
                if "largest" in s.question:
                    objs = [max(objs, key=lambda o: o.area)]
                elif "smallest" in s.question:
                    objs = [min(objs, key=lambda o: o.area)]
                elif len(objs) > 1 and not s.question.startswith("What colour are"):
                    objs = [o for o in objs if o.size in s.question.split()]
                assert {o.colour for o in objs} == {s.answer}
            elif s.qtype == "scene" and s.answer not in ("yes", "no"):
                assert s.answer == scene.scene_class
            elif s.qtype == "position":
                assert s.answer in {"top", "bottom", "left", "right", "centre", "above", "below"}
            elif s.qtype == "land_cover" and s.answer not in ("yes", "no"):
                assert s.answer == scene.dominant_land_cover()
    assert seen == set(VQA_QTYPES)


def test_colour_and_position_answers_carry_the_boxes_of_the_objects_they_are_about():
    checked = 0
    for scene, rng in _scenes(40):
        boxes = {format_box(object_grid_box(o, scene.size)): o for o in scene.objects}
        for _ in range(6):
            s = make_sample(scene, rng, "vqa", qtypes=("colour", "position"))
            if s.qtype == "colour":
                about = [boxes[format_box(b)] for b in s.boxes]
                assert about and {o.colour for o in about} == {s.answer}
                assert {o.cls for o in about} == {_class_in(s.question)}
                checked += 1
            elif s.qtype == "position":
                relative = "left or right of" in s.question or "above or below" in s.question
                assert len(s.boxes) == (2 if relative else 1)
                checked += 1
            else:
                assert s.boxes == []
    assert checked > 100


def test_ground_answers_hold_the_objects_boxes_and_round_trip():
    kinds = set()
    for scene, rng in _scenes(20):
        for _ in range(3):
            s = make_sample(scene, rng, "ground")
            kinds.add(s.qtype)
            assert 1 <= len(s.boxes) <= 4
            parsed = parse_boxes(s.answer)
            assert [(b.x1, b.y1, b.x2, b.y2, b.angle) for b in parsed] == \
                   [(b.x1, b.y1, b.x2, b.y2, b.angle) for b in s.boxes]
            label = parsed[0].label
            assert label in OBJECT_CLASSES
            truth = [object_grid_box(o, scene.size) for o in scene.objects if o.cls == label]
            for b in s.boxes:
                assert any(format_box(b) == format_box(t) for t in truth)
                x1, y1, x2, y2, _ = grid_to_pixels(b, scene.size, scene.size)
                assert any(abs(x1 - o.box[0]) <= 1.3 and abs(y2 - o.box[3]) <= 1.3
                           for o in scene.objects if o.cls == label)
    assert kinds == {"ground_all", "ground_ref"}


def test_oriented_boxes_carry_the_object_angle():
    scene = generate_scene(np.random.default_rng(8), "harbor")
    ship = next(o for o in scene.objects if o.cls == "ship")
    b = object_grid_box(ship, scene.size, oriented=True)
    assert b.angle == round(ship.angle)
    assert (b.x1 + b.x2) / 2 == pytest.approx(ship.centre[0] / scene.size * 100, abs=0.6)


def test_position_words():
    assert position_word(128, 128, 256) == "centre"
    assert position_word(20, 128, 256) == "left" and position_word(128, 240, 256) == "bottom"
    assert position_word(20, 20, 256) is None  # a corner is ambiguous
    assert position_word(22, 20, 256, decided=True) == "top"  # an answer must still say something


def test_detailed_captions_name_the_scene_and_count_every_class():
    for scene, rng in _scenes(10):
        q, answer, refs = caption_for(scene, "detailed", rng)
        assert answer in refs and SCENE_NOUN[scene.scene_class] in answer.lower()
        for cls, n in scene.counts().items():
            if n == 1:
                assert re.search(rf"\ban? (\w+ )?{cls}\b", answer), answer
            elif n > 1:
                assert re.search(rf"\b{n} (\w+ )?{cls}s\b", answer), answer
            else:
                assert not re.search(rf"\b{cls}", answer)


def test_dataset_items_are_reproducible_alone_and_class_balanced():
    ds = SyntheticInstructionDataset(seed=3, n_scenes=20)
    first = [ds[i] for i in range(10)]
    assert sorted(s[3].answer for s in first) == sorted(SCENE_CLASSES)
    again = SyntheticInstructionDataset(seed=3, n_scenes=20)[7]
    assert [(s.question, s.answer) for s in again] == [(s.question, s.answer) for s in first[7]]
    assert np.array_equal(again[0].image, first[7][0].image)
    assert first[0][0].image.shape == (128, 128, 3)


def test_iter_samples_gives_exactly_n_balanced_over_tasks():
    samples = list(iter_samples(seed=5, n=10))
    assert len(samples) == 10
    assert [s.task for s in samples[:4]] == list(TASKS)
    assert sum(s.task == "vqa" for s in samples) == 3
    train = SyntheticInstructionDataset(seed=5, n_scenes=1)[0][0].image
    assert not np.array_equal(samples[0].image, train)
