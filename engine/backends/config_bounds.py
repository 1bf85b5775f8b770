"""Bounds on a checkpoint's config.json, checked before anything is allocated from it.

Why: a model's sizes come from its config.json, and torch allocates what it is told.  A config
with ``image_size: 96000`` made the engine try a 25.7 GiB array; ``num_hidden_layers: 1000000``
ran for minutes building layers.  As safetensors checks a header's offsets before it maps any
tensor, this module checks every size a config can hold, at any nesting depth (``text_config``,
``vision_config``...), against bounds far above any real vision-language model, and refuses the
config with the offending figures in a ``bad_checkpoint`` error otherwise.

The bounds (:data:`BOUNDS`) are by key name: ``image_size`` up to 4096 pixels, layer counts up
to 512, hidden sizes up to 65,536, feed-forward sizes up to 262,144, heads up to 1,024, the
vocabulary up to 2^21 tokens, positions up to 2^20; a size must be a whole number, not a bool.
A rough parameter count per language or vision tower (layers x (4 h^2 + 3 h i) + vocab x h) is
bounded too (:data:`MAX_PARAMETERS`), since sizes that are each plausible can still multiply
out to a model no machine holds.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterator

from engine.errors import BAD_CHECKPOINT, EngineError

__all__ = ["BOUNDS", "MAX_PARAMETERS", "MAX_CONFIG_BYTES", "check_config"]

MAX_CONFIG_BYTES = 4 * 1024 * 1024
"""A config.json larger than this is refused unread (real ones are a few kilobytes)."""

MAX_DEPTH = 16
MAX_PARAMETERS = 2 * 10 ** 12
"""Two trillion parameters: beyond every published model."""

# (key pattern, smallest, largest) - the first pattern a key matches decides.
BOUNDS: list[tuple[re.Pattern[str], int, int]] = [(re.compile(p), lo, hi) for p, lo, hi in (
    (r"image_size$|^size$|crop_size$", 1, 4096),
    (r"patch_size$", 1, 4096),
    (r"(^|_)(num_)?(hidden_)?layers$|^n_layers?$", 0, 512),
    (r"_layers?$", -512, 512),       # a layer picked by index (vision_feature_layer: -2)
    (r"num_channels$", 1, 64),
    (r"intermediate_size$|ffn_dim$|^n_inner$|ffn_mult$", 0, 262_144),
    (r"hidden_size$|^d_model$|^n_embd$|embed_dim$|_dim$|_channels$", 0, 65_536),
    (r"heads$", 0, 1024),
    (r"vocab_size$", 1, 2 ** 21),
    (r"max_position_embeddings$|^n_positions$|max_length$|model_max_length$", 1, 2 ** 20),
    (r"^num_|_grid$|_pool$|top_k$", 0, 65_536),
)]


def _rule(key: str) -> tuple[int, int] | None:
    for pattern, lo, hi in BOUNDS:
        if pattern.search(key):
            return lo, hi
    return None


def _walk(node: Any, path: str, depth: int) -> Iterator[tuple[str, str, Any]]:
    """(dotted path, key, value) for every dict entry, refusing absurd nesting."""
    if depth > MAX_DEPTH:
        raise EngineError(BAD_CHECKPOINT, f"config.json nests deeper than {MAX_DEPTH} levels at {path}")
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            yield where, str(key), value
            yield from _walk(value, where, depth + 1)
    elif isinstance(node, list):
        for i, value in enumerate(node[:4096]):
            yield from _walk(value, f"{path}[{i}]", depth + 1)


def _size(where: str, value: Any, lo: int, hi: int) -> None:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or \
                (isinstance(v, float) and not (math.isfinite(v) and v.is_integer())):
            raise EngineError(BAD_CHECKPOINT, f"config.json {where} = {str(v)[:40]!r} is not a whole number")
        if not lo <= v <= hi:
            raise EngineError(BAD_CHECKPOINT, f"config.json {where} = {int(v):,} is outside {lo:,}..{hi:,}; "
                                              "refused before allocating anything")


def _parameters(node: dict) -> int:
    """A rough parameter count of the tower one config dict describes (0 when it names none)."""
    def num(*keys: str) -> int:
        for key in keys:
            v = node.get(key)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
        return 0

    h = num("hidden_size", "d_model", "n_embd", "vision_hidden_size")
    layers = num("num_hidden_layers", "num_layers", "n_layer", "vision_num_layers")
    inter = num("intermediate_size", "ffn_dim", "n_inner", "vision_intermediate_size") or 4 * h
    return layers * (4 * h * h + 3 * h * inter) + num("vocab_size") * h


def check_config(config: Any, source: str = "config.json") -> dict:
    """``config`` if it is a JSON object whose sizes are all in bounds; else ``bad_checkpoint``."""
    if not isinstance(config, dict):
        raise EngineError(BAD_CHECKPOINT, f"{source} does not hold a JSON object (found {type(config).__name__})")
    dicts = [config]
    for where, key, value in _walk(config, "", 0):
        if isinstance(value, dict):
            dicts.append(value)
        rule = _rule(key)
        if rule is not None and not isinstance(value, dict):
            _size(where, value, *rule)
    image, patch = config.get("image_size"), config.get("patch_size")
    if isinstance(image, int) and isinstance(patch, int) and patch > 0 and (image // patch) ** 2 > 65_536:
        raise EngineError(BAD_CHECKPOINT, f"{source}: image_size {image} / patch_size {patch} gives "
                                          f"{(image // patch) ** 2:,} patches; at most 65,536")
    for node in dicts:
        params = _parameters(node)
        if params > MAX_PARAMETERS:
            raise EngineError(BAD_CHECKPOINT, f"{source} describes about {params:,} parameters "
                                              f"(more than {MAX_PARAMETERS:,}); refused before allocating")
    return config
