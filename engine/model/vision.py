"""Multi-level vision encoder: one ViT backbone, three semantic levels (object, region, scene).

Why one backbone read at several depths: fine, local structure (vehicles, tanks, ships) is best
described by patch tokens from an intermediate block, land-cover regions by deeper tokens pooled
over a few patches, and the scene by the last block's global summary.  Reading all three from the
same forward pass costs nothing extra.

The backbone has CLIP's layout on purpose (class token, ``patch_embedding`` conv without bias,
``position_embedding`` table, a pre-norm, then ``transformers``' ``CLIPEncoderLayer`` blocks), so
that the vision tower of a LLaVA-family checkpoint loads into it tensor for tensor
(:mod:`engine.model.llava_adapter`) and the rest of the model keeps a single code path.

Blocks deeper than the deepest level are never built (LLaVA reads its tower at depth -2; its last
block is dropped the same way).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from .config import RsLvlmConfig

__all__ = ["MultiLevelVisionEncoder", "MultiLevelFeatures", "clip_vision_config"]


class MultiLevelFeatures(NamedTuple):
    """The three levels of one batch of images (iterable as ``(object, region, scene)``)."""

    object: torch.Tensor   # (B, N_obj, Dv)   N_obj = gh * gw fine patch tokens
    region: torch.Tensor   # (B, N_reg, Dv)   N_reg = ceil(gh/k) * ceil(gw/k) pooled patches
    scene: torch.Tensor    # (B, N_scene, Dv) N_scene = 2 + scene_grid**2


def clip_vision_config(config: RsLvlmConfig) -> CLIPVisionConfig:
    """The ``transformers`` config that the CLIP encoder blocks read (sizes, activation, SDPA)."""
    return CLIPVisionConfig(
        hidden_size=config.vision_hidden_size,
        intermediate_size=config.vision_intermediate_size,
        num_hidden_layers=config.vision_num_layers,
        num_attention_heads=config.vision_num_heads,
        num_channels=config.num_channels,
        image_size=config.image_size,
        patch_size=config.patch_size,
        hidden_act=config.vision_hidden_act,
        layer_norm_eps=config.vision_layer_norm_eps,
        attention_dropout=0.0,
        attn_implementation="sdpa",
    )


class MultiLevelVisionEncoder(nn.Module):
    """ViT returning :class:`MultiLevelFeatures` for any input whose sides divide by the patch."""

    def __init__(self, config: RsLvlmConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.vision_hidden_size
        self.patch_size = config.patch_size
        self.base_grid = config.image_size // config.patch_size
        self.depths = (config.object_layer, config.region_layer, config.scene_layer)

        self.class_embedding = nn.Parameter(torch.zeros(dim))
        self.patch_embedding = nn.Conv2d(config.num_channels, dim, config.patch_size, config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(self.base_grid ** 2 + 1, dim)
        self.pre_layrnorm = nn.LayerNorm(dim, eps=config.vision_layer_norm_eps)  # CLIP's spelling
        clip_config = clip_vision_config(config)
        self.layers = nn.ModuleList(CLIPEncoderLayer(clip_config) for _ in range(max(self.depths)))
        self.gradient_checkpointing = config.gradient_checkpointing

    def position_embeddings(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(1, 1 + grid_h*grid_w, Dv): the learned table, bicubically resized for other grids."""
        table = self.position_embedding.weight                       # (1 + g*g, Dv)
        if (grid_h, grid_w) == (self.base_grid, self.base_grid):
            return table.unsqueeze(0)
        cls_pos, patch_pos = table[:1], table[1:]
        g, dim = self.base_grid, table.shape[-1]
        patch_pos = patch_pos.reshape(1, g, g, dim).permute(0, 3, 1, 2)   # (1, Dv, g, g)
        patch_pos = F.interpolate(patch_pos.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.to(table.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
        return torch.cat([cls_pos.unsqueeze(0), patch_pos], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> MultiLevelFeatures:
        """pixel_values (B, C, H, W), normalised, H and W multiples of the patch size."""
        b, _, h, w = pixel_values.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {self.patch_size}")
        gh, gw = h // self.patch_size, w // self.patch_size
        dtype = self.patch_embedding.weight.dtype

        patches = self.patch_embedding(pixel_values.to(dtype))            # (B, Dv, gh, gw)
        patches = patches.flatten(2).transpose(1, 2)                       # (B, gh*gw, Dv)
        cls = self.class_embedding.to(dtype).expand(b, 1, -1)              # (B, 1, Dv)
        hidden = torch.cat([cls, patches], dim=1) + self.position_embeddings(gh, gw)
        hidden = self.pre_layrnorm(hidden)                                 # (B, 1 + gh*gw, Dv)

        at_depth: dict[int, torch.Tensor] = {}
        for depth, layer in enumerate(self.layers, start=1):
            if self.gradient_checkpointing and self.training:
                hidden = checkpoint(layer, hidden, None, use_reentrant=False)
            else:
                hidden = layer(hidden, None)
            if depth in self.depths:
                at_depth[depth] = hidden

        obj_h, reg_h, scene_h = (at_depth[d] for d in self.depths)
        obj = obj_h[:, 1:]                                                 # (B, gh*gw, Dv)
        region = self._pool_grid(reg_h[:, 1:], gh, gw)                     # (B, N_reg, Dv)
        scene = self._scene_tokens(scene_h, gh, gw)                        # (B, 2 + s*s, Dv)
        return MultiLevelFeatures(obj, region, scene)

    def _pool_grid(self, tokens: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        """Average-pool (B, gh*gw, Dv) patch tokens k x k (ceil mode: odd grids keep the edge)."""
        k = self.config.region_pool
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)  # (B, Dv, gh, gw)
        pooled = F.avg_pool2d(grid, kernel_size=k, stride=k, ceil_mode=True)  # (B, Dv, gh/k, gw/k)
        return pooled.flatten(2).transpose(1, 2)

    def _scene_tokens(self, hidden: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        """[class token, mean of all patches, scene_grid x scene_grid pooled patches]."""
        patches = hidden[:, 1:]                                            # (B, gh*gw, Dv)
        s = self.config.scene_grid
        grid = patches.transpose(1, 2).reshape(patches.shape[0], -1, gh, gw)
        coarse = F.adaptive_avg_pool2d(grid, (s, s)).flatten(2).transpose(1, 2)  # (B, s*s, Dv)
        return torch.cat([hidden[:, :1], patches.mean(dim=1, keepdim=True), coarse], dim=1)
