"""The decode step of generation on fused weights and a preallocated KV cache.

Why: after the prefill, every generated token runs the language model on one position per row.
For the embedded model that step is a few dozen tiny matrix products, so its time is Python and
dispatch overhead, not arithmetic: the module-by-module path (``LlamaAttention``, one expert
at a time with ``index_add``, a ``DynamicCache`` that concatenates) costs several times the
arithmetic.  The decoder here computes exactly the same function for *text* tokens (all that is
ever decoded) with fewer, larger operations:

* q, k and v projections as one matrix product per layer;
* the semantic-expert block for a text token, ``shared(x) + sum_l g_l(x) expert_l(x)``, as one
  gate/up product over the concatenated experts, the gate weights applied per expert slice, and
  one down product over the concatenated down projections;
* a static KV cache written in place (no concatenation), attended with SDPA over the filled part;
* RoPE cos/sin computed once for the whole cache by the model's rotary embedding, then looked up.

On a CPU the step is bound by reading the weights (about 24 MB per token for the embedded
model), so ``int8=True`` stores the step's matrices as per-channel int8 and runs them with
PyTorch's dynamically quantised linear kernel (fbgemm / oneDNN): a quarter of the bytes, at the
price of a small, measured change of the answers (docs/performance.md).  The prefill stays in
the model's own precision.

The prefill (image, retrieval, visual tokens routed by level) still runs the reference model; its
cache is copied into the static one.  ``tests/engine/test_fast_decode.py`` checks that both paths
give the same tokens and logits within float tolerance; ``generate(..., fast=False)`` is the
reference path.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from .experts import SemanticExpertMLP

__all__ = ["FusedDecoder", "ModuleLayer"]


class _Matrix:
    """A weight matrix (out, in) applied as ``x @ W.T (+ b)``: float, or per-channel int8."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, int8: bool = False) -> None:
        self.weight, self.bias, self.packed = weight, bias, None
        if int8:
            if weight.device.type != "cpu" or weight.dtype != torch.float32:
                raise ValueError("int8 decoding needs a float32 model on the CPU")
            w = weight.detach()
            scales = (w.abs().amax(dim=1).clamp(min=1e-8) / 127.0).double()
            with warnings.catch_warnings():   # torch points eager quantisation users to torchao
                warnings.simplefilter("ignore")
                q = torch.quantize_per_channel(w, scales, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(q, None if bias is None else bias.detach())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.quantized.linear_dynamic(x, self.packed, False)
        return F.linear(x, self.weight, self.bias)


class _FusedLayer:
    """One decoder layer's weights, fused for a single-position (text) step."""

    def __init__(self, layer: nn.Module, int8: bool = False) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.ln1, self.ln2 = layer.input_layernorm, layer.post_attention_layernorm            # LlamaRMSNorm
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        qkv = torch.cat([m.weight for m in projections], dim=0)                                  # (Q+2K, H)
        qkv_bias = (torch.cat([m.bias for m in projections]) if attn.q_proj.bias is not None else None)
        self.qkv = _Matrix(qkv, qkv_bias, int8=int8)
        self.q_size, self.kv_size = attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0]
        self.head_dim = int(attn.head_dim)
        self.o = _Matrix(attn.o_proj.weight, attn.o_proj.bias, int8=int8)                       # (H, Q)
        self.scaling = attn.scaling
        if isinstance(mlp, SemanticExpertMLP):
            parts = [mlp.shared_expert, *mlp.experts]
            self.router = mlp.router.weight                                                      # (L, H)
            widths = [p.gate_proj.weight.shape[0] for p in parts]
            # Row e of `spread` puts expert e's weight (1 for the shared expert) on its slice.
            spread = torch.zeros(len(parts), sum(widths), dtype=qkv.dtype, device=qkv.device)
            start = 0
            for e, width in enumerate(widths):
                spread[e, start:start + width] = 1.0
                start += width
            self.spread = spread                                                                 # (1+L, I)
        else:
            parts, self.router, self.spread = [mlp], None, None
        gate_up = torch.cat([p.gate_proj.weight for p in parts] + [p.up_proj.weight for p in parts], dim=0)
        gate_up_bias = None
        if parts[0].gate_proj.bias is not None:                                                  # Llama mlp_bias
            gate_up_bias = torch.cat([p.gate_proj.bias for p in parts] + [p.up_proj.bias for p in parts])
        self.gate_up = _Matrix(gate_up, gate_up_bias, int8=int8)                                 # (2I, H)
        down_bias = parts[0].down_proj.bias
        if down_bias is not None and len(parts) > 1:
            raise ValueError("biased down projections in semantic experts are not supported by the fused step")
        self.down = _Matrix(torch.cat([p.down_proj.weight for p in parts], dim=1), down_bias, int8=int8)  # (H, I)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H) -> (B, H): shared + gated level experts (or the plain SwiGLU MLP)."""
        gate, up = self.gate_up(x).chunk(2, dim=-1)                                    # (B, I) each
        h = F.silu(gate) * up
        if self.router is not None:
            g = torch.softmax(F.linear(x, self.router).float(), dim=-1).to(x.dtype)             # (B, L)
            weights = torch.cat([torch.ones_like(g[:, :1]), g], dim=-1)                          # (B, 1+L)
            h = h * (weights @ self.spread)
        return self.down(h)


