"""Model configuration: presets, JSON round trip and parameter budgets."""
from __future__ import annotations

import pytest
import torch

from engine.model.config import RsLvlmConfig
from engine.model.modeling_rs_lvlm import RsLvlmForConditionalGeneration


def _meta_model(config: RsLvlmConfig) -> RsLvlmForConditionalGeneration:
    with torch.device("meta"):
        return RsLvlmForConditionalGeneration(config, torch.zeros(10, 384), torch.zeros(10, dtype=torch.long))


def test_7b_preset_on_meta_device_has_about_7_billion_parameters():
    config = RsLvlmConfig.preset("7b")
    counts = _meta_model(config).parameter_counts()
    assert 7.0e9 <= counts["total"] <= 7.4e9, counts
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (4096, 32, 32)
    assert (config.intermediate_size, config.vocab_size) == (11008, 32000)
    vision = (config.vision_hidden_size, config.vision_num_layers, config.patch_size, config.image_size)
    assert vision == (1024, 24, 14, 336)
    assert 0.29e9 <= counts["vision"] <= 0.32e9          # ViT-L/14


def test_tiny_preset_is_at_most_20m_real_parameters():
    torch.manual_seed(0)
    model = RsLvlmForConditionalGeneration(RsLvlmConfig.preset("tiny"), torch.randn(30, 384), torch.arange(30) % 3)
    counts = model.parameter_counts()
    assert counts["total"] <= 20_000_000
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert all(counts[k] > 0 for k in ("vision", "sam", "projectors", "language_model", "experts"))


def test_base_preset_is_between_100m_and_300m_parameters():
    total = _meta_model(RsLvlmConfig.preset("base")).parameter_counts()["total"]
    assert 100e6 <= total <= 300e6


def test_config_json_round_trip(tmp_path):
    config = RsLvlmConfig.preset("tiny", vocab_size=1234, use_sam=False, retrieval_top_k=7)
    config.to_json_file(tmp_path / "config.json")
    loaded = RsLvlmConfig.from_json_file(tmp_path / "config.json")
    assert loaded == config
    assert loaded.to_dict()["model_type"] == "rs_lvlm"


def test_preset_overrides_and_unknown_preset():
    assert RsLvlmConfig.preset("tiny", vocab_size=2048).vocab_size == 2048
    with pytest.raises(ValueError, match="unknown preset"):
        RsLvlmConfig.preset("huge")


def test_invalid_level_depth_is_rejected():
    with pytest.raises(ValueError, match="object_layer"):
        RsLvlmConfig.preset("tiny", object_layer=99)
