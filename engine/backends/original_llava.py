"""The original LLaVA / GeoChat checkpoint layout, mapped onto transformers' LLaVA.

Original layout (LLaVA-1.5's ``LlavaLlamaForCausalLM``, GeoChat's ``GeoChatLlamaForCausalLM``)::

    config.json        a Llama config plus mm_vision_tower, mm_projector_type ("mlp2x_gelu"),
                       mm_hidden_size, mm_vision_select_layer, mm_vision_select_feature, ...
    pytorch_model-*.bin / model-*.safetensors
                       model.embed_tokens.weight, model.layers.N.*, model.norm.weight, lm_head.weight,
                       model.mm_projector.0.{weight,bias}, model.mm_projector.2.{weight,bias}
                       (sometimes model.vision_tower.vision_tower.vision_model.* as well)
    tokenizer.model, tokenizer_config.json, ...
    + a separate CLIP vision tower folder (openai/clip-vit-large-patch14-336: a CLIPModel or
      CLIPVisionModel folder) named by mm_vision_tower.

Target: a transformers ``LlavaForConditionalGeneration`` folder, written with the parameter names
of the published transformers LLaVA checkpoints (llava-hf), which every transformers version
reads::

    language_model.model.*        <- model.embed_tokens / model.layers / model.norm
    language_model.lm_head.weight <- lm_head.weight
    multi_modal_projector.linear_1 / linear_2  <- model.mm_projector.0 / model.mm_projector.2
    vision_tower.vision_model.*   <- the CLIP tower's vision_model.* (or the checkpoint's own)

Three things are not renames:

* The image placeholder.  The original code splices image features in at a sentinel id (-200)
  that never reaches the embedding table; transformers' LLaVA looks the placeholder up first, so
  it must be a real token: ``<image>`` is added to the tokenizer and the embedding and LM-head
  matrices get one more row each (the mean of the existing rows, so that its logit is ordinary;
  the engine also never samples it).
* The image size.  GeoChat runs CLIP ViT-L/14-336 at 504 px: its 24x24 grid of position
  embeddings is interpolated to 36x36 when the tower is loaded, bicubic with aligned corners, the
  class-token row kept as is.  The same interpolation is applied here, once, and the vision config
  says 504 (:func:`interpolate_position_embedding`).
* The feature choice: ``mm_vision_select_layer`` -> ``vision_feature_layer``;
  ``mm_vision_select_feature`` "patch" (drop the class token) -> ``vision_feature_select_strategy``
  "default", "cls_patch" -> "full".
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from engine.errors import BAD_CHECKPOINT, BAD_REQUEST, EngineError

__all__ = ["text_config_from_original", "vision_config_from_tower", "map_original_key", "map_tower_key",
           "interpolate_position_embedding", "extend_rows", "llava_config", "published_name", "published_llava_key",
           "expected_shapes", "default_image_size", "GEOCHAT_IMAGE_SIZE", "KNOWN_TOWERS", "known_tower_config"]

GEOCHAT_IMAGE_SIZE = 504
POSITION_KEY = "vision_tower.vision_model.embeddings.position_embedding.weight"
LM_EMBED_KEY = "language_model.model.embed_tokens.weight"
LM_HEAD_KEY = "language_model.lm_head.weight"

# Llama config keys carried from the original config into text_config.
TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
             "rope_theta", "rope_scaling", "rope_parameters", "attention_bias", "mlp_bias", "initializer_range",
             "pretraining_tp", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "use_cache")
VISION_KEYS = ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers", "num_attention_heads",
               "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout",
               "initializer_range", "initializer_factor")
_DROP = re.compile(r"(\.rotary_emb\.inv_freq|(^|\.)position_ids)$")


# -- configs -----------------------------------------------------------------------------------
def text_config_from_original(config: dict, vocab_size: int) -> dict:
    """The Llama part of an original config as a transformers ``text_config`` dict."""
    text = {k: config[k] for k in TEXT_KEYS if k in config and config[k] is not None}
    text.update(model_type="llama", vocab_size=int(vocab_size),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)))
    return text


def vision_config_from_tower(tower_dir: Path, image_size: int) -> dict:
    """A ``clip_vision_model`` config dict from a CLIPModel or CLIPVisionModel folder, at ``image_size``."""
    from transformers import CLIPVisionConfig

    try:
        vision = CLIPVisionConfig.from_pretrained(str(tower_dir), local_files_only=True).to_dict()
    except Exception as exc:
        raise EngineError(BAD_CHECKPOINT,
                          f"{tower_dir} is not a CLIP vision tower folder (config.json): {exc}") from None
    out = {k: vision[k] for k in VISION_KEYS if k in vision}
    if image_size % int(out["patch_size"]):
        raise EngineError(BAD_REQUEST,
                          f"image size {image_size} is not a multiple of the tower's patch size {out['patch_size']}")
    out.update(model_type="clip_vision_model", image_size=int(image_size))
    return out


KNOWN_TOWERS: dict[str, dict] = {
    # Published configs of the CLIP towers LLaVA-1.5 / GeoChat name in mm_vision_tower, used when the
    # checkpoint carries the tower's weights itself and no tower folder is given.
    "openai/clip-vit-large-patch14-336": dict(hidden_size=1024, intermediate_size=4096, projection_dim=768,
                                              num_hidden_layers=24, num_attention_heads=16, num_channels=3,
                                              image_size=336, patch_size=14, hidden_act="quick_gelu",
                                              layer_norm_eps=1e-5, attention_dropout=0.0),
    "openai/clip-vit-large-patch14": dict(hidden_size=1024, intermediate_size=4096, projection_dim=768,
                                          num_hidden_layers=24, num_attention_heads=16, num_channels=3,
                                          image_size=224, patch_size=14, hidden_act="quick_gelu",
                                          layer_norm_eps=1e-5, attention_dropout=0.0),
}


def known_tower_config(name: str, image_size: int | None = None) -> dict | None:
    """The vision config of a tower named in mm_vision_tower, at ``image_size``; None if unknown."""
    base = KNOWN_TOWERS.get(str(name).rstrip("/"))
    if base is None:
        return None
    out = dict(base, model_type="clip_vision_model")
    if image_size is not None:
        if image_size % out["patch_size"]:
            raise EngineError(BAD_REQUEST, f"image size {image_size} is not a multiple of the tower's patch size "
                                           f"{out['patch_size']}")
        out["image_size"] = int(image_size)
    return out


def default_image_size(config: dict, tower_image_size: int) -> int:
    """GeoChat runs its tower at 504 px; other LLaVA-1.5 checkpoints at the tower's own size."""
    names = " ".join([str(config.get("model_type", ""))] + [str(a) for a in config.get("architectures") or []])
    return GEOCHAT_IMAGE_SIZE if "geochat" in names.lower() else int(tower_image_size)


