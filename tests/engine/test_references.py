"""Grounding by reference: slots become detection references; references become box text."""
from __future__ import annotations

import torch

from engine.grounding import parse_boxes
from engine.lab.batches import reference_answer
from engine.model.detector import Detections
from engine.model.references import assign_references, resolve_references

START = 50   # <obj0> is id 50 in these tests


def detections(boxes: list[list[float]]) -> Detections:
    b = torch.tensor([boxes])
    k = b.shape[1]
    return Detections(b, torch.ones(1, k), torch.zeros(1, k, dtype=torch.long), torch.zeros(1, k, dtype=torch.long),
                      torch.ones(1, k, 8), torch.ones(1, k, 6), torch.ones(1, k, 3))


def test_a_grounding_answer_becomes_one_slot_per_box():
    text, n = reference_answer("airplane {<10><10><20><20>|0}{<30><30><40><40>|0}")
    assert (text, n) == ("airplane <obj0><obj1>", 2)


def test_each_slot_points_at_the_detection_overlapping_its_box():
    det = detections([[0.6, 0.6, 0.8, 0.8], [0.1, 0.1, 0.2, 0.2]])
    ids = torch.tensor([[7, START + 0, 2]])
    slot_boxes = torch.tensor([[[0.1, 0.1, 0.2, 0.2]]])
    new_ids, new_labels = assign_references(ids, ids.clone(), slot_boxes, det, START)
    assert new_ids.tolist() == [[7, START + 1, 2]] and new_labels.tolist() == [[7, START + 1, 2]]


def test_a_slot_no_detection_matches_is_not_taught():
    det = detections([[0.6, 0.6, 0.8, 0.8]])
    ids = torch.tensor([[START + 0]])
    _, labels = assign_references(ids, ids.clone(), torch.tensor([[[0.0, 0.0, 0.1, 0.1]]]), det, START)
    assert labels.tolist() == [[-100]]


def test_references_resolve_to_geochat_box_text_with_the_detection_score():
    text, found = resolve_references("ship <obj1>", [[0, 0, 0.1, 0.1], [0.2, 0.3, 0.4, 0.5]], [0.9, 0.7])
    assert text == "ship {<20><30><40><50>|0}" and found[0].score == 0.7
    assert parse_boxes(text)[0].label == "ship"


def test_decoding_never_repeats_a_reference_nor_points_at_filler_and_stays_in_the_class():
    from engine.model.references import constrain_references

    logits = torch.zeros(1, START + 4)
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1]])            # detection 3 is filler
    classes = torch.tensor([[0, 1, 0, 0]])
    out = constrain_references(logits, torch.tensor([[7, START + 0]]), scores, classes, START)
    allowed = torch.isfinite(out[0, START:]).tolist()
    assert allowed == [False, False, True, False]            # not again, not another class, not filler


def test_the_first_reference_after_a_phrase_has_the_class_the_phrase_names():
    from engine.model.references import constrain_references, phrase_class

    names = ("airplane", "ship")
    assert phrase_class("ship <obj0>, airplanes ", names) == 0
    logits = torch.zeros(1, START + 3)
    scores, classes = torch.tensor([[0.9, 0.8, 0.7]]), torch.tensor([[1, 0, 1]])
    out = constrain_references(logits, torch.tensor([[7]]), scores, classes, START,
                               preferred=[[classes[0] == 0]])
    assert torch.isfinite(out[0, START:]).tolist() == [False, True, False]


def test_an_opening_reference_falls_back_to_the_next_preference_when_none_fits_the_first():
    from engine.model.references import constrain_references

    logits = torch.zeros(1, START + 3)
    scores, classes = torch.tensor([[0.9, 0.8, 0.1]]), torch.tensor([[1, 0, 0]])
    only_filler = torch.tensor([False, False, True])       # detection 2 scores below the filler line
    out = constrain_references(logits, torch.tensor([[7]]), scores, classes, START,
                               preferred=[[only_filler, classes[0] == 0]])
    assert torch.isfinite(out[0, START:]).tolist() == [False, True, False]


def test_a_listing_that_must_go_on_can_write_nothing_but_a_reference():
    from engine.model.references import constrain_references

    logits = torch.zeros(1, START + 3)
    scores, classes = torch.tensor([[0.9, 0.8, 0.7]]), torch.tensor([[0, 0, 1]])
    out = constrain_references(logits, torch.tensor([[7, START + 0]]), scores, classes, START, must_list=[True])
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [START + 1]


def test_a_resolved_reference_keeps_its_detections_class():
    text, found = resolve_references("<obj1> red", [[0, 0, 0.1, 0.1], [0.2, 0.3, 0.4, 0.5]], [0.9, 0.7], [4, 1])
    assert text == "{<20><30><40><50>|0} red" and found[0].cls == 1


def test_a_count_slot_points_at_the_count_token_of_its_class_after_the_detections():
    from engine.model.references import count_slot_box

    det = detections([[0.6, 0.6, 0.8, 0.8], [0.1, 0.1, 0.2, 0.2]])          # K = 2 detection tokens
    ids = torch.tensor([[START + 0, 9, START + 1]])
    slot_boxes = torch.tensor([[count_slot_box(3), [0.1, 0.1, 0.2, 0.2]]])
    new_ids, new_labels = assign_references(ids, ids.clone(), slot_boxes, det, START)
    assert new_ids.tolist() == new_labels.tolist() == [[START + 2 + 3, 9, START + 1]]


def test_a_reference_past_the_detections_leaves_no_box_and_no_text():
    text, found = resolve_references("<obj5> 3", [[0.1, 0.1, 0.2, 0.2]], [0.9])     # a count token
    assert (text.strip(), found) == ("3", [])


def test_count_references_of_a_comparison_leave_only_the_answer_word():
    text, found = resolve_references("<obj17> and <obj19> yes", [[0.1, 0.1, 0.2, 0.2]], [0.9])
    assert (text.strip(), found) == ("yes", [])


def test_two_evidence_boxes_keep_the_and_between_them():
    text, _ = resolve_references("<obj0> and <obj1> left", [[0.1, 0.1, 0.2, 0.2], [0.5, 0.5, 0.6, 0.6]], [0.9, 0.8])
    assert text == "{<10><10><20><20>|0} and {<50><50><60><60>|0} left"
