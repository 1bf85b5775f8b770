"""Multi-level vision encoder: token counts and shapes per level, any size divisible by patch."""
from __future__ import annotations

import pytest
import torch

from engine.model.vision import MultiLevelVisionEncoder
from model_helpers import small_config


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return MultiLevelVisionEncoder(small_config()).eval()


def test_level_shapes_at_default_size(encoder):
    config = encoder.config
    obj, region, scene = encoder(torch.randn(2, 3, 32, 32))
    d = config.vision_hidden_size
    assert obj.shape == (2, 16, d)          # 4x4 patches
    assert region.shape == (2, 4, d)        # pooled 2x2
    assert scene.shape == (2, 6, d)         # class token + mean + 2x2 grid
    assert (obj.shape[1], region.shape[1], scene.shape[1]) == config.level_token_counts()


def test_non_square_and_larger_inputs_divisible_by_patch(encoder):
    config = encoder.config
    for h, w in [(48, 24), (40, 56), (8, 8)]:
        obj, region, scene = encoder(torch.randn(1, 3, h, w))
        n_obj, n_reg, n_scene = config.level_token_counts(h, w)
        assert obj.shape[1] == n_obj == (h // 8) * (w // 8)
        assert region.shape[1] == n_reg and scene.shape[1] == n_scene
        assert torch.isfinite(obj).all() and torch.isfinite(scene).all()


def test_size_not_divisible_by_patch_is_rejected(encoder):
    with pytest.raises(ValueError, match="divisible"):
        encoder(torch.randn(1, 3, 30, 32))


def test_levels_come_from_different_depths():
    torch.manual_seed(0)
    enc = MultiLevelVisionEncoder(small_config(object_layer=1, region_layer=2, scene_layer=3)).eval()
    x = torch.randn(1, 3, 32, 32)
    obj, _, scene = enc(x)
    with torch.no_grad():
        enc.layers[2].mlp.fc2.weight.mul_(3.0)          # only the last block changes
    obj2, _, scene2 = enc(x)
    assert torch.equal(obj, obj2) and not torch.allclose(scene, scene2)
