"""The seed paper's components on a LLaVA base, fine-tuned with a LoRA language model.

``"seed_components": true`` (or an object of RS-LVLM config overrides, e.g.
``{"expert_intermediate_size": 256, "retrieval_top_k": 3}``) in a fine-tuning config
(:mod:`engine.lab.finetune`) turns the LLaVA folder ``base`` into the full RS-LVLM with
:func:`engine.model.llava_adapter.from_llava_checkpoint`:

* the CLIP tower becomes the multi-level vision encoder (object, region and scene levels read at
  LLaVA's feature layer, differing by pooling); frozen;
* the Semantic Augmentation Module (:mod:`engine.model.semantic_augmentation`) retrieves from
  the shipped knowledge base (``resources/knowledge/index``) per level and fuses the entries
  into the level's tokens (gated cross-attention, closed at the start); trained in full, with
  the retrieval loss where a sample names its scene / objects;
* LLaVA's projector seeds the three level projectors (:mod:`engine.model.projector`), level
  embeddings at zero; trained in full;
* each decoder MLP becomes the shared expert of a :class:`engine.model.experts.SemanticExpertMLP`
  (LoRA on it), with three level experts seeded from slices of its channels (zero down
  projection) and a router; experts and router trained in full;
* attention (``q/k/v/o_proj``) and the shared expert get LoRA adapters; embeddings, LM head and
  norms stay frozen.

At initialisation the model computes what the LLaVA did on its object level (see the adapter's
tests). Samples are the evaluator's RS-LVLM prompts (``engine.data.mixed_stream`` with family
``rs_lvlm``) batched by the embedded training's own :class:`engine.lab.batches.Collator`
(question embeddings by the shipped sentence encoder, retrieval targets).  The result, LoRA
merged, is an RS-LVLM checkpoint folder (``model.safetensors``, the base's tokenizer,
``knowledge/``) that the engine answers with through its RS-LVLM backend.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["build_seed_model", "seed_tokenizer", "trained_parts", "finetune_seed_components"]

TRAINED_IN_FULL = (".sam.", ".projector.", ".mlp.experts.", ".mlp.router.")
"""Parameter-name parts of the new components, trained in full (the rest is frozen or LoRA)."""


def seed_tokenizer(base: Path, folder: Path) -> Any:
    """The base's tokenizer as the RS-LVLM backend reads it (``tokenizer.json`` through
    :func:`engine.model.tokenizer.load_tokenizer`), written to ``folder``, so training encodes
    prompts exactly as inference will."""
    from engine.backends.tokenizer_files import load_tokenizer as load_base_tokenizer
    from engine.model.tokenizer import load_tokenizer, save_tokenizer

    save_tokenizer(load_base_tokenizer(base), folder)
    tokenizer = load_tokenizer(folder)
    if tokenizer.convert_tokens_to_ids("<image>") in (None, tokenizer.unk_token_id):
        raise ValueError(f"the tokenizer of {base} has no <image> token: not a LLaVA tokenizer")
    return tokenizer


def build_seed_model(base: Path, tokenizer: Any, knowledge: Any, overrides: dict, device: str,
                     dtype: torch.dtype) -> torch.nn.Module:
    """RS-LVLM with SAM, level projectors and experts around the LLaVA folder ``base``."""
    from engine.backends.base import checkpoint_errors
    from engine.model.llava_adapter import from_llava_checkpoint, resize_token_embeddings

    with checkpoint_errors():
        model = from_llava_checkpoint(base, torch.from_numpy(np.asarray(knowledge.embeddings, dtype=np.float32)),
                                      torch.from_numpy(np.asarray(knowledge.level_ids, dtype=np.int64)),
                                      device=device, dtype=dtype, **overrides)
    if tokenizer.convert_tokens_to_ids("<image>") != model.config.image_token_id:
        raise ValueError(f"the tokenizer's <image> is id {tokenizer.convert_tokens_to_ids('<image>')}, the "
                         f"model's image_token_index {model.config.image_token_id}")
    if len(tokenizer) > model.config.vocab_size:           # e.g. <pad> added to a tokenizer without one
        resize_token_embeddings(model, len(tokenizer))
    for name, value in (("pad_token_id", tokenizer.pad_token_id), ("bos_token_id", tokenizer.bos_token_id),
                        ("eos_token_id", tokenizer.eos_token_id)):
        if value is not None:
            setattr(model.config, name, int(value))
    model.config.name = f"{Path(base).name}-seed"
    return model


def _lora_regex(names: list[str]) -> str:
    """LoRA on attention and on the dense / shared-expert MLP of every decoder layer (not on the
    level experts, which are trained in full)."""
    return rf".*language_model\.layers\.\d+\.(self_attn|mlp|mlp\.shared_expert)\.({'|'.join(map(str, names))})"


def trained_parts(model: torch.nn.Module) -> dict[str, int]:
    """Trainable parameter counts by part: lora, sam, projector, experts."""
    parts = {"lora": 0, "sam": 0, "projector": 0, "experts": 0}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = ("lora" if "lora_" in name else "sam" if ".sam." in name else
               "projector" if ".projector." in name else "experts")
        parts[key] += p.numel()
    return parts


def _to(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    def move(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: move(t) for k, t in v.items()}
        return v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
    return {k: move(v) for k, v in batch.items()}


def finetune_seed_components(cfg: dict, progress: bool = True) -> dict:
    """Build, train (LoRA LM + SAM + level projectors + experts) and save the RS-LVLM checkpoint."""
    from peft import LoraConfig, get_peft_model

    from engine.backends.memory import resolve_dtype
    from engine.data.mixed_stream import MixedStream, parse_sources
    from engine.device import resolve_device
    from engine.knowledge import DEFAULT_INDEX_DIR, KnowledgeBase, SentenceEncoder
    from engine.lab.batches import Collator
    from engine.lab.finetune import train_loop
    from engine.model.checkpoint import save_checkpoint

    out, base = Path(cfg["out"]), Path(cfg["base"])
    device = resolve_device(cfg["device"])
    torch.manual_seed(int(cfg["seed"]))
    dtype = resolve_dtype(device, None if cfg["precision"] == "auto" else cfg["precision"])
    overrides = dict(cfg["seed_components"]) if isinstance(cfg["seed_components"], dict) else {}
    knowledge = KnowledgeBase.load(DEFAULT_INDEX_DIR)
    tokenizer = seed_tokenizer(base, out / "tokenizer")
    model = build_seed_model(base, tokenizer, knowledge, overrides, device, dtype)
    lora = cfg["lora"]
    model = get_peft_model(model, LoraConfig(
        r=int(lora["r"]), lora_alpha=int(lora["alpha"]), lora_dropout=float(lora["dropout"]),
        target_modules=_lora_regex(lora["target_modules"]), bias="none"))
    for name, p in model.named_parameters():
        if any(part in name for part in TRAINED_IN_FULL):
            p.requires_grad_(bool(cfg["train_projector"]) if ".projector." in name else True)
    config = model.get_base_model().config
    collator = Collator(tokenizer, config, knowledge, SentenceEncoder())
    stream = MixedStream(parse_sources(cfg["data"]), int(cfg["seed"]), int(config.image_size), family="rs_lvlm")
    parts = trained_parts(model)

    def batch_of(samples: list) -> dict:
        return _to(collator(samples), torch.device(device), dtype)

    summary = train_loop(model, cfg, stream, batch_of, progress)
    merged = model.merge_and_unload().eval()
    merged.config.finetuned_from = str(base)
    final = out / "final"
    if final.exists():
        shutil.rmtree(final)
    save_checkpoint(merged, tokenizer, final, knowledge_index_dir=DEFAULT_INDEX_DIR)
    summary = {**summary, "model": str(final), "saved": {"merged": str(final)}, "trained": parts,
               "components": {"sam": bool(config.use_sam), "experts": bool(config.use_experts),
                              "level_projectors": True}}
    (final / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
