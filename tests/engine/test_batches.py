"""Training batches: the task mix per scene, grounding answers as reference slots, dense targets."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from engine.knowledge import KnowledgeBase, SentenceEncoder
from engine.lab.batches import Collator, SampleStream, evidence_answer
from engine.lab.train import DEFAULT_INDEX_DIR
from engine.model.config import RsLvlmConfig
from engine.model.tokenizer import build_tokenizer

MIX = {"caption": 1, "vqa": 3, "ground": 2, "classify": 1}


@pytest.fixture(scope="module")
def samples():
    stream = SampleStream(3, 100, 64, task_mix=MIX, vqa_qtypes=("colour",))
    return list(itertools.islice(iter(stream), 14))            # two scenes


def test_each_scene_gives_the_configured_task_mix(samples):
    assert [s.task for s in samples[:7]] == ["caption", "vqa", "vqa", "vqa", "ground", "ground", "classify"]
    assert samples[0].image is samples[6].image                # one rendering per scene


def test_the_collator_writes_grounding_answers_as_slots_with_their_boxes(samples):
    texts = [s.answer for s in samples] + [s.question for s in samples]
    tokenizer = build_tokenizer(texts * 3, vocab_size=600)
    config = RsLvlmConfig(image_size=64, vision_backbone="centernet", vocab_size=len(tokenizer))
    batch = Collator(tokenizer, config, KnowledgeBase.load(DEFAULT_INDEX_DIR), SentenceEncoder())(samples)
    obj0 = tokenizer.convert_tokens_to_ids("<obj0>")
    for row, s in enumerate(samples):
        slots = int((batch["labels"][row] == obj0).sum())
        assert slots == (1 if s.task == "ground" else 0)
        n_boxes = int((batch["slot_boxes"][row, :, 0] >= 0).sum())
        assert n_boxes == (len(s.boxes) if s.task == "ground" else 0)
    assert batch["detection_targets"].heatmap.shape == (len(samples), 8, 16, 16)
    assert np.isclose(float(batch["detection_targets"].heatmap.max()), 1.0)


def test_an_attribute_answer_points_at_its_objects_before_the_word():
    assert evidence_answer("red", ["ship"]) == "<obj0> red"
    assert evidence_answer("grey", ["ship", "ship"]) == "<obj0><obj1> grey"      # "What colour are the ships?"
    assert evidence_answer("left", ["ship", "airplane"]) == "<obj0> and <obj1> left"   # two classes: not one list


def test_with_vqa_references_colour_answers_are_taught_as_slots_then_the_colour(samples):
    texts = [s.answer for s in samples] + [s.question for s in samples]
    tokenizer = build_tokenizer(texts * 3, vocab_size=600)
    config = RsLvlmConfig(image_size=64, vision_backbone="centernet", vocab_size=len(tokenizer),
                          vqa_references=True)
    colour = [s for s in samples if s.qtype == "colour"]
    assert colour and all(s.boxes for s in colour)
    batch = Collator(tokenizer, config, KnowledgeBase.load(DEFAULT_INDEX_DIR), SentenceEncoder())(colour)
    obj0 = tokenizer.convert_tokens_to_ids("<obj0>")
    for row, s in enumerate(colour):
        labels = [t for t in batch["labels"][row].tolist() if t != -100]
        assert labels[0] == obj0                                       # the pointer comes first
        assert tokenizer.decode(labels[len(s.boxes):], skip_special_tokens=True).strip() == s.answer
        assert int((batch["slot_boxes"][row, :, 0] >= 0).sum()) == len(s.boxes)


def test_every_nth_scene_asks_its_last_vqa_question_as_a_follow_up_of_the_one_before():
    stream = SampleStream(3, 100, 64, task_mix=MIX, follow_up_every=2)
    scenes = list(itertools.islice(iter(stream), 28))                 # four scenes of seven samples
    for i in range(4):
        scene = scenes[7 * i:7 * i + 7]
        vqa = [s for s in scene if s.task == "vqa"]
        history = vqa[-1].meta.get("history")
        if i % 2:
            assert history is None
        else:
            assert history == [{"question": vqa[-2].question, "answer": vqa[-2].answer}]
        assert all("history" not in s.meta for s in scene if s is not vqa[-1])


def test_a_follow_up_is_taught_with_the_earlier_turn_in_its_prompt_and_only_its_own_answer_learnt(samples):
    from engine.model.prompts import encode_example

    texts = [s.answer for s in samples] + [s.question for s in samples]
    tokenizer = build_tokenizer(texts * 3, vocab_size=600)
    turn = [{"question": "How many ships are there?", "answer": "2"}]
    plain_ids, plain_labels = encode_example(tokenizer, "vqa", "What colour is the ship?", "red")
    ids, labels = encode_example(tokenizer, "vqa", "What colour is the ship?", "red", turn)
    assert len(ids) > len(plain_ids)
    assert [t for t in labels if t != -100] == [t for t in plain_labels if t != -100]


def test_an_earlier_answer_with_boxes_enters_the_prompt_as_the_analyst_read_it():
    from engine.model.prompts import build_prompt

    raw = {"question": "airplanes", "answer": "airplane {<10><10><20><20>|0}{<30><30><40><40>|0}"}
    read = {"question": "airplanes", "answer": "2 airplanes"}
    assert build_prompt("vqa", "What colour is the airplane?", [raw]) == \
        build_prompt("vqa", "What colour is the airplane?", [read])
    assert "2 airplanes" in build_prompt("vqa", "What colour is the airplane?", [raw])


def test_with_count_references_counting_answers_point_at_the_count_token_of_the_asked_class():
    from engine.model.references import count_slot_box

    stream = SampleStream(5, 100, 64, task_mix={"vqa": 2}, vqa_qtypes=("counting",))
    counting = [s for s in itertools.islice(iter(stream), 40) if s.qtype in ("counting", "comparison")][:6]
    tokenizer = build_tokenizer([s.answer for s in counting] + [s.question for s in counting], vocab_size=600)
    config = RsLvlmConfig(image_size=64, vision_backbone="centernet", vocab_size=len(tokenizer),
                          class_count_tokens=True, count_references=True,
                          object_classes=("airplane", "ship", "storage tank", "vehicle", "building", "tennis court",
                                          "bridge", "swimming pool"))
    batch = Collator(tokenizer, config, KnowledgeBase.load(DEFAULT_INDEX_DIR), SentenceEncoder())(counting)
    obj0 = tokenizer.convert_tokens_to_ids("<obj0>")
    for row, s in enumerate(counting):
        asked = s.meta["count_classes"]
        assert asked and s.question.lower().find(asked[0]) <= s.question.lower().find(asked[-1])
        labels = [t for t in batch["labels"][row].tolist() if t != -100]
        assert labels[0] == obj0                                       # the pointer comes first
        assert tokenizer.decode(labels, skip_special_tokens=True).split()[-1] == s.answer
        expected = [count_slot_box(config.object_classes.index(c)) for c in asked]
        assert batch["slot_boxes"][row, :len(asked)].tolist() == expected