class ModuleLayer:
    """One Llama decoder layer seen as the fused step sees a layer, stepped on the layer's own
    projection modules (float or int8): no weight is copied.

    Why: fusing q/k/v and gate/up copies about two thirds of a language model's weights, 9 GB
    for a 7B in bfloat16, while the prefill still reads the originals; for a model that barely
    fits, the second copy is what does not fit.  At batch 1 a decode step is bound by reading
    each weight once either way, so three products instead of one cost little."""

    def __init__(self, layer: nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.ln1, self.ln2 = layer.input_layernorm, layer.post_attention_layernorm
        self._q, self._k, self._v, self.o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self._gate, self._up, self.down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self._act = mlp.act_fn
        self.q_size, self.kv_size = attn.q_proj.out_features, attn.k_proj.out_features
        self.head_dim = int(attn.head_dim)
        self.scaling = attn.scaling

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H) -> (B, Q + 2K)."""
        return torch.cat([self._q(x), self._k(x), self._v(x)], dim=-1)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H) -> (B, H): the SwiGLU MLP."""
        return self.down(self._act(self._gate(x)) * self._up(x))

    def matrices(self) -> tuple[nn.Module, ...]:
        return self._q, self._k, self._v, self.o, self._gate, self._up, self.down


def _version(tensor: torch.Tensor) -> int:
    """In-place modification counter (-1 for tensors made under inference_mode, which have none)."""
    try:
        return tensor._version
    except RuntimeError:
        return -1


def _fused_weights(owner: nn.Module, language_model: nn.Module, lm_head: nn.Module,
                   int8: bool) -> tuple[list[_FusedLayer], _Matrix]:
    """The fused layers and LM head of a model, built once and kept on ``owner``.

    Fusing copies every matrix of the language model (and int8 packing quantises it), which
    would cost more than a short answer's decoding if done per request; the copy is rebuilt
    only when a parameter was replaced or changed in place (its ``_version`` moved on)."""
    params = list(language_model.parameters()) + list(lm_head.parameters())
    key = (int8, tuple((p.data_ptr(), _version(p), p.dtype, p.device) for p in params))
    cached = owner.__dict__.get("_fused_decode_weights", {})
    if cached.get(int8, (None,))[0] != key:
        layers = [_FusedLayer(layer, int8) for layer in language_model.layers]
        cached[int8] = (key, layers, _Matrix(lm_head.weight, lm_head.bias, int8=int8))
        owner.__dict__["_fused_decode_weights"] = cached
    return cached[int8][1], cached[int8][2]


