"""The ask vocabulary: one task-token rule for every backend, readable answers, bounded params."""
from __future__ import annotations

import argparse

import pytest

from engine.backends.llava import build_instruction
from engine.errors import EngineError
from engine.grounding import readable_text
from engine.model.prompts import build_prompt
from engine.protocol.schema import (ASK_FIELDS, MAX_HISTORY_TURNS, MAX_QUESTION_CHARS, AskParams, ScanParams,
                                    add_arguments, params_from_args)
from engine.tasks import canonical_task, split_task_token


@pytest.mark.parametrize("phrase", ["airplanes", "the largest ship", "Locate all airplanes."])
def test_bare_phrase_and_task_tokened_question_give_the_same_embedded_prompt(phrase):
    assert build_prompt("ground", phrase) == build_prompt("ground", f"[grounding] {phrase}")


@pytest.mark.parametrize("phrase", ["airplanes", "the largest ship", "Locate all airplanes."])
def test_bare_phrase_and_task_tokened_question_give_the_same_llava_instruction(phrase):
    assert build_instruction("ground", phrase) == build_instruction("ground", f"[grounding] {phrase}")


def test_a_task_token_is_written_once():
    assert build_prompt("ground", "[grounding] Locate all airplanes.").count("[grounding]") == 1
    instruction, _ = build_instruction("ground", "[grounding] airplanes")
    assert instruction == "[refer] Give me the location of <p> airplanes </p>"


def test_unknown_bracketed_words_stay_in_the_question():
    assert split_task_token("[draft] where are the ships?") == (None, "[draft] where are the ships?")
    assert split_task_token("[refer] the red car") == ("refer", "the red car")


def test_task_aliases_name_the_protocol_tasks():
    assert [canonical_task(n) for n in ("ask", "Detect", "describe", "classification")] == \
        ["vqa", "ground", "caption", "classify"]
    with pytest.raises(ValueError, match="choose one of"):
        canonical_task("paint")


def test_readable_text_replaces_box_syntax_by_counts():
    raw = "airplane {<29><18><45><31>|0}{<50><50><60><60>|0}, storage tank {<1><2><3><4>|0}"
    assert readable_text(raw) == "2 airplanes, 1 storage tank"
    assert readable_text("Two airplanes {<29><18><45><31>|0} near the terminal.") == "Two airplanes near the terminal."
    assert readable_text("a harbour with ships") == "a harbour with ships"


def test_a_captions_grounded_phrases_stay_prose():
    raw = "an airport with two airplanes {<29><18><45><31>|0}{<50><50><60><60>|0}. a white vehicle {<1><2><3><4>|0}"
    assert readable_text(raw, "caption") == "an airport with two airplanes. a white vehicle"


def test_history_is_bounded_and_checked():
    turn = {"question": "how many ships are there?", "answer": "3"}
    assert AskParams.from_dict({"raster": "x.tif", "history": [turn]}).history == [turn]
    for bad in ([turn] * (MAX_HISTORY_TURNS + 1), [{"question": 1, "answer": "x"}], "turns"):
        with pytest.raises(EngineError) as info:
            AskParams.from_dict({"raster": "x.tif", "history": bad})
        assert info.value.code == "bad_request" and "history" in info.value.message


def test_an_over_long_question_is_refused_before_any_work():
    with pytest.raises(EngineError) as info:
        AskParams.from_dict({"raster": "x.tif", "task": "vqa", "question": "a" * (MAX_QUESTION_CHARS + 1)})
    assert info.value.code == "bad_request" and str(MAX_QUESTION_CHARS) in info.value.message


@pytest.mark.parametrize("params", [{"raster": "x.tif", "bbox": [0, 0, float("nan"), 1]},
                                    {"raster": "x.tif", "region_wkt": ""},
                                    {"raster": "x\x00.tif"}])
def test_non_finite_boxes_empty_wkt_and_nul_paths_are_bad_requests(params):
    with pytest.raises(EngineError) as info:
        AskParams.from_dict(params)
    assert info.value.code == "bad_request"


def test_cli_flags_are_built_from_the_same_table():
    parser = argparse.ArgumentParser()
    add_arguments(parser, ASK_FIELDS)
    args = parser.parse_args(["--raster", "r.tif", "--bbox", "1", "2", "3", "4", "--bbox-crs", "EPSG:4326",
                              "--task", "ground", "--question", "storage tanks"])
    params = params_from_args(args, ASK_FIELDS)
    assert params["bbox"] == [1.0, 2.0, 3.0, 4.0] and params["region_crs"] == "EPSG:4326"
    checked = AskParams.from_dict(params)
    assert (checked.task, checked.question, checked.max_tokens) == ("ground", "storage tanks", 64)


def test_scan_params_need_an_output_and_a_scan_task():
    assert ScanParams.from_dict({"raster": "x.tif", "out": "o.gpkg"}).task == "ground"
    for bad in ({"raster": "x.tif"}, {"raster": "x.tif", "out": "o.gpkg", "task": "vqa"},
                {"raster": "x.tif", "out": "o.gpkg", "tile": 2}):
        with pytest.raises(EngineError):
            ScanParams.from_dict(bad)


def test_numbers_beyond_any_float_and_lone_surrogates_are_handled_at_the_edge():
    with pytest.raises(EngineError) as info:
        AskParams.from_dict({"raster": "x.tif", "bbox": [0, 0, 10 ** 400, 1]})
    assert info.value.code == "bad_request" and "finite" in info.value.message
    with pytest.raises(EngineError):
        ScanParams.from_dict({"raster": "x.tif", "out": "o.gpkg", "min_score": 10 ** 400})
    checked = AskParams.from_dict({"raster": "x.tif", "task": "vqa", "question": "ships\ud800?",
                                   "history": [{"question": "q\udfff", "answer": "a"}]})
    assert checked.question == "ships\ufffd?" and checked.history[0]["question"] == "q\ufffd"
    checked.question.encode("utf-8")
