"""The weighted, resumable training mix over data sets in published formats."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from test_dataset_eval import save_image, voc_xml

from engine.data.mixed_stream import MixedStream, Source, parse_sources


@pytest.fixture
def sources(tmp_path) -> list[Source]:
    scenes = tmp_path / "UCM"
    for folder in ("beach", "forest"):
        for k in range(2):
            save_image(scenes / folder / f"{k}.png", k + 10 * len(folder))
    dior = tmp_path / "DIOR"
    save_image(dior / "JPEGImages" / "1.jpg", 1, 200, "JPEG")
    voc_xml(dior / "Annotations" / "1.xml", "1.jpg", [("vehicle", (20, 40, 60, 100), "The vehicle on the left."),
                                                     ("ship", (100, 100, 160, 160), "the ship at the bottom")])
    (dior / "train.txt").write_text("0 1")
    return [Source(f"ucm:{scenes}", 3.0), Source(f"dior-rsvg:{dior}", 1.0)]


def test_sources_are_drawn_in_proportion_to_their_weights(sources):
    draws = Counter(s for s, _ in MixedStream(sources, seed=1).positions(0, 2000))
    assert draws[0] / 2000 == pytest.approx(0.75, abs=0.03)


def test_no_item_of_a_source_repeats_before_the_source_is_exhausted(sources):
    positions = MixedStream(sources, seed=2).positions(0, 400)
    scene_items = [i for s, i in positions if s == 0]
    for epoch in range(len(scene_items) // 4):
        assert sorted(scene_items[4 * epoch:4 * epoch + 4]) == [0, 1, 2, 3]


def test_a_resumed_stream_continues_with_the_sample_where_it_stopped(sources):
    stream = MixedStream(sources, seed=3, image_size=32)
    whole = list(stream.samples(0, 12, chunk=5))
    resumed = list(MixedStream(sources, seed=3, image_size=32).samples(7, 5, chunk=5))
    assert [(s.meta["key"], s.answer) for s in resumed] == [(s.meta["key"], s.answer) for s in whole[7:]]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(resumed, whole[7:]))


def test_samples_ask_the_evaluators_questions_with_the_references_as_answers(sources):
    samples = {s.meta["key"]: s for s in MixedStream(sources, seed=4, image_size=32).samples(0, 40)}
    vehicle = samples["1#0"]
    assert (vehicle.task, vehicle.question) == ("ground", "[refer] Give the location of the vehicle on the left.")
    assert vehicle.answer == "vehicle {<10><20><30><50>|0}" and vehicle.knowledge_targets["object"] == ["vehicle"]
    beach = samples["beach/0.png"]
    assert beach.task == "classify" and beach.answer == "beach"
    assert beach.question.startswith("Classify the image within one of the given classes: agricultural, airplane,")


def test_config_entries_give_weights_and_splits_and_refuse_non_positive_weights():
    (a, b) = parse_sources(["ucm:/data/UCM", {"dataset": "rsvqa:/data/LR", "weight": 2, "split": "val"}])
    assert (a.weight, a.split) == (1.0, "train") and (b.spec, b.weight, b.split) == ("rsvqa:/data/LR", 2.0, "val")
    with pytest.raises(ValueError, match="positive"):
        parse_sources([{"dataset": "ucm:/x", "weight": 0}])
