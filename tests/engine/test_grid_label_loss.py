"""Soft targets for box-coordinate tokens: near misses cost less than far misses."""
from __future__ import annotations

import torch

from engine.model.config import RsLvlmConfig
from engine.model.modeling_rs_lvlm import RsLvlmForConditionalGeneration

G0, VOCAB = 10, 120  # grid tokens <0>..<100> are ids 10..110 in this test


def model_with(sigma: float) -> RsLvlmForConditionalGeneration:
    cfg = RsLvlmConfig.preset("tiny", vocab_size=VOCAB, grid_token_start=G0, grid_label_sigma=sigma,
                              use_sam=False)
    return RsLvlmForConditionalGeneration(cfg, None, None)


def loss_for_prediction(model, predicted_grid: int, target_grid: int) -> float:
    logits = torch.full((1, 2, VOCAB), -10.0)
    logits[0, 0, G0 + predicted_grid] = 10.0            # position 0 predicts the label at position 1
    labels = torch.tensor([[-100, G0 + target_grid]])
    return float(model._lm_loss(logits, labels))


def test_without_sigma_the_loss_is_plain_cross_entropy():
    model = model_with(0.0)
    logits = torch.randn(2, 5, VOCAB)
    labels = torch.randint(0, VOCAB, (2, 5))
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    assert torch.allclose(model._lm_loss(logits, labels), expected)


def test_with_sigma_a_near_miss_costs_less_than_a_far_miss():
    model = model_with(1.5)
    assert loss_for_prediction(model, 51, 50) < loss_for_prediction(model, 80, 50)


def test_with_sigma_the_exact_coordinate_is_still_the_best_prediction():
    model = model_with(1.5)
    assert loss_for_prediction(model, 50, 50) < loss_for_prediction(model, 51, 50)


def test_with_sigma_text_tokens_keep_plain_cross_entropy():
    soft, plain = model_with(1.5), model_with(0.0)
    logits = torch.randn(1, 4, VOCAB)
    labels = torch.tensor([[-100, 3, 5, 7]])                 # ids below G0: ordinary text
    assert torch.allclose(soft._lm_loss(logits, labels), plain._lm_loss(logits, labels))


def test_grid_position_hint_changes_object_and_region_tokens_but_not_scene_tokens():
    torch.manual_seed(0)
    cfg = RsLvlmConfig.preset("tiny", vocab_size=VOCAB, grid_token_start=G0, use_sam=False)
    plain = RsLvlmForConditionalGeneration(cfg, None, None).eval()
    hinted_cfg = RsLvlmConfig.preset("tiny", vocab_size=VOCAB, grid_token_start=G0, use_sam=False,
                                     grid_position_hint=True)
    hinted = RsLvlmForConditionalGeneration(hinted_cfg, None, None).eval()
    hinted.load_state_dict(plain.state_dict(), strict=False)
    pixels = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        a, b = plain.encode_images(pixels), hinted.encode_images(pixels)
    changed = (a.embeds - b.embeds).abs().sum(-1)[0] > 0                      # (Nv,)
    levels = a.token_levels
    assert bool(changed[levels == 1].all()) and bool(changed[levels == 2].all())
    assert not bool(changed[levels == 3].any())
