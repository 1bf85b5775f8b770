"""The RS-LVLM model: multi-level vision, Semantic Augmentation (retrieval), level projectors,
semantic-aware experts in a Llama-family decoder; tokenizer, prompts, decode steps, checkpoints.

Imports are lazy (``from engine.model import RsLvlmForConditionalGeneration`` loads torch only then), so that pure
helpers such as :mod:`engine.grounding` stay cheap to import.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RsLvlmConfig": "config",
    "LEVEL_NAMES": "config",
    "MultiLevelVisionEncoder": "vision",
    "SemanticAugmentation": "semantic_augmentation",
    "MultiLevelProjector": "projector",
    "SemanticExpertMLP": "experts",
    "RsLvlmLanguageModel": "language_model",
    "RsLvlmForConditionalGeneration": "modeling_rs_lvlm",
    "RsLvlmOutput": "modeling_rs_lvlm",
    "preprocess_images": "image_processing",
    "build_tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "build_prompt": "prompts",
    "encode_prompt": "prompts",
    "encode_example": "prompts",
    "pad_batch": "prompts",
    "RsLvlmDecodeSteps": "generation",
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "LoadedModel": "checkpoint",
    "from_llava_checkpoint": "llava_adapter",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
