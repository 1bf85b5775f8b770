"""Multi-level alignment: one projector per level into the language model's embedding space.

Why one projector per level: object, region and scene tokens come from different depths and
poolings of the backbone and have different statistics, so each level gets its own 2-layer MLP
(LLaVA-1.5's projector shape, so a LLaVA projector can initialise all three).  A learned level
embedding is added to every projected token, so that every visual token "knows its level" in the
language model even before the level experts see it.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import LEVEL_NAMES, RsLvlmConfig

__all__ = ["LevelProjector", "MultiLevelProjector"]


class LevelProjector(nn.Module):
    """Linear -> GELU -> Linear, named like LLaVA's ``multi_modal_projector``."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class MultiLevelProjector(nn.Module):
    """Projects (object, region, scene) tokens and concatenates them in that order."""

    def __init__(self, config: RsLvlmConfig) -> None:
        super().__init__()
        self.projectors = nn.ModuleList(
            LevelProjector(config.vision_hidden_size, config.hidden_size) for _ in LEVEL_NAMES
        )
        self.level_embedding = nn.Embedding(len(LEVEL_NAMES), config.hidden_size)

    def forward(self, levels: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """levels: (B, N_l, Dv) per level -> embeds (B, Nv, H) and token_levels (Nv,) in 1..3."""
        embeds, token_levels = [], []
        for index, tokens in enumerate(levels):
            level = self.level_embedding.weight[index]                          # (H,)
            embeds.append(self.projectors[index](tokens) + level.to(tokens.dtype))
            token_levels.append(torch.full((tokens.shape[1],), index + 1, dtype=torch.long, device=tokens.device))
        return torch.cat(embeds, dim=1), torch.cat(token_levels)
