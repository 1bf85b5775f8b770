"""The object-centric model: detections are the object tokens, the loss is the model's own."""
from __future__ import annotations

import torch

from engine.model.checkpoint import load_checkpoint, save_checkpoint
from engine.model.detector import build_detection_targets
from engine.model.generation import RsLvlmDecodeSteps
from engine.model.tokenizer import build_tokenizer
from model_helpers import prompt_batch, small_config, small_model, small_object_model

SHIP = torch.tensor([[0.25, 0.25, 0.5, 0.5, 1, 0, 2]])


def test_the_object_level_has_one_token_per_detection():
    model = small_object_model().eval()
    with torch.no_grad():
        visual = model.encode_images(torch.randn(2, 3, 32, 32))
    assert int((visual.token_levels == 1).sum()) == 4
    assert visual.detections.boxes.shape == (2, 4, 4)
    assert model.config.level_token_counts() == (4, 4, 5)


def test_count_tokens_add_one_object_level_token_per_class_after_the_detections():
    model = small_object_model(class_count_tokens=True).eval()
    with torch.no_grad():
        visual = model.encode_images(torch.randn(2, 3, 32, 32))
    n_classes = model.config.num_object_classes
    assert int((visual.token_levels == 1).sum()) == 4 + n_classes
    assert model.config.level_token_counts() == (4 + n_classes, 4, 5)


def test_class_counts_count_the_detections_of_each_class_at_the_score_threshold_capped_at_nine():
    from engine.model.detector import Detections
    from engine.model.object_vision import class_counts

    k = 12
    scores = torch.tensor([[0.9, 0.8, 0.35, 0.1] + [0.9] * 8])
    classes = torch.tensor([[1, 1, 2, 2] + [0] * 8])
    det = Detections(torch.zeros(1, k, 4), scores, classes, torch.zeros(1, k, dtype=torch.long),
                     torch.zeros(1, k, 3), torch.zeros(1, k, 6), torch.zeros(1, k, 3))
    assert class_counts(det, 3, 0.3).tolist() == [[8, 2, 1]]
    scores[0, 2:4] = 0.9
    classes[0, :4] = 0
    assert class_counts(det, 3, 0.3).tolist() == [[9, 0, 0]]


def test_with_detection_targets_the_loss_includes_the_detection_loss():
    model = small_object_model()
    ids, mask = prompt_batch(model.config, [6, 6])
    targets = build_detection_targets([SHIP, SHIP], None, model.config)
    out = model(torch.randn(2, 3, 32, 32), ids, mask, labels=ids, detection_targets=targets)
    assert out.detection_loss is not None
    torch.testing.assert_close(out.loss, out.lm_loss + model.config.detection_loss_weight * out.detection_loss)


def test_the_lm_loss_weighs_every_sample_equally_whatever_its_length():
    model = small_model(use_sam=False)
    logits = torch.zeros(2, 5, model.config.vocab_size)
    logits[0, :, 7] = 20.0                                      # row 0 predicts its labels perfectly
    labels = torch.tensor([[-100, 7, 7, 7, 7], [-100, -100, -100, -100, 9]])
    per_token_row1 = float(torch.nn.functional.cross_entropy(logits[1, 3:4], labels[1, 4:]))
    assert abs(float(model._lm_loss(logits, labels)) - per_token_row1 / 2) < 1e-4


def test_decoding_keeps_the_detections_that_references_resolve_to():
    model = small_object_model().eval()
    ids, mask = prompt_batch(model.config, [6])
    steps = RsLvlmDecodeSteps(model, torch.randn(1, 3, 32, 32), ids, mask, max_new_tokens=2)
    steps.prefill()
    boxes, scores, classes = steps.detections
    assert boxes.shape == (1, 4, 4) and scores.shape == classes.shape == (1, 4)