class FusedDecoder:
    """Decode steps for one batch of generation: static cache of ``capacity`` positions.

    Any Llama-family language model: the embedded model (``model.language_model`` and
    ``model.lm_head``) or, given ``language_model`` and ``lm_head``, a transformers LLaVA's
    (grouped-query attention, any head size, biases and RoPE scaling as its config says: the
    rotary embedding is the model's own).
    """

    def __init__(self, model: nn.Module, batch: int, capacity: int, int8: bool = False, *,
                 language_model: nn.Module | None = None, lm_head: nn.Module | None = None,
                 weights: tuple[list, nn.Module] | None = None) -> None:
        """``weights``: (layers, head) to step with instead of the fused copies built here (a
        backend's own quantised modules); each layer needs ``head_dim``, ``q_size``, ``kv_size``."""
        lm = model.language_model if language_model is None else language_model
        head = model.lm_head if lm_head is None else lm_head
        self.layers, self.head = weights if weights is not None else _fused_weights(model, lm, head, int8)
        self.embed = lm.embed_tokens.weight
        self.final_norm = lm.norm
        first = self.layers[0]
        self.head_dim = first.head_dim
        self.heads, self.kv_heads = first.q_size // first.head_dim, first.kv_size // first.head_dim
        device, dtype = self.embed.device, self.embed.dtype
        positions = torch.arange(capacity, device=device)[None]                                  # (1, P)
        cos, sin = lm.rotary_emb(self.embed, positions)                                          # (1, P, hd)
        self.cos, self.sin = cos[0], sin[0]                                                      # looked up per step
        shape = (len(self.layers), batch, self.kv_heads, capacity, self.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self.capacity = capacity

    def load_cache(self, cache) -> None:
        """Copy a prefill ``DynamicCache`` (per layer (B, kv_heads, T, hd)) into the static cache."""
        for i, layer in enumerate(cache.layers):
            t = layer.keys.shape[-2]
            if t > self.capacity:
                raise ValueError(f"prompt of {t} positions exceeds the cache of {self.capacity}")
            self.keys[i, :, :, :t] = layer.keys
            self.values[i, :, :, :t] = layer.values
        self.length = cache.layers[0].keys.shape[-2]

    def step(self, tokens: torch.Tensor, attention_mask: torch.Tensor,
             extra: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B,), attention_mask (B, length + 1) over cache + this token -> logits (B, V);
        ``extra`` (B, H) is added to the tokens' embeddings (the embedded model's reference feedback)."""
        if self.length >= self.capacity:
            raise ValueError("the static KV cache is full")
        b, pos = tokens.shape[0], self.length
        positions = (attention_mask.long().sum(-1) - 1).clamp(min=0)                             # (B,)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]                    # (B, 1, hd)
        additive = torch.zeros(attention_mask.shape, dtype=self.embed.dtype, device=self.embed.device)
        additive = additive.masked_fill(~attention_mask.bool(), torch.finfo(additive.dtype).min)
        additive = additive[:, None, None, :]                                                    # (B, 1, 1, K)
        hidden = F.embedding(tokens, self.embed)                                                 # (B, H)
        if extra is not None:
            hidden = hidden + extra.to(hidden.dtype)
        gqa = self.heads != self.kv_heads
        for i, layer in enumerate(self.layers):
            x = layer.ln1(hidden)
            q, k, v = layer.qkv(x).split([layer.q_size, layer.kv_size, layer.kv_size], dim=-1)
            q = q.view(b, self.heads, self.head_dim)
            k = k.view(b, self.kv_heads, self.head_dim)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            self.keys[i, :, :, pos] = k
            self.values[i, :, :, pos] = v.view(b, self.kv_heads, self.head_dim)
            attn = F.scaled_dot_product_attention(
                q[:, :, None], self.keys[i, :, :, :pos + 1], self.values[i, :, :, :pos + 1],
                attn_mask=additive, scale=layer.scaling, enable_gqa=gqa)                         # (B, h, 1, hd)
            hidden = hidden + layer.o(attn.reshape(b, -1))
            hidden = hidden + layer.mlp(layer.ln2(hidden))
        self.length += 1
        return self.head(self.final_norm(hidden))       # (B, V)
