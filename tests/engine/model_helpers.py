"""Tiny model configurations and random knowledge bases for the model tests.

Not a conftest: the model test modules import it (``from model_helpers import ...``), so each
test states the sizes it runs with.  Everything is far smaller than the ``tiny`` preset so that
the whole model suite runs in seconds on two CPU cores.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.model.config import RsLvlmConfig
from engine.model.modeling_rs_lvlm import RsLvlmForConditionalGeneration

KNOWLEDGE_PER_LEVEL = 12


def small_config(**overrides) -> RsLvlmConfig:
    """~0.2M parameters: 32x32 images in 8x8 patches (16 object, 4 region, 6 scene tokens)."""
    sizes = dict(
        image_size=32, patch_size=8, vision_hidden_size=32, vision_num_layers=3, vision_num_heads=2,
        vision_intermediate_size=64, object_layer=1, region_layer=2, scene_layer=3,
        retrieval_top_k=3, sam_num_heads=2, vocab_size=64, hidden_size=32, intermediate_size=64,
        expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
    )
    sizes.update(overrides)
    return RsLvlmConfig(**sizes)


def random_knowledge(per_level: int = KNOWLEDGE_PER_LEVEL, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm random (3 * per_level, 384) embeddings with shuffled level ids 0/1/2."""
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(3 * per_level, 384, generator=g), dim=-1)
    levels = torch.arange(3).repeat_interleave(per_level)[torch.randperm(3 * per_level, generator=g)]
    return emb, levels


def small_model(seed: int = 0, **overrides) -> RsLvlmForConditionalGeneration:
    torch.manual_seed(seed)
    emb, levels = random_knowledge(seed=seed)
    return RsLvlmForConditionalGeneration(small_config(**overrides), emb, levels)


def prompt_batch(config: RsLvlmConfig, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts with one <image> token at position 1 of each row."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.full((len(lengths), t), config.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        tokens = torch.randint(10, config.vocab_size, (n,), generator=g)
        tokens[0] = config.bos_token_id
        tokens[1] = config.image_token_id
        ids[row, t - n:] = tokens
        mask[row, t - n:] = 1
    return ids, mask


def small_object_config(**overrides) -> RsLvlmConfig:
    """The object-centric variant of :func:`small_config`: a tiny detector on 32x32 images whose
    4 detections are the object tokens; ``<obj0>`` is token 40."""
    sizes = dict(vision_backbone="centernet", detector_channels=(8, 8, 16, 16), num_object_tokens=4,
                 region_grid=2, object_token_start=40)
    sizes.update(overrides)
    return small_config(**sizes)


def small_object_model(seed: int = 0, **overrides) -> RsLvlmForConditionalGeneration:
    torch.manual_seed(seed)
    emb, levels = random_knowledge(seed=seed)
    return RsLvlmForConditionalGeneration(small_object_config(**overrides), emb, levels)
