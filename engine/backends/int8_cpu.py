"""Weight-only int8 for a LLaVA-family language model on the CPU, converted layer by layer.

Why layer by layer: a 7B model in float32 needs about 28 GB; loaded in bfloat16 (14 GB) and
converted one decoder layer at a time (that layer alone in float32, then its linear layers as
per-channel int8 matrices run by PyTorch's dynamically quantised kernel), the peak stays near
the bfloat16 size and the result is about a quarter of float32.  Norms, embeddings and the
vision tower stay in float32: they are a small part of the bytes and the int8 kernel takes
float32 activations.

The decode step (:class:`Int8FusedDecoder`) is the fused static-cache step of
:mod:`engine.model.fast_decode` run on these same int8 modules: it holds references to the
model's quantised linear layers (no second copy of the weights, none in float32) and takes from
the fused step its preallocated KV cache written in place, its RoPE table and its single
attention call per layer.  The prefill is transformers' forward on the same modules, so the two
compute the same function.
"""
from __future__ import annotations

import gc
import warnings

import torch
from torch import nn

from engine.model.fast_decode import FusedDecoder, ModuleLayer

__all__ = ["quantize_language_model_int8", "int8_linear_count", "Int8FusedDecoder"]


def _quantize_module(module: nn.Module) -> nn.Module:
    """``module``'s linear layers as int8 matrices with one scale per output channel, in place."""
    from torch.ao.quantization import per_channel_dynamic_qconfig

    with warnings.catch_warnings():       # torch points eager quantisation users to torchao
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(module.float(), {nn.Linear: per_channel_dynamic_qconfig},
                                                      dtype=torch.qint8, inplace=True)


def quantize_language_model_int8(model: nn.Module) -> nn.Module:
    """``model`` (a transformers LlavaForConditionalGeneration) with int8 LM matrices, in place."""
    inner = model.model
    language_model = inner.language_model
    for index in range(len(language_model.layers)):
        language_model.layers[index] = _quantize_module(language_model.layers[index])
        gc.collect()
    language_model.embed_tokens.float()
    language_model.norm.float()
    if getattr(language_model, "rotary_emb", None) is not None:
        language_model.rotary_emb.float()
    tied = model.lm_head.weight is language_model.embed_tokens.weight
    if tied:   # the head shares the embedding: keep one float32 copy rather than two tensors
        model.lm_head.float()
    else:
        model.lm_head = _quantize_module(model.lm_head)
    inner.vision_tower.float()
    inner.multi_modal_projector.float()
    gc.collect()
    return model


def int8_linear_count(module: nn.Module) -> int:
    """How many linear layers run as int8 (for ``info`` and the tests)."""
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    return sum(isinstance(m, dynamic) for m in module.modules())


class _Int8Layer(ModuleLayer):
    """One quantised Llama decoder layer for the fused step (its own int8 modules, no copy)."""

    def __init__(self, layer: nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        dynamic = torch.ao.nn.quantized.dynamic.Linear
        modules = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if not all(isinstance(m, dynamic) for m in modules):
            raise ValueError("the int8 decode step needs a language model quantised by quantize_language_model_int8")
        super().__init__(layer)


class Int8FusedDecoder(FusedDecoder):
    """:class:`FusedDecoder`'s step over an int8 LLaVA language model (``--precision int8``).

    Only the weights differ from the float step: each layer's products are the model's own
    quantised modules (:class:`_Int8Layer`) and the head is ``lm_head`` as the model holds it
    (int8, or float32 when tied to the embedding).  Building one is cheap (no weight is copied),
    so one is made per request.
    """

    def __init__(self, model: nn.Module, batch: int, capacity: int) -> None:
        lm = model.model.language_model
        if lm.embed_tokens.weight.dtype != torch.float32 or lm.embed_tokens.weight.device.type != "cpu":
            raise ValueError("the int8 decode step runs on the CPU with float32 activations")
        super().__init__(model, batch, capacity, language_model=lm, lm_head=model.lm_head,
                         weights=([_Int8Layer(layer) for layer in lm.layers], model.lm_head))