def feature_strategy(config: dict) -> str:
    select = config.get("mm_vision_select_feature", "patch")
    if select == "patch":
        return "default"
    if select == "cls_patch":
        return "full"
    raise EngineError(BAD_CHECKPOINT, f"mm_vision_select_feature {select!r} is not supported (patch or cls_patch)")


def check_projector(config: dict) -> None:
    kind = config.get("mm_projector_type", "linear")
    if kind != "mlp2x_gelu":
        raise EngineError(BAD_CHECKPOINT, (
            f"mm_projector_type {kind!r} is not supported: transformers' LLaVA has the two-layer GELU projector "
            "of LLaVA-1.5 / GeoChat (mlp2x_gelu) only"))


def llava_config(config: dict, text_config: dict, vision_config: dict, image_token_index: int) -> dict:
    """The converted folder's config.json as a dict (a transformers LlavaConfig + our extras)."""
    from transformers import LlavaConfig

    check_projector(config)
    grid = vision_config["image_size"] // vision_config["patch_size"]
    strategy = feature_strategy(config)
    layer = config.get("mm_vision_select_layer", -2)
    mm_hidden = config.get("mm_hidden_size")
    if mm_hidden is not None and int(mm_hidden) != int(vision_config["hidden_size"]):
        raise EngineError(BAD_CHECKPOINT, f"mm_hidden_size {mm_hidden} does not match the vision tower's hidden size "
                                          f"{vision_config['hidden_size']}: wrong --vision-tower?")
    cfg = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=int(image_token_index),
                      image_seq_length=grid * grid + (1 if strategy == "full" else 0), projector_hidden_act="gelu",
                      vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                      multimodal_projector_bias=True, tie_word_embeddings=bool(text_config.get("tie_word_embeddings")))
    out = cfg.to_dict()
    out["architectures"] = ["LlavaForConditionalGeneration"]
    return out


# -- parameter names ---------------------------------------------------------------------------
_ORIGINAL_RULES = (
    ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.embed_tokens.", "language_model.model.embed_tokens."),
    ("model.layers.", "language_model.model.layers."),
    ("model.norm.", "language_model.model.norm."),
    ("lm_head.", "language_model.lm_head."),
)


def map_original_key(key: str) -> str | None:
    """Published LLaVA name of an original-layout parameter; ``None`` for buffers to drop.

    Raises BAD_CHECKPOINT for a name the mapping does not know (better than dropping weights).
    """
    if _DROP.search(key):
        return None
    for old, new in _ORIGINAL_RULES:
        if key.startswith(old):
            return new + key[len(old):]
    if key.startswith("model.mm_projector."):
        raise EngineError(BAD_CHECKPOINT, f"projector parameter {key!r} does not fit the mlp2x_gelu projector")
    raise EngineError(BAD_CHECKPOINT, f"unexpected parameter {key!r} in an original LLaVA checkpoint")