def test_a_checkpoint_round_trip_keeps_the_detector_and_its_normalisation_statistics(tmp_path):
    tokenizer = build_tokenizer(["a ship {<1><2><3><4>|0}"] * 10, vocab_size=480)
    model = small_object_model(vocab_size=len(tokenizer))
    model.train()
    with torch.no_grad():
        model.vision.detector(torch.randn(4, 3, 32, 32) * 3)     # moves the BatchNorm running stats
    model.eval()
    loaded = load_checkpoint(save_checkpoint(model, tokenizer, tmp_path / "m")).model
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a, b = model.encode_images(pixels), loaded.encode_images(pixels)
    assert torch.equal(a.embeds, b.embeds)
    assert small_config().vision_backbone == "vit"            # the ViT path stays the default


def test_the_first_generated_token_already_follows_the_reference_grammar():
    from engine.model.references import MIN_REFERENCE_SCORE

    model = small_object_model().eval()
    ids, mask = prompt_batch(model.config, [6])
    steps = RsLvlmDecodeSteps(model, torch.randn(1, 3, 32, 32), ids, mask, max_new_tokens=2)
    logits = steps.prefill()                       # an answer may open with a reference (VQA evidence)
    _, scores, _ = steps.detections
    start = model.config.object_token_start
    allowed = torch.isfinite(logits[0, start:start + 4])
    assert allowed.tolist() == (scores[0] >= MIN_REFERENCE_SCORE).tolist()


def test_reference_feedback_adds_the_named_object_token_to_a_reference_and_nothing_elsewhere():
    model = small_object_model(reference_feedback=True).eval()
    torch.nn.init.normal_(model.reference_feedback_gate)
    start = model.config.object_token_start
    objects = torch.randn(1, 4, model.config.hidden_size)
    extra = model.reference_feedback(torch.tensor([[5, start + 2, 6]]), objects)
    torch.testing.assert_close(extra[0, 1], model.reference_feedback_gate * objects[0, 2])
    assert not extra[0, 0].any() and not extra[0, 2].any()


def test_reference_feedback_starts_switched_off_so_a_continued_model_answers_as_before():
    plain = small_object_model().eval()
    fed = small_object_model(reference_feedback=True).eval()
    fed.load_state_dict(plain.state_dict(), strict=False)
    ids, mask = prompt_batch(plain.config, [6])
    start = plain.config.object_token_start
    ids = torch.cat([ids, torch.tensor([[start + 1]])], dim=1)
    mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fed(pixels, ids, mask).logits, plain(pixels, ids, mask).logits)


def _assert_fused_cached_and_uncached_decoding_agree(model, tokens: list[int]) -> None:
    """Feeding ``tokens`` one step at a time gives the same logits on every decode path."""
    ids, mask = prompt_batch(model.config, [6])
    pixels = torch.randn(1, 3, 32, 32)
    logits = []
    for fast, use_cache in ((True, True), (False, True), (False, False)):
        steps = RsLvlmDecodeSteps(model, pixels, ids, mask, max_new_tokens=4, use_cache=use_cache, fast=fast)
        steps.prefill()
        out = [steps.step(torch.tensor([t]), torch.ones(1, dtype=torch.bool)) for t in tokens]
        logits.append(torch.stack(out))
    finite = torch.isfinite(logits[0])
    for other in logits[1:]:
        assert torch.equal(torch.isfinite(other), finite)
        torch.testing.assert_close(other[finite], logits[0][finite], rtol=1e-4, atol=1e-4)


def test_with_reference_feedback_cached_fused_and_uncached_decoding_agree():
    model = small_object_model(reference_feedback=True).eval()
    torch.nn.init.normal_(model.reference_feedback_gate, std=3.0)
    start = model.config.object_token_start
    _assert_fused_cached_and_uncached_decoding_agree(model, [start, 7, start + 2])


