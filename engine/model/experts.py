"""Semantic-aware expert feed-forward block: a shared expert plus one expert per semantic level.

Why: the language model reads object-, region- and scene-level visual tokens and text in one
sequence, and the three levels call for different feed-forward transforms (fine object detail vs
land-cover texture vs scene layout).  Each visual token is *hard-routed* by its level id to its
level's expert; text tokens, which may talk about any level, use a learned softmax gate over the
level experts.  The shared expert sees every token and keeps the common language ability.

    y = shared(x) + expert_level(x)                       for visual tokens (levels 1..3)
    y = shared(x) + sum_l softmax(router(x))_l expert_l(x)   for text tokens (level 0)

Efficiency: the tokens of each expert are gathered and run through it once (``index_add`` puts
the results back), so a visual token costs shared + one expert, never all experts.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaMLP

__all__ = ["SemanticExpertMLP", "swiglu_mlp"]


def swiglu_mlp(hidden_size: int, intermediate_size: int) -> LlamaMLP:
    """A Llama SwiGLU MLP (gate_proj, up_proj, down_proj; no biases) of the given width."""
    return LlamaMLP(SimpleNamespace(hidden_size=hidden_size, intermediate_size=intermediate_size,
                                    mlp_bias=False, hidden_act="silu"))


class SemanticExpertMLP(nn.Module):
    """Shared expert + ``num_levels`` level experts, routed by ``token_levels`` (0 = text)."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, expert_intermediate_size: int, num_levels: int = 3
    ) -> None:
        super().__init__()
        self.num_levels = num_levels
        self.shared_expert = swiglu_mlp(hidden_size, intermediate_size)
        self.experts = nn.ModuleList(swiglu_mlp(hidden_size, expert_intermediate_size) for _ in range(num_levels))
        self.router = nn.Linear(hidden_size, num_levels, bias=False)

    def text_gate(self, x: torch.Tensor) -> torch.Tensor:
        """(M, H) text hidden states -> (M, num_levels) softmax weights over the level experts."""
        return torch.softmax(self.router(x).float(), dim=-1).to(x.dtype)

    def forward(self, x: torch.Tensor, token_levels: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, H); token_levels (B, T) long: 0 text, 1 object, 2 region, 3 scene."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])                                           # (M, H)
        if token_levels is None:
            levels = torch.zeros(flat.shape[0], dtype=torch.long, device=x.device)
        else:
            levels = token_levels.reshape(-1).to(x.device)                        # (M,)
        out = self.shared_expert(flat)                                            # (M, H)
        text_idx = (levels == 0).nonzero().squeeze(1)                             # (Mt,)
        gate = self.text_gate(flat[text_idx]) if text_idx.numel() else None       # (Mt, L)
        for e, expert in enumerate(self.experts):
            vis_idx = (levels == e + 1).nonzero().squeeze(1)                      # (Mv_e,)
            idx, weight = vis_idx, flat.new_ones(vis_idx.shape[0])
            if gate is not None:
                idx = torch.cat([vis_idx, text_idx])
                weight = torch.cat([weight, gate[:, e]])
            if idx.numel() == 0:
                continue
            out = out.index_add(0, idx, expert(flat[idx]) * weight[:, None])
        return out.view(shape)
