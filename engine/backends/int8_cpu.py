"""Weight-only int8 for a LLaVA-family language model on the CPU, converted layer by layer.

Why layer by layer: a 7B model in float32 needs about 28 GB; loaded in bfloat16 (14 GB) and
converted one decoder layer at a time (that layer alone in float32, then its linear layers as
per-channel int8 matrices run by PyTorch's dynamically quantised kernel), the peak stays near
the bfloat16 size and the result is about a quarter of float32.  Norms, embeddings and the
vision tower stay in float32: they are a small part of the bytes and the int8 kernel takes
float32 activations.
"""
from __future__ import annotations

import gc
import warnings

import torch
from torch import nn

__all__ = ["quantize_language_model_int8", "int8_linear_count"]


def _quantize_module(module: nn.Module) -> nn.Module:
    with warnings.catch_warnings():       # torch points eager quantisation users to torchao
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(module.float(), {nn.Linear}, dtype=torch.qint8, inplace=True)


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
