"""Decoder-only language model from ``transformers``' Llama blocks, with semantic-expert MLPs.

Why not ``LlamaModel`` itself: each layer's feed-forward block must know every token's level
(text / object / region / scene) to route it to its expert, so the decoder layer here is a small
re-assembly of the Llama parts (``LlamaAttention`` with SDPA, ``LlamaRMSNorm``,
``LlamaRotaryEmbedding``, ``DynamicCache``) whose forward also takes ``token_levels``.  Module
names match ``LlamaModel``'s (``embed_tokens``, ``layers.i.self_attn``, ``layers.i.mlp``, ...),
so Llama/LLaVA weights map one to one.

Masks: left padding is supported; the caller gives a 2-D mask over past + current tokens and the
positions (see :func:`position_ids_from_mask`).  When there is no padding the mask is left to
SDPA's causal kernel (``None``), which is what makes the 7B model fast on a GPU.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import LlamaConfig
from transformers.cache_utils import Cache, DynamicCache
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from .config import RsLvlmConfig
from .experts import SemanticExpertMLP

__all__ = [
    "RsLvlmLanguageModel", "RsLvlmDecoderLayer", "llama_config", "build_attention_mask", "position_ids_from_mask",
]


def llama_config(config: RsLvlmConfig) -> LlamaConfig:
    """The ``LlamaConfig`` the transformers blocks read (sizes, RoPE, SDPA attention)."""
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=config.tie_word_embeddings,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        attn_implementation="sdpa",
    )


def position_ids_from_mask(
    attention_mask: torch.Tensor | None, q_len: int, past_len: int, device: torch.device
) -> torch.Tensor:
    """(B|1, q_len) RoPE positions; with left padding, the first real token of each row is 0."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + q_len, device=device)[None]
    pos = attention_mask.long().cumsum(-1) - 1                                  # (B, K)
    return pos.clamp(min=0)[:, -q_len:]


def build_attention_mask(
    attention_mask: torch.Tensor | None, q_len: int, past_len: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """2-D padding mask (B, past+q) -> additive (B, 1, q, past+q) causal mask, or ``None`` when
    SDPA's own causal path is exact (no padding, and either no past or a single query)."""
    if attention_mask is None or bool(attention_mask.all()):
        if past_len == 0 or q_len == 1:
            return None
    kv_len = past_len + q_len
    q_pos = torch.arange(past_len, kv_len, device=device)[:, None]              # (q, 1)
    k_pos = torch.arange(kv_len, device=device)[None, :]                        # (1, K)
    allowed = (k_pos <= q_pos)[None]                                            # (1, q, K)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]                   # (B, q, K)
    allowed = allowed | (k_pos == q_pos)[None]   # a padded query sees itself: no all-masked row (NaN)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]         # (B, 1, q, K)


class RsLvlmDecoderLayer(nn.Module):
    """Pre-norm Llama layer whose MLP is a :class:`SemanticExpertMLP` (or a plain LlamaMLP)."""

    def __init__(self, config: RsLvlmConfig, llama: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(llama, layer_idx)
        if config.use_experts:
            self.mlp: nn.Module = SemanticExpertMLP(
                config.hidden_size, config.intermediate_size, config.expert_intermediate_size, config.num_levels)
        else:
            self.mlp = LlamaMLP(llama)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,                                  # (B, T, H)
        token_levels: torch.Tensor,                                   # (B, T)
        attention_mask: torch.Tensor | None,                          # (B, 1, T, K) or None
        position_embeddings: tuple[torch.Tensor, torch.Tensor],       # cos, sin (B|1, T, hd)
        past_key_values: Cache | None = None,
    ) -> torch.Tensor:
        attn, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
        )
        hidden_states = hidden_states + attn
        normed = self.post_attention_layernorm(hidden_states)
        if isinstance(self.mlp, SemanticExpertMLP):
            return hidden_states + self.mlp(normed, token_levels)
        return hidden_states + self.mlp(normed)


class RsLvlmLanguageModel(nn.Module):
    """Embeddings, decoder layers, final norm and rotary embedding (the LM head is outside)."""

    def __init__(self, config: RsLvlmConfig) -> None:
        super().__init__()
        self.config = config
        self.llama_config = llama_config(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            RsLvlmDecoderLayer(config, self.llama_config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(self.llama_config)
        self.gradient_checkpointing = config.gradient_checkpointing

    def reset_rotary(self, device: torch.device | str | None = None) -> None:
        """Recompute the (non-persistent, float32) RoPE frequencies, e.g. after ``to_empty``."""
        device = device or self.embed_tokens.weight.device
        with torch.device(device):
            self.rotary_emb = LlamaRotaryEmbedding(self.llama_config)

    def forward(
        self,
        inputs_embeds: torch.Tensor,                    # (B, T, H)
        token_levels: torch.Tensor,                     # (B, T) long
        attention_mask: torch.Tensor | None = None,     # (B, past + T) 1 = real token
        position_ids: torch.Tensor | None = None,       # (B, T)
        past_key_values: Cache | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, Cache | None]:
        """Returns the final-norm hidden states (B, T, H) and the (updated) KV cache."""
        q_len = inputs_embeds.shape[1]
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, q_len, past_len, inputs_embeds.device)
        mask = build_attention_mask(attention_mask, q_len, past_len, inputs_embeds.dtype, inputs_embeds.device)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)      # cos, sin (B, T, hd)

        hidden = inputs_embeds
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and past_key_values is None:
                hidden = checkpoint(layer, hidden, token_levels, mask, position_embeddings, use_reentrant=False)
            else:
                hidden = layer(hidden, token_levels, mask, position_embeddings, past_key_values)
        return self.norm(hidden), past_key_values
