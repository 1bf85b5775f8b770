"""Start from a LLaVA-family checkpoint (``transformers`` ``LlavaForConditionalGeneration`` layout).

Why: a user with a GPU should not train a 7B vision-language model from nothing.  A LLaVA folder
supplies a CLIP vision tower and a Llama language model that already talk to each other; this
module maps them tensor for tensor into the RS-LVLM (our vision encoder has CLIP's layout, our
decoder Llama's names) and leaves only the new parts to be learned:

* vision tower -> :class:`MultiLevelVisionEncoder`; by default all three levels are read at
  LLaVA's ``vision_feature_layer`` (where its projector was trained) and differ by pooling;
  override ``object_layer`` / ``region_layer`` / ``scene_layer`` to read other depths;
* LLaVA's projector -> each of the three level projectors; level embeddings start at zero;
* Llama LM -> our LM; each layer's dense MLP becomes the *shared* expert, and each level expert
  is initialised from a slice of the dense MLP's channels (gate/up) with a zero down-projection,
  so at initialisation the language model computes exactly what LLaVA's did;
* the Semantic Augmentation Module is fresh, with closed (zero) gates: also the identity.

Only safetensors are read (single file or sharded with ``model.safetensors.index.json``);
pickle files are refused as everywhere else.  LLaVA's own ``vision_feature_select_strategy``
``"default"`` (no class token) is what the object level does anyway.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open

from .errors import CheckpointError

from .checkpoint import refuse_pickles
from .config import RsLvlmConfig
from .experts import SemanticExpertMLP
from .modeling_rs_lvlm import RsLvlmForConditionalGeneration

__all__ = ["from_llava_checkpoint", "llava_config_to_rs_lvlm", "resize_token_embeddings"]


def llava_config_to_rs_lvlm(llava: dict[str, Any], **overrides: Any) -> RsLvlmConfig:
    """An :class:`RsLvlmConfig` with the sizes of a LLaVA ``config.json`` (dict) + overrides."""
    vision, text = llava["vision_config"], llava["text_config"]
    n_layers = int(vision["num_hidden_layers"])
    feature_layer = llava.get("vision_feature_layer", -2)
    if isinstance(feature_layer, (list, tuple)):
        feature_layer = feature_layer[-1]
    depth = n_layers + 1 + int(feature_layer) if int(feature_layer) < 0 else int(feature_layer)
    rope = text.get("rope_parameters") or {}
    heads = int(text["num_attention_heads"])
    intermediate = int(text["intermediate_size"])
    values: dict[str, Any] = dict(
        image_size=int(vision["image_size"]), patch_size=int(vision["patch_size"]),
        num_channels=int(vision.get("num_channels", 3)), vision_hidden_size=int(vision["hidden_size"]),
        vision_num_layers=n_layers, vision_num_heads=int(vision["num_attention_heads"]),
        vision_intermediate_size=int(vision["intermediate_size"]),
        vision_hidden_act=vision.get("hidden_act", "quick_gelu"),
        vision_layer_norm_eps=float(vision.get("layer_norm_eps", 1e-5)),
        object_layer=depth, region_layer=depth, scene_layer=depth,
        sam_num_heads=int(vision["num_attention_heads"]),
        vocab_size=int(text["vocab_size"]), hidden_size=int(text["hidden_size"]), intermediate_size=intermediate,
        expert_intermediate_size=min(intermediate, 128), num_hidden_layers=int(text["num_hidden_layers"]),
        num_attention_heads=heads, num_key_value_heads=int(text.get("num_key_value_heads") or heads),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 10000.0))),
        max_position_embeddings=int(text.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", llava.get("tie_word_embeddings", False))),
        bos_token_id=int(text.get("bos_token_id") or 1), eos_token_id=int(_first(text.get("eos_token_id"), 2)),
        pad_token_id=int(text.get("pad_token_id") or llava.get("pad_token_id") or 0),
        unk_token_id=0, image_token_id=int(llava.get("image_token_index", llava.get("image_token_id", 32000))),
    )
    values.update(overrides)
    return RsLvlmConfig(**values)


def _first(value: Any, default: int) -> int:
    if isinstance(value, (list, tuple)):
        return value[0] if value else default
    return default if value is None else value


def _canonical(key: str) -> str:
    """Old and new LLaVA layouts -> ``vision_tower.* / multi_modal_projector.* /
    language_model.* / lm_head.weight``."""
    if key.startswith("model.") and key.split(".")[1] in ("vision_tower", "language_model", "multi_modal_projector"):
        key = key[len("model."):]
    key = key.replace("vision_tower.vision_model.", "vision_tower.", 1)
    if key.startswith("language_model.lm_head."):
        return key[len("language_model."):]
    return key.replace("language_model.model.", "language_model.", 1)


def _iter_tensors(llava_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    index = llava_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (llava_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{llava_dir} has no model.safetensors (or sharded index)")
    for name in files:
        try:
            with safe_open(str(llava_dir / name), framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{llava_dir / name} is truncated or corrupt ({exc})") from None


def _targets(key: str, model: RsLvlmForConditionalGeneration) -> list[str]:
    """Our parameter names that LLaVA tensor ``key`` (canonical) initialises; [] = not used."""
    depth = len(model.vision.layers)
    if key.startswith("vision_tower."):
        rest = key[len("vision_tower."):]
        if rest.startswith("embeddings."):
            return ["vision." + rest[len("embeddings."):]]
        if rest.startswith("pre_layrnorm."):
            return ["vision." + rest]
        if rest.startswith("encoder.layers."):
            layer = int(rest.split(".")[2])
            return ["vision." + rest[len("encoder."):]] if layer < depth else []
        return []                                                     # post_layernorm: unused
    if key.startswith("multi_modal_projector."):
        rest = key[len("multi_modal_projector."):]
        return [f"projector.projectors.{i}.{rest}" for i in range(3)]
    if key.startswith("language_model."):
        if ".mlp." in key and model.config.use_experts:
            head, proj = key.rsplit(".mlp.", 1)
            return [f"{head}.mlp.shared_expert.{proj}"]               # level experts: see below
        return [key]
    if key == "lm_head.weight":
        return [] if model.config.tie_word_embeddings else [key]
    return []


def from_llava_checkpoint(
    llava_dir: str | Path,
    knowledge_embeddings: torch.Tensor | None = None,
    knowledge_levels: torch.Tensor | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> RsLvlmForConditionalGeneration:
    """Build an RS-LVLM whose vision tower, projectors and language model come from the LLaVA
    folder ``llava_dir``; ``overrides`` change config fields (e.g. ``use_experts=False``,
    ``retrieval_top_k``, ``expert_intermediate_size``, level depths)."""
    llava_dir = Path(llava_dir)
    if not (llava_dir / "config.json").is_file():
        raise CheckpointError(missing=True, message=f"no LLaVA checkpoint at {llava_dir} (config.json missing)")
    refuse_pickles(llava_dir)
    config = llava_config_to_rs_lvlm(json.loads((llava_dir / "config.json").read_text()), **overrides)
    model = RsLvlmForConditionalGeneration.build(
        config, knowledge_embeddings, knowledge_levels, device=device, dtype=dtype)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    dense_mlp: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for key, tensor in _iter_tensors(llava_dir):
            key = _canonical(key)
            if ".mlp." in key and key.startswith("language_model.") and config.use_experts:
                head, proj = key.rsplit(".mlp.", 1)
                if proj in ("gate_proj.weight", "up_proj.weight"):
                    dense_mlp.setdefault(head, {})[proj] = tensor
                    if len(dense_mlp[head]) == 2:        # both halves seen: seed the level experts
                        _init_level_experts(model.get_submodule(f"{head}.mlp"), dense_mlp.pop(head))
            for target in _targets(key, model):
                if target not in params:
                    raise CheckpointError(f"{llava_dir}: tensor {key} has no counterpart {target}")
                if tuple(params[target].shape) != tuple(tensor.shape):
                    raise CheckpointError(f"{llava_dir}: tensor {key} has shape {tuple(tensor.shape)}, "
                                                      f"expected {tuple(params[target].shape)} for {target}")
                params[target].copy_(tensor)
                loaded.add(target)
        model.projector.level_embedding.weight.zero_()
    needed = [n for n in params if n.startswith(("vision.", "language_model.", "lm_head."))
              and ".mlp.experts." not in n and ".mlp.router." not in n]
    missing = sorted(set(needed) - loaded)
    if config.tie_word_embeddings:
        missing = [n for n in missing if n != "lm_head.weight"]
    if missing:
        raise CheckpointError(f"{llava_dir} lacks tensors for: {', '.join(missing[:5])}"
                                          + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return model.eval()


def _init_level_experts(mlp: SemanticExpertMLP, dense: dict[str, torch.Tensor]) -> None:
    """Level expert e takes dense channels [e*E, (e+1)*E) (wrapping) for gate/up; down = 0."""
    gate, up = dense["gate_proj.weight"], dense["up_proj.weight"]          # (I, H)
    n_channels = gate.shape[0]
    for e, expert in enumerate(mlp.experts):
        width = expert.gate_proj.weight.shape[0]
        rows = (torch.arange(width) + e * width) % n_channels
        expert.gate_proj.weight.copy_(gate[rows])
        expert.up_proj.weight.copy_(up[rows])
        expert.down_proj.weight.zero_()
    mlp.router.weight.zero_()                                              # uniform text gate


def resize_token_embeddings(model: RsLvlmForConditionalGeneration, vocab_size: int) -> None:
    """Grow (or shrink) the vocabulary, e.g. after adding the grounding tokens to a LLaVA
    tokenizer; new rows start at the mean of the old embeddings."""
    old = model.language_model.embed_tokens
    n_old, hidden = old.weight.shape
    if vocab_size == n_old:
        return
    new = torch.nn.Embedding(vocab_size, hidden, old.padding_idx if (old.padding_idx or 0) < vocab_size else None,
                             device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        keep = min(n_old, vocab_size)
        new.weight[:keep] = old.weight[:keep]
        new.weight[keep:] = old.weight.mean(dim=0)
    model.language_model.embed_tokens = new
    if model.config.tie_word_embeddings:
        model.lm_head = torch.nn.Linear(hidden, vocab_size, bias=False, device="meta")
        model.lm_head.weight = new.weight
    else:
        head = torch.nn.Linear(hidden, vocab_size, bias=False, device=new.weight.device, dtype=new.weight.dtype)
        with torch.no_grad():
            head.weight[:keep] = model.lm_head.weight[:keep]
            head.weight[keep:] = model.lm_head.weight.mean(dim=0)
        model.lm_head = head
    model.config.vocab_size = vocab_size
