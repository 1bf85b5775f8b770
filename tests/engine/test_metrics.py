"""Metrics on hand-computed cases."""
from __future__ import annotations

import pytest

from engine.lab.metrics import (
    box_iou, caption_scores, classification_accuracy, grounding_scores, normalize_answer,
    vqa_accuracy,
)
from engine.grounding import GridBox


def test_vqa_accuracy_is_normalised_exact_match_overall_and_per_qtype():
    out = vqa_accuracy(["Yes.", "three", "Red", "the left"], ["yes", "3", "blue", "left"],
                       ["presence", "counting", "colour", "position"])
    assert out["overall"] == 0.75
    assert out["per_qtype"] == {"colour": 0.0, "counting": 1.0, "position": 1.0, "presence": 1.0}
    assert out["n"] == 4


def test_normalisation_unifies_spellings():
    assert normalize_answer("Gray") == normalize_answer("grey")
    assert normalize_answer("Center.") == "centre"
    assert normalize_answer("Built up") == "built-up"


def test_classification_accuracy():
    assert classification_accuracy(["Airport", "forest", "river"], ["airport", "harbor", "river"]) \
        == pytest.approx(2 / 3)


def test_box_iou_axis_aligned_and_rotated():
    assert box_iou(GridBox(0, 0, 10, 10), GridBox(5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert box_iou(GridBox(0, 0, 10, 10), GridBox(20, 20, 30, 30)) == 0.0
    # a 20x10 box turned by 90 degrees about its centre overlaps the original in a 10x10 square
    assert box_iou(GridBox(0, 0, 20, 10), GridBox(0, 0, 20, 10, 90)) == pytest.approx(1 / 3)
    # a square turned by +-45 degrees is the same diamond
    assert box_iou(GridBox(0, 0, 10, 10, 45), GridBox(0, 0, 10, 10, -45)) == pytest.approx(1.0)


def test_grounding_scores_match_greedily_per_sample():
    refs = [[GridBox(50, 50, 60, 60), GridBox(0, 0, 10, 20), GridBox(80, 80, 90, 90)],
            [GridBox(0, 0, 50, 50)]]
    preds = ["ship {<0><0><10><10>|0}{<50><50><60><60>|0}",
             "no boxes here"]
    out = grounding_scores(preds, refs)
    # IoUs of the references: 1.0, 0.5, 0 (no prediction left), 0 (no prediction)
    assert out["acc@0.5"] == pytest.approx(2 / 4)
    assert out["mean_iou"] == pytest.approx(1.5 / 4)
    # one prediction cannot serve two references
    one = grounding_scores(["{<0><0><10><10>}"], [[GridBox(0, 0, 10, 10), GridBox(0, 0, 10, 10)]])
    assert one["acc@0.5"] == 0.5


CAPS = ["an airport with 3 white airplanes parked near a runway",
        "a harbor with 2 ships on the water",
        "a forest with a grey vehicle on a forest road",
        "farmland with 2 buildings among crop fields"]


def test_caption_scores_identical_high_unrelated_low():
    same = caption_scores([c.upper() + "." for c in CAPS], [[c] for c in CAPS])
    assert same["bleu4"] > 0.99 and same["cider"] > 5
    other = caption_scores(CAPS[::-1], [[c] for c in CAPS])
    assert other["bleu4"] < 0.1 and other["cider"] < 0.5
    empty = caption_scores(["", ""], [["a b c"], ["d e f"]])
    assert empty["bleu4"] < 1e-3


def test_map_geometries_match_one_to_one_in_order_of_iou():
    from shapely.geometry import box

    from engine.lab.metrics import match_geometries

    truth = [box(0, 0, 10, 10), box(20, 0, 30, 10)]
    pred = [box(1, 0, 11, 10), box(0, 0, 10, 10), box(40, 0, 50, 10)]   # two claim the first object
    assert match_geometries(pred, truth) == 1
    assert match_geometries(pred + [box(20, 0, 29, 10)], truth) == 2
    assert match_geometries([box(0, 0, 10, 4)], truth) == 0               # IoU 0.4 < 0.5
