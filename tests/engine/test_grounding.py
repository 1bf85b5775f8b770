"""Grounding text format: GeoChat boxes on the 0-100 grid, formatted and parsed tolerantly."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.grounding import (
    GridBox,
    format_box,
    format_boxes,
    format_grounded,
    grid_to_pixels,
    parse_boxes,
    pixels_to_grid,
)


def test_format_box_writes_geochat_convention():
    assert format_box(GridBox(10, 20, 30, 40, 15)) == "{<10><20><30><40>|15}"


def test_format_box_without_angle_omits_bar():
    assert format_box(GridBox(10, 20, 30, 40, 15), with_angle=False) == "{<10><20><30><40>}"


def test_format_box_rounds_clamps_and_orders():
    assert format_box(GridBox(30.4, 140, -5, 19.5, 0)) == "{<0><20><30><100>|0}"


def test_round_trip_single_box():
    box = GridBox(10, 20, 30, 40, -45)
    assert parse_boxes(format_box(box)) == [box]


def test_round_trip_several_boxes():
    boxes = [GridBox(0, 0, 100, 100, 90), GridBox(5, 6, 7, 8, -90), GridBox(40, 41, 60, 61, 3)]
    text = format_boxes(boxes)
    assert "}{" in text
    assert parse_boxes(text) == boxes


def test_angle_is_optional_and_defaults_to_zero():
    assert parse_boxes("{<10><20><30><40>}") == [GridBox(10, 20, 30, 40, 0.0)]


def test_angle_in_angle_brackets_is_accepted():
    assert parse_boxes("{<10><20><30><40>|<45>}") == [GridBox(10, 20, 30, 40, 45.0)]


def test_negative_angle_parsed():
    assert parse_boxes("{<10><20><30><40>|-30}")[0].angle == -30.0


def test_angle_outside_range_is_folded_by_symmetry():
    assert parse_boxes("{<10><20><30><40>|120}")[0].angle == -60.0


def test_labels_taken_from_preceding_phrase():
    text = "airplane {<10><20><30><40>|0}{<50><50><60><60>|0}, ship {<1><2><3><4>|0}"
    boxes = parse_boxes(text)
    assert [b.label for b in boxes] == ["airplane", "airplane", "ship"]


def test_label_is_last_clause_before_boxes():
    boxes = parse_boxes("Sure. The large storage tank {<10><20><30><40>}")
    assert boxes[0].label == "The large storage tank"


def test_format_grounded_round_trips_labels():
    groups = [("airplane", [GridBox(10, 20, 30, 40), GridBox(50, 50, 60, 60)]),
              ("ship", [GridBox(1, 2, 3, 4, 10)])]
    text = format_grounded(groups)
    assert text == "airplane {<10><20><30><40>|0}{<50><50><60><60>|0}, ship {<1><2><3><4>|10}"
    parsed = parse_boxes(text)
    assert [(b.label, b.x1, b.angle) for b in parsed] == [
        ("airplane", 10, 0), ("airplane", 50, 0), ("ship", 1, 10)]


def test_unlabelled_boxes_have_empty_label():
    assert parse_boxes("{<10><20><30><40>}")[0].label == ""


def test_numbers_above_100_are_clamped():
    assert parse_boxes("{<10><20><300><400>}") == [GridBox(10, 20, 100, 100)]


def test_reversed_corners_are_ordered():
    assert parse_boxes("{<30><40><10><20>}") == [GridBox(10, 20, 30, 40)]


def test_missing_braces_still_parse():
    assert parse_boxes("<10><20><30><40>|5") == [GridBox(10, 20, 30, 40, 5)]


def test_zero_area_box_is_skipped():
    assert parse_boxes("{<10><20><10><40>}{<1><2><3><4>}") == [GridBox(1, 2, 3, 4)]


@pytest.mark.parametrize("text", ["", "no boxes here", "{", "}{", "{<10><20><30>}",
                                  "{<a><b><c><d>}", "<<<>>>|||", "{<10><20><30><4", None])
def test_garbage_gives_empty_list(text):
    assert parse_boxes(text) == []


def test_partial_output_keeps_valid_part():
    text = "tank {<10><20><30><40>|0}{<50><60><7"
    assert parse_boxes(text) == [GridBox(10, 20, 30, 40, 0, "tank")]


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parse_never_raises_on_random_text(text):
    for box in parse_boxes(text):
        assert 0 <= box.x1 < box.x2 <= 100
        assert 0 <= box.y1 < box.y2 <= 100
        assert -90 <= box.angle <= 90


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(*[st.integers(0, 100)] * 4, st.integers(-90, 90)), max_size=5))
def test_round_trip_random_boxes(raw):
    boxes = [GridBox(min(a, c), min(b, d), max(a, c), max(b, d), t)
             for a, b, c, d, t in raw if a != c and b != d]
    assert parse_boxes(format_boxes(boxes)) == boxes


def test_grid_to_pixels_is_exact_edge_scaling():
    assert grid_to_pixels(GridBox(0, 25, 100, 50, 30), 224, 200) == (0.0, 50.0, 224.0, 100.0, 30.0)


def test_pixels_to_grid_rounds_half_up():
    box = pixels_to_grid(1.0, 0.0, 199.0, 200.0, 0.0, 200, 200)
    assert (box.x1, box.x2) == (1.0, 100.0)  # 0.5 -> 1, 99.5 -> 100


def test_pixels_grid_round_trip_on_grid_values():
    box = GridBox(12, 34, 56, 78, -20)
    px = grid_to_pixels(box, 224, 224)
    assert pixels_to_grid(*px, 224, 224) == box


def test_a_vqa_answer_that_shows_its_evidence_first_reads_as_the_word_after_the_boxes():
    from engine.grounding import readable_text

    assert readable_text("{<40><12><52><20>|0} red", "vqa") == "red"
    assert readable_text("{<40><12><52><20>|0} and {<60><12><70><20>|0} left", "vqa") == "left"
    assert readable_text("yes", "vqa") == "yes"