_TOWER_PARTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")


def map_tower_key(key: str) -> str | None:
    """Published name of a CLIP tower parameter (CLIPModel or CLIPVisionModel); ``None``: not vision."""
    if _DROP.search(key):
        return None
    if key.startswith("vision_model."):
        return "vision_tower." + key
    if key.startswith(_TOWER_PARTS):
        return "vision_tower.vision_model." + key
    return None  # text_model.*, visual_projection, logit_scale ... of a full CLIPModel


def published_name(runtime_key: str) -> str:
    """Runtime ``LlavaForConditionalGeneration`` parameter name -> published checkpoint name."""
    if runtime_key.startswith("model.language_model."):
        return "language_model.model." + runtime_key[len("model.language_model."):]
    if runtime_key.startswith("lm_head."):
        return "language_model." + runtime_key
    if runtime_key.startswith("model.vision_tower."):
        rest = runtime_key[len("model.vision_tower."):]
        return "vision_tower." + (rest if rest.startswith("vision_model.") else "vision_model." + rest)
    if runtime_key.startswith("model.multi_modal_projector."):
        return runtime_key[len("model."):]
    return runtime_key


def published_llava_key(key: str) -> str | None:
    """Any transformers LLaVA checkpoint name (published, runtime v4 or v5) -> published; None: drop."""
    if _DROP.search(key):
        return None
    if key.startswith("model."):
        return published_name(key)
    if key.startswith("lm_head."):
        return "language_model." + key
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + key[len("vision_tower."):]
    return key


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Published name -> shape of every persistent tensor of the model a config describes.

    Built on the meta device (no memory, no initialisation), so a 7B config costs milliseconds.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig.from_dict({k: v for k, v in config.items() if k not in ("rs_lvlm", "image_size")})
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    shapes = {published_name(k): tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop(LM_HEAD_KEY, None)
    return shapes


# -- tensors -----------------------------------------------------------------------------------
def interpolate_position_embedding(weight: torch.Tensor, new_grid: int) -> torch.Tensor:
    """(1 + g*g, D) CLIP position embeddings -> (1 + G*G, D), class-token row kept.

    The g x g grid is resampled bicubically with aligned corners (as GeoChat does at load time, so
    the converted tower computes what GeoChat computed); the four corner embeddings are kept exactly.
    """
    n, dim = weight.shape
    grid = int(math.isqrt(n - 1))
    if grid * grid != n - 1:
        raise EngineError(BAD_CHECKPOINT, f"position embedding with {n - 1} patch rows is not a square grid")
    if grid == new_grid:
        return weight
    cls_row, patches = weight[:1], weight[1:]
    img = patches.float().reshape(grid, grid, dim).permute(2, 0, 1).unsqueeze(0)      # (1, D, g, g)
    img = torch.nn.functional.interpolate(img, size=(new_grid, new_grid), mode="bicubic", align_corners=True)
    patches = img[0].permute(1, 2, 0).reshape(new_grid * new_grid, dim).to(weight.dtype)
    return torch.cat([cls_row, patches], dim=0)


def extend_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Append rows (the mean of the existing ones) up to ``rows``: for new tokens such as ``<image>``."""
    if weight.shape[0] >= rows:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)], dim=0)


def map_original_shard(state: dict[str, torch.Tensor], vocab_rows: int, grid: int,
                       keep_tower: bool = True) -> dict[str, Any]:
    """One shard of original weights -> published names, with the vocabulary and grid adapted.

    ``keep_tower=False`` drops the checkpoint's own copy of the vision tower (the tower folder's
    weights are used instead, as GeoChat / LLaVA do at inference: they reload the tower from
    mm_vision_tower and ignore the copy).
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = map_original_key(key)
        if name is None or (not keep_tower and name.startswith("vision_tower.")):
            continue
        if name in (LM_EMBED_KEY, LM_HEAD_KEY):
            tensor = extend_rows(tensor, vocab_rows)
        elif name == POSITION_KEY:
            tensor = interpolate_position_embedding(tensor, grid)
        out[name] = tensor
    return out


def map_tower(state: dict[str, torch.Tensor], grid: int) -> dict[str, torch.Tensor]:
    """A CLIP tower's weights -> the LLaVA vision tower's published names, at the new grid."""
    out = {}
    for key, tensor in state.items():
        name = map_tower_key(key)
        if name is None:
            continue
        out[name] = interpolate_position_embedding(tensor, grid) if name == POSITION_KEY else tensor
    return out
