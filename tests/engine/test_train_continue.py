"""A training run can continue from a trained checkpoint with features switched on since."""
from __future__ import annotations

import pytest
import torch

from engine.lab.train import initialise_from
from engine.model.checkpoint import save_checkpoint
from engine.model.config import RsLvlmConfig
from engine.model.tokenizer import build_tokenizer
from model_helpers import small_object_model


@pytest.fixture()
def trained(tmp_path):
    tokenizer = build_tokenizer(["a ship {<1><2><3><4>|0}"] * 10, vocab_size=480)
    model = small_object_model(vocab_size=len(tokenizer), class_count_tokens=True)
    return model, save_checkpoint(model, tokenizer, tmp_path / "trained"), len(tokenizer)


def test_continuing_loads_every_trained_tensor_and_names_the_new_ones(trained):
    model, folder, vocab = trained
    grown = small_object_model(seed=1, vocab_size=vocab, class_count_tokens=True, reference_feedback=True,
                               count_references=True)
    assert initialise_from(grown, folder) == ["reference_feedback_gate"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(grown.state_dict()[name], tensor), name
    assert not grown.reference_feedback_gate.any()


def test_continuing_into_a_model_of_another_shape_is_refused(trained):
    _, folder, vocab = trained
    with pytest.raises(ValueError, match="does not fit"):
        initialise_from(small_object_model(vocab_size=vocab + 8, class_count_tokens=True), folder)


def test_a_projection_added_to_a_model_with_feedback_is_the_only_new_tensor(tmp_path):
    tokenizer = build_tokenizer(["a ship {<1><2><3><4>|0}"] * 10, vocab_size=480)
    fed = small_object_model(vocab_size=len(tokenizer), class_count_tokens=True, reference_feedback=True)
    folder = save_checkpoint(fed, tokenizer, tmp_path / "fed")
    grown = small_object_model(vocab_size=len(tokenizer), class_count_tokens=True, reference_feedback=True,
                               reference_feedback_projection=True)
    assert initialise_from(grown, folder) == ["reference_feedback_proj.weight"]


def test_count_references_need_the_count_tokens():
    with pytest.raises(ValueError, match="class_count_tokens"):
        RsLvlmConfig(vision_backbone="centernet", count_references=True)
