"""Model backends: which pipeline answers for a checkpoint folder, chosen from its config.json.

* ``model_type == "rs_lvlm"`` (or anything not below): our own RS-LVLM
  (:class:`engine.backends.rs_lvlm.RsLvlmPipeline`).
* ``model_type == "llava"`` with safetensors weights: a transformers
  ``LlavaForConditionalGeneration`` (GeoChat / LLaVA-1.5 family,
  :class:`engine.backends.llava.LlavaPipeline`).
* A LoRA adapter folder (config.json with ``rs_lvlm_adapter``, written by ``engine.lab.finetune``
  with ``"save": "adapter"``): its LLaVA base with the adapter merged in
  (:mod:`engine.backends.lora_adapter`); a missing base is ``no_model``.
* An original LLaVA / GeoChat folder (config with ``mm_vision_tower``) or a folder whose weights
  are only pickles (``.bin`` ...) is refused with the ``python -m engine convert`` command that
  turns it into a safetensors LLaVA folder: the engine itself never unpickles anything.

All pipelines share one interface, :class:`engine.backends.base.Pipeline`, and decode through one
loop, :mod:`engine.backends.decoding`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from engine.errors import BAD_CHECKPOINT, NO_MODEL, EngineError
from engine.model.errors import PICKLE_SUFFIXES

log = logging.getLogger("engine.backends")

__all__ = ["load_pipeline", "backend_for", "read_config", "checkpoint_config", "PICKLE_SUFFIXES", "is_original_llava"]



def read_config(model_dir: Path) -> dict:
    """A checkpoint's config.json, refused (``bad_checkpoint``, with the figures) when it is too
    large, not a JSON object or holds absurd sizes: see :mod:`engine.backends.config_bounds`."""
    from .config_bounds import MAX_CONFIG_BYTES, check_config

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise EngineError(NO_MODEL, f"no model checkpoint at {model_dir} (config.json missing)")
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise EngineError(BAD_CHECKPOINT, f"{path} is {path.stat().st_size:,} bytes; at most {MAX_CONFIG_BYTES:,}")
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise EngineError(BAD_CHECKPOINT, f"{path} is not valid JSON: {str(exc)[:200]}") from None
    return check_config(config, str(path))


def checkpoint_config(model_dir: Path | str) -> dict:
    """The bounds-checked config.json of a folder, ``{}`` when there is none (yet).

    For the cheap look-ups made before any model is loaded (input size, name, training ground
    size): a config that is there but broken or absurd is refused here as well, with its figures.
    """
    try:
        return read_config(Path(model_dir))
    except EngineError as exc:
        if exc.code == NO_MODEL:
            return {}
        raise
    except OSError as exc:                       # e.g. a path component longer than the file system allows
        raise EngineError(NO_MODEL, f"the model path cannot be used: {exc.strerror or exc}") from None


def is_original_llava(config: dict) -> bool:
    """The original LLaVA / GeoChat layout (LlavaLlamaForCausalLM / GeoChatLlamaForCausalLM)."""
    return "mm_vision_tower" in config or config.get("model_type") == "geochat"


def convert_command(model_dir: Path, vision_tower: bool = False) -> str:
    target = Path(str(model_dir).rstrip("/\\") + "-converted")
    cmd = f"python -m engine convert --from {model_dir} --to {target}"
    return cmd + (" --vision-tower CLIP_DIR" if vision_tower else "")


def backend_for(model_dir: Path | str) -> str:
    """``"llava"`` or ``"rs_lvlm"``; raises the convert hint for folders the engine must not load."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    if "rs_lvlm_adapter" in config:
        from .lora_adapter import adapter_manifest, resolve_base

        base = resolve_base(model_dir, adapter_manifest(config))
        if "rs_lvlm_adapter" in read_config(base) or backend_for(base) != "llava":
            raise EngineError(BAD_CHECKPOINT, f"{model_dir} is a LoRA adapter whose base {base} is not a LLaVA "
                                              f"model folder: adapters apply to LLaVA folders only")
        return "llava"
    has_safetensors = any(model_dir.glob("*.safetensors"))
    pickles = sorted(p.name for p in model_dir.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if is_original_llava(config):
        raise EngineError(BAD_CHECKPOINT, (
            f"{model_dir} is an original LLaVA/GeoChat checkpoint (config.json has mm_vision_tower "
            f"{config.get('mm_vision_tower')!r}). Convert it once to the transformers LLaVA layout in "
            f"safetensors, giving a local copy of its CLIP vision tower: {convert_command(model_dir, True)}, "
            f"then use the new folder as the model."))
    if pickles and not has_safetensors:
        shown = ", ".join(pickles[:3]) + (" ..." if len(pickles) > 3 else "")
        raise EngineError(BAD_CHECKPOINT, (
            f"{model_dir} holds pickle weights ({shown}) and no .safetensors: the engine loads safetensors only, "
            f"because loading a pickle can run arbitrary code. Convert them once with: {convert_command(model_dir)}"))
    if pickles:
        log.warning("%s: ignoring pickle files %s, loading the .safetensors weights", model_dir, ", ".join(pickles))
    if config.get("model_type") == "llava":
        return "llava"
    return "rs_lvlm"


def load_pipeline(model_dir: Path | str, device: str = "cpu", backend: str = "auto", **options: Any) -> Any:
    """Load the pipeline for a checkpoint folder on ``device`` ("cpu" or "cuda").

    ``options`` go to the backend's ``load`` (``dtype``, ``quantization`` for LLaVA;
    ``knowledge_dir``, a knowledge index replacing the checkpoint's, for the embedded family).  ``backend``
    chooses the engine for LLaVA folders (engine.backends.vllm_engine.choose_backend); when vLLM
    was asked for and cannot run, the pipeline's ``load_warnings`` says why.
    """
    from .vllm_engine import choose_backend

    model_dir = Path(model_dir)
    family = backend_for(model_dir)
    knowledge_dir = options.pop("knowledge_dir", None)
    engine, warning = choose_backend(backend, family, device)
    if engine == "vllm" and "rs_lvlm_adapter" in read_config(model_dir):
        engine, warning = "transformers", ("vLLM not used, answering with transformers: the model is a LoRA "
                                           "adapter folder, merged into its base when loaded")
    if engine == "vllm":
        from .vllm_engine import VllmPipeline

        pipeline = VllmPipeline.load(model_dir, dtype=options.get("dtype"))
    elif family == "llava":
        from .llava import LlavaPipeline

        pipeline = LlavaPipeline.load(model_dir, device=device, **options)
    else:
        from engine.backends.rs_lvlm import RsLvlmPipeline

        pipeline = RsLvlmPipeline.load(model_dir, device=device, knowledge_dir=knowledge_dir, **options)
    pipeline.load_warnings = [warning] if warning else []
    if knowledge_dir and family != "rs_lvlm":
        pipeline.load_warnings.append(f"the knowledge index {knowledge_dir} is not used: a LLaVA-family model "
                                      "has no Semantic Augmentation Module to retrieve with")
    return pipeline
