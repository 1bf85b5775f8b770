"""Procedural aerial scenes: deterministic by seed, every class renders, annotations match pixels."""
from __future__ import annotations

import time

import numpy as np
import pytest

from engine.data.objects import orientation_name, size_name
from engine.data.scene_generator import (
    COLOUR_NAMES, LAND_COVER_CLASSES, MAX_PER_CLASS, OBJECT_CLASSES, ORIENTATION_NAMES,
    SCENE_CLASSES, SIZE_NAMES, generate_scene,
)


def test_same_seed_gives_identical_scene_and_other_seed_differs():
    a = generate_scene(np.random.default_rng([3, 1]), "harbor")
    b = generate_scene(np.random.default_rng([3, 1]), "harbor")
    c = generate_scene(np.random.default_rng([3, 2]), "harbor")
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.land_cover, b.land_cover)
    assert a.objects == b.objects
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("scene_class", SCENE_CLASSES)
def test_every_class_renders_objects_inside_image_with_boxes_enclosing_their_pixels(scene_class):
    for seed in range(3):
        scene = generate_scene(np.random.default_rng([11, seed]), scene_class)
        size = scene.size
        assert scene.image.shape == (size, size, 3) and scene.image.dtype == np.uint8
        assert scene.scene_class == scene_class
        assert scene.objects, "every scene has something to ground"
        for i, o in enumerate(scene.objects):
            x1, y1, x2, y2 = o.box
            assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
            assert o.cls in OBJECT_CLASSES and o.colour in COLOUR_NAMES
            assert o.size in SIZE_NAMES and o.orientation in ORIENTATION_NAMES
            ys, xs = np.nonzero(scene.instances == i + 1)
            assert len(xs) > 0, f"{o.cls} {i} is not visible"
            # every painted pixel [i, i + 1) touches the box ...
            assert xs.min() + 1 >= x1 and xs.max() <= x2
            assert ys.min() + 1 >= y1 and ys.max() <= y2
            # ... and the box is tight around them (to the pixel grid)
            assert xs.min() <= x1 + 1 and xs.max() + 1 >= x2 - 1
            assert ys.min() <= y1 + 1 and ys.max() + 1 >= y2 - 1
            assert max(x2 - x1, y2 - y1) >= 12 * size / 256, "visible at 128 px input"
        assert max(scene.counts().values()) <= MAX_PER_CLASS


def test_land_cover_fractions_describe_the_label_map():
    scene = generate_scene(np.random.default_rng(5), "river")
    assert set(scene.land_cover_fractions) == set(LAND_COVER_CLASSES)
    assert abs(sum(scene.land_cover_fractions.values()) - 1.0) < 1e-3
    water = float(np.mean(scene.land_cover == LAND_COVER_CLASSES.index("water")))
    assert scene.land_cover_fractions["water"] == pytest.approx(water, abs=1e-3)
    assert water > 0.05


def test_attributes_follow_geometry():
    assert size_name(0.001) == "small" and size_name(0.01) == "medium"
    assert size_name(0.05) == "large"
    assert orientation_name(5) == "horizontal" and orientation_name(-170) == "horizontal"
    assert orientation_name(88) == "vertical" and orientation_name(-45) == "diagonal"


def test_scene_layouts_differ_in_land_cover():
    dom = {c: generate_scene(np.random.default_rng([2, i]), c).dominant_land_cover()
           for i, c in enumerate(SCENE_CLASSES)}
    assert dom["forest"] == "vegetation" and dom["farmland"] == "agriculture"
    assert dom["bare land"] == "bare soil" and dom["industrial"] == "built-up"


def test_unknown_scene_class_is_refused():
    with pytest.raises(ValueError):
        generate_scene(np.random.default_rng(0), "volcano")


def test_rendering_is_fast_enough_for_on_the_fly_training():
    generate_scene(np.random.default_rng(0), "forest")  # texture bank warm-up
    t0 = time.perf_counter()
    for i in range(20):
        generate_scene(np.random.default_rng([9, i]), SCENE_CLASSES[i % 10])
    assert (time.perf_counter() - t0) / 20 < 0.06  # ~6 ms typical; generous for shared CPUs
