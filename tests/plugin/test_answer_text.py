"""Answers as people read them: the model's box syntax never reaches the text."""
from __future__ import annotations

from rs_lvlm_qgis.answer_text import count_phrase, plural, readable_answer, strip_boxes

RAW = "airplane {<10><20><30><40>|0}{<50><50><60><60>|0}, ship {<1><2><3><4>|0}"
BOXES = [{"label": "airplane"}, {"label": "airplane"}, {"label": "ship"}]


def test_boxes_are_removed_from_a_sentence():
    assert strip_boxes("There are 2 airplanes {<29><18><45><31>|0}{<1><2><3><4>|0}.") == \
        "There are 2 airplanes."


def test_boxes_without_braces_or_angle_brackets_are_removed():
    assert strip_boxes("[grounding] ship <1><2><3><4>|<5>") == "ship"


def test_broken_boxes_a_small_model_writes_are_removed():
    assert strip_boxes("1<47>|0") == "1"


def test_comparisons_in_text_are_kept():
    assert strip_boxes("x < 5 and y > 3") == "x < 5 and y > 3"


def test_a_box_cut_off_by_the_token_stream_is_hidden_while_streaming():
    assert strip_boxes("ship {<29><1", streaming=True) == "ship"


def test_found_objects_read_as_counts():
    assert readable_answer({"task": "ground", "text": RAW, "boxes": BOXES}) == \
        "2 airplanes, 1 ship"


def test_a_clean_engine_text_is_shown_as_is():
    assert readable_answer({"task": "ground", "text": "2 airplanes", "raw": RAW,
                            "boxes": BOXES}) == "2 airplanes"


def test_other_tasks_keep_their_words_without_the_boxes():
    assert readable_answer({"task": "caption", "text": "this {<1><2><3><4>|0} is a port",
                            "boxes": [{"label": "this"}]}) == "this is a port"


def test_plurals_of_object_names():
    assert [plural("storage tank", 3), plural("bus", 2), plural("factory", 2),
            plural("airplane", 1)] == ["3 storage tanks", "2 buses", "2 factories", "1 airplane"]
    assert count_phrase(BOXES) == "2 airplanes, 1 ship"
