"""A tiny random LLaVA saved with transformers loads as the base of the RS-LVLM."""
from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from engine.backends.base import checkpoint_errors
from engine.errors import BAD_CHECKPOINT, EngineError
from engine.model.llava_adapter import from_llava_checkpoint, resize_token_embeddings
from model_helpers import random_knowledge


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                       image_size=32, patch_size=8, projection_dim=16),
        text_config=LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
        image_token_index=100, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config).eval()
    path = tmp_path_factory.mktemp("llava") / "tiny-llava"
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def _ours(path, **overrides):
    emb, levels = random_knowledge()
    with checkpoint_errors():
        return from_llava_checkpoint(path, emb, levels, **overrides)


def test_llava_language_model_weights_are_in_our_language_model(llava):
    ref, path = llava
    ours = _ours(path)
    theirs = ref.state_dict()
    q_key = next(k for k in theirs if "language_model" in k and k.endswith("layers.0.self_attn.q_proj.weight"))
    lm_prefix = q_key.rsplit("layers.0.", 1)[0]
    names = ("layers.0.self_attn.q_proj.weight", "layers.1.self_attn.k_proj.weight",
             "embed_tokens.weight", "norm.weight")
    for name in names:
        assert torch.equal(ours.language_model.get_parameter(name), theirs[lm_prefix + name]), name
    for proj in ("gate_proj", "up_proj", "down_proj"):
        dense = theirs[f"{lm_prefix}layers.1.mlp.{proj}.weight"]
        assert torch.equal(ours.language_model.layers[1].mlp.shared_expert.get_parameter(f"{proj}.weight"), dense)
    assert torch.equal(ours.lm_head.weight, ref.lm_head.weight)
    assert ours.config.image_token_id == 100 and ours.config.vision_num_layers == 3
    assert len(ours.vision.layers) == 2                  # LLaVA reads its tower at depth -2


def test_text_only_logits_equal_llava_at_initialisation(llava):
    ref, path = llava
    ours = _ours(path)
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        got = ours(None, ids).logits
    assert torch.allclose(got, expected, atol=1e-5)


def test_object_tokens_equal_llava_image_features_at_initialisation(llava):
    ref, path = llava
    ours = _ours(path)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = ref.get_image_features(pixels, vision_feature_layer=-2,
                                          vision_feature_select_strategy="default").pooler_output
        features = torch.stack(list(features))
        visual = ours.encode_images(pixels, torch.randn(2, 384))
    n_obj = ours.config.level_token_counts()[0]
    assert torch.allclose(visual.embeds[:, :n_obj], features, atol=1e-5)
    assert set(visual.retrieved) == {"object", "region", "scene"}


def test_switches_and_vocabulary_growth_work_on_the_llava_base(llava):
    _, path = llava
    dense = _ours(path, use_experts=False, use_sam=False)
    assert dense.parameter_counts()["experts"] == 0 and dense.sam is None
    resize_token_embeddings(dense, 130)
    ids = torch.full((1, 4), 125)
    assert dense(None, ids).logits.shape == (1, 4, 130)


def test_pickled_llava_is_refused(llava, tmp_path):
    import shutil

    _, path = llava
    copy = shutil.copytree(path, tmp_path / "llava")
    torch.save({}, copy / "pytorch_model.bin")
    with pytest.raises(EngineError) as err:
        _ours(copy)
    assert err.value.code == BAD_CHECKPOINT
