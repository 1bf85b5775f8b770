"""The answer grammar: references fit what the question says, plural requests list the class,
attribute answers say what the pointed detection shows (engine.model.referring)."""
from __future__ import annotations

import pytest
import torch

from engine.model.referring import AnswerGrammar, Description, Vocabulary, asked_attribute, describe
from engine.model.tokenizer import load_tokenizer
from engine.paths import DEFAULT_MODEL_DIR

VOCAB = Vocabulary(("airplane", "ship", "storage tank", "vehicle", "building"),
                   ("white", "red", "blue", "green", "grey", "yellow"), ("small", "medium", "large"))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="module")
def start(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<obj0>")


def grammar(tokenizer, start, question: str, *, vqa: bool = False, level: str = "evidence") -> AnswerGrammar:
    g = AnswerGrammar(question, VOCAB, tokenizer, start, first_class_from_question=vqa, level=level,
                      attribute=asked_attribute(question) if vqa else None)
    # four detections: two buildings (a small red one on the left, a large grey one on the
    # right), a ship at the top, a filler vehicle
    boxes = torch.tensor([[[0.05, 0.40, 0.15, 0.50], [0.60, 0.40, 0.90, 0.70],
                           [0.45, 0.02, 0.55, 0.10], [0.0, 0.0, 0.1, 0.1]]])
    g.bind(boxes, torch.tensor([[0.9, 0.8, 0.7, 0.1]]), torch.tensor([[4, 4, 1, 3]]),
           colours=torch.tensor([[1, 4, 0, 0]]), sizes=torch.tensor([[0, 2, 1, 0]]))
    return g


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_description_keeps_the_colour_size_and_extreme_words_before_each_class():
    got = describe("Is the small red building left or right of the largest ship?", VOCAB)
    assert got == [Description(4, colour=1, size=0), Description(1, extreme="largest")]


def test_a_plural_or_all_makes_a_request_for_every_object_of_the_class():
    assert [d.plural for d in describe("storage tanks", VOCAB)] == [True]
    assert [d.plural for d in describe("[grounding] Find every vehicle in the image.", VOCAB)] == [True]
    assert [d.plural for d in describe("the storage tank", VOCAB)] == [False]


def test_the_question_says_which_attribute_it_asks_for():
    assert asked_attribute("What colour is the largest ship?") == "colour"
    assert asked_attribute("Is the ship left or right of the airplane?") == "side"
    assert asked_attribute("Is the ship above or below the airplane?") == "height"
    assert asked_attribute("In which part of the image is the red building?") == "place"
    assert asked_attribute("How many ships are there?") == "count"
    assert asked_attribute("Are there more ships than airplanes?") == "more"
    assert asked_attribute("Are there fewer ships than airplanes?") == "fewer"
    assert asked_attribute("Is there a ship?") is None


def test_an_opening_reference_prefers_the_detection_fitting_the_whole_description(tokenizer, start):
    g = grammar(tokenizer, start, "[refer] Where is the small red building?")
    masks = g.preferred(0, ids(tokenizer, "building "), 4)
    assert masks[0].tolist() == [True, False, False, False]           # red and small
    assert masks[1].tolist() == [True, True, False, False]            # then any building


def test_largest_picks_the_largest_sure_detection_of_the_class(tokenizer, start):
    g = grammar(tokenizer, start, "the largest building")
    assert g.preferred(0, ids(tokenizer, "building "), 4)[0].tolist() == [False, True, False, False]


def test_at_the_classes_level_only_the_class_is_held(tokenizer, start):
    g = grammar(tokenizer, start, "the small red building", level="classes")
    assert [m.tolist() for m in g.preferred(0, ids(tokenizer, "building "), 4)] == [[True, True, False, False]]


def test_a_plural_request_lists_on_while_sure_detections_of_its_class_are_left(tokenizer, start):
    g = grammar(tokenizer, start, "buildings")
    assert g.must_list_more(0, ids(tokenizer, "building ") + [start + 0])
    assert not g.must_list_more(0, ids(tokenizer, "building ") + [start + 0, start + 1])
    assert not grammar(tokenizer, start, "the building").must_list_more(0, ids(tokenizer, "building ") + [start])


def test_a_colour_answer_says_the_colour_of_the_detection_it_points_at(tokenizer, start):
    g = grammar(tokenizer, start, "What colour is the small building?", vqa=True)
    assert g.banned_words(0, []) == []                                 # no evidence yet, nothing ruled out
    banned = g.banned_words(0, [start + 0])
    assert not set(ids(tokenizer, " red")) & set(banned) and set(ids(tokenizer, " grey")) <= set(banned)


def test_place_and_side_answers_are_read_off_the_pointed_boxes(tokenizer, start):
    where = grammar(tokenizer, start, "Where is the ship in the image?", vqa=True)
    assert where.evidence_word(0, [start + 2])[1] == "top"
    side = grammar(tokenizer, start, "Is the red building left or right of the large building?", vqa=True)
    assert side.evidence_word(0, [start + 0] + ids(tokenizer, " and ") + [start + 1])[1] == "left"
    assert side.evidence_word(0, [start + 0]) is None                 # the second object is not pointed at yet


def test_evidence_words_are_not_read_below_the_evidence_level(tokenizer, start):
    g = grammar(tokenizer, start, "What colour is the small building?", vqa=True, level="descriptions")
    assert g.banned_words(0, [start + 0]) == []


def test_an_unknown_grammar_is_refused(tokenizer, start):
    with pytest.raises(ValueError, match="grammar"):
        AnswerGrammar("ships", VOCAB, tokenizer, start, level="everything")


def test_a_counting_answer_says_the_count_its_class_token_carries(tokenizer, start):
    g = grammar(tokenizer, start, "How many buildings are there?", vqa=True)
    g.bind(g._bound.boxes, g._bound.scores, g._bound.classes, counts=torch.tensor([[0, 1, 0, 0, 2]]))
    count_token_of_building = start + 4 + 4          # after the 4 detections, class 4
    assert g.evidence_word(0, [count_token_of_building])[1] == "2"
    assert g.evidence_word(0, []) is None


def test_a_comparison_answer_says_what_the_two_count_tokens_carry(tokenizer, start):
    counts = torch.tensor([[0, 1, 0, 0, 2]])                 # one ship, two buildings
    ship_token, building_token = start + 4 + 1, start + 4 + 4
    for question, expected in (("Are there more buildings than ships?", "yes"),
                               ("Are there fewer buildings than ships?", "no"),
                               ("Are there more ships than buildings?", "no")):
        g = grammar(tokenizer, start, question, vqa=True)
        g.bind(g._bound.boxes, g._bound.scores, g._bound.classes, counts=counts)
        first, second = (building_token, ship_token) if question.index("building") < question.index("ship") \
            else (ship_token, building_token)
        assert g.evidence_word(0, [first]) is None           # one count is no comparison yet
        assert g.evidence_word(0, [first, second]) == (("yes", "no"), expected)


@pytest.fixture(scope="module")
def shipped():
    from engine.backends.rs_lvlm import RsLvlmPipeline

    return RsLvlmPipeline.load(DEFAULT_MODEL_DIR, device="cpu")


def sure_detections(pipeline, image, cls: str) -> int:
    from engine.model.image_processing import preprocess_images

    with torch.inference_mode():
        det = pipeline.model.detect(preprocess_images([image], pipeline.image_size))
    index = pipeline.config.object_classes.index(cls)
    return int(((det.classes[0] == index) & (det.scores[0] >= pipeline.config.count_min_score)).sum())


def test_the_shipped_model_lists_every_sure_detection_when_asked_for_all_of_a_class(shipped):
    import numpy as np

    from engine.data.scene_generator import generate_scene

    scene = generate_scene(np.random.default_rng(3), "parking lot", render_size=128)
    sure = sure_detections(shipped, scene.image, "vehicle")
    assert sure >= 2                                             # a scene where listing matters
    shipped.grammar = "evidence"
    answer = shipped.answer([scene.image], "ground", "vehicles", max_new_tokens=48)[0]
    # it may not stop before the last sure one; it may go on to less sure ones of the class
    assert len(answer.boxes) >= sure and {b.label for b in answer.boxes} == {"vehicle"}