def test_the_feedback_projection_maps_the_named_object_token_and_starts_at_zero():
    model = small_object_model(reference_feedback=True, reference_feedback_projection=True).eval()
    start = model.config.object_token_start
    objects = torch.randn(1, 4, model.config.hidden_size)
    ids = torch.tensor([[5, start + 3]])
    assert not model.reference_feedback(ids, objects).any()               # zero until trained
    torch.nn.init.normal_(model.reference_feedback_proj.weight)
    extra = model.reference_feedback(ids, objects)
    torch.testing.assert_close(extra[0, 1], model.reference_feedback_proj(objects[0, 3]))
    assert not extra[0, 0].any()


def _geometry_model():
    model = small_object_model(reference_feedback=True, reference_geometry=True).eval()
    torch.nn.init.normal_(model.reference_geometry_mlp[-1].weight, std=1.0)
    return model


def test_reference_geometry_starts_at_zero_so_a_continued_model_answers_as_before():
    model = small_object_model(reference_feedback=True, reference_geometry=True).eval()
    start = model.config.object_token_start
    boxes = torch.rand(1, 4, 4)
    ids = torch.tensor([[5, start + 1, start + 3]])
    assert not model._reference_geometry(ids, boxes, None).any()


def test_reference_geometry_sees_the_offset_from_the_detection_referred_to_before():
    model = _geometry_model()
    start, AND = model.config.object_token_start, 5
    left, right = [0.1, 0.4, 0.2, 0.5], [0.7, 0.4, 0.8, 0.5]
    boxes = torch.tensor([[left, right, left, right]])
    # "<obj0> and <obj1>": the ship (left) and the tank (right); the word between is skipped
    pair = model._reference_geometry(torch.tensor([[start + 0, AND, start + 1]]), boxes, None)
    same_boxes = model._reference_geometry(torch.tensor([[start + 2, AND, start + 1]]), boxes, None)
    after_itself = model._reference_geometry(torch.tensor([[start + 3, AND, start + 1]]), boxes, None)
    alone = model._reference_geometry(torch.tensor([[6, AND, start + 1]]), boxes, None)
    torch.testing.assert_close(pair, same_boxes)          # boxes count, not reference numbers
    # the same tank after the ship, after another tank (offset 0) and alone: three features
    assert not torch.allclose(pair[0, 2], after_itself[0, 2])
    assert not torch.allclose(pair[0, 2], alone[0, 2])
    assert not torch.allclose(after_itself[0, 2], alone[0, 2])


def test_reference_geometry_in_decode_steps_equals_the_whole_sequence():
    model = _geometry_model()
    start = model.config.object_token_start
    boxes = torch.rand(1, 4, 4)
    ids = torch.tensor([[5, start + 2, 6, start + 0, 7, start + 3]])
    whole = model._reference_geometry(ids, boxes, None)
    last = torch.tensor([-1])
    for t in range(ids.shape[1]):
        step = model._reference_geometry(ids[:, t:t + 1], boxes, last)
        torch.testing.assert_close(step[0, 0], whole[0, t])
        if 0 <= int(ids[0, t]) - start < 4:
            last = ids[:, t]


def test_reference_geometry_is_zero_away_from_detection_references():
    model = small_object_model(reference_feedback=True, reference_geometry=True, class_count_tokens=True,
                               count_references=True).eval()
    torch.nn.init.normal_(model.reference_geometry_mlp[-1].weight, std=1.0)
    start, k = model.config.object_token_start, model.config.num_object_tokens
    extra = model._reference_geometry(torch.tensor([[5, start + k, start + 1]]), torch.rand(1, k, 4), None)
    assert not extra[0, 0].any() and not extra[0, 1].any() and extra[0, 2].any()


def test_with_reference_geometry_cached_fused_and_uncached_decoding_agree():
    model = _geometry_model()
    torch.nn.init.normal_(model.reference_feedback_gate, std=3.0)
    start = model.config.object_token_start
    _assert_fused_cached_and_uncached_decoding_agree(model, [start, start + 2, 7])
