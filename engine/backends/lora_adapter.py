"""LoRA adapter folders: a fine-tune kept as a small peft adapter on top of a LLaVA base folder.

Why: a 7B base is 13 GiB; its fine-tune as an adapter is tens of megabytes, and several adapters
can share one base.  ``engine.lab.finetune`` with ``"save": "adapter"`` (or ``"both"``) writes::

    adapter/
      config.json                 the base's config.json + "rs_lvlm_adapter" (which base) + "rs_lvlm" (name)
      adapter_config.json         peft's LoRA config
      adapter_model.safetensors   peft's LoRA matrices
      projector.safetensors       the fully trained vision-language projector

The engine loads such a folder like any LLaVA folder (``engine ask --model adapter/``): the base
is loaded, the adapter applied with peft and merged into the weights (``merge_and_unload``), the
projector replaced, and the result answers exactly as the merged save of the same weights would.
A missing base is refused as ``no_model``, an adapter or projector that does not fit the base as
``bad_checkpoint``, pickles anywhere in the folder are refused unread (safetensors only).

The config.json is a copy of the base's, so what the engine reads from it without loading a model
(input size, name) is the base's; ``rs_lvlm_adapter.base`` is the base's absolute path (a relative
path is read from the adapter folder).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from engine.errors import BAD_CHECKPOINT, NO_MODEL, EngineError

from .base import checkpoint_errors

log = logging.getLogger("engine.backends.lora_adapter")

__all__ = ["ADAPTER_KEY", "PROJECTOR_FILE", "adapter_manifest", "resolve_base", "write_adapter", "apply_adapter",
           "projector_module"]

ADAPTER_KEY = "rs_lvlm_adapter"
"""The config.json section that makes a folder an adapter folder."""
PROJECTOR_FILE = "projector.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT = "peft-lora"


def adapter_manifest(config: dict) -> dict | None:
    """The ``rs_lvlm_adapter`` section of a (bounds-checked) config.json, ``None`` for a model folder."""
    manifest = config.get(ADAPTER_KEY)
    if manifest is None:
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("base"), str):
        raise EngineError(BAD_CHECKPOINT, f"config.json's {ADAPTER_KEY} section is not a {FORMAT} adapter "
                                          f"manifest with a 'base' path: {str(manifest)[:200]}")
    return manifest


def resolve_base(adapter_dir: Path, manifest: dict) -> Path:
    """The base folder an adapter was trained on; ``no_model`` when it is not there."""
    base = Path(manifest["base"])
    if not base.is_absolute():
        base = (Path(adapter_dir) / base).resolve()
    if not (base / "config.json").is_file():
        raise EngineError(NO_MODEL, (
            f"{adapter_dir} is a LoRA adapter of the base model {base}, which is not there (no config.json): "
            f"put the base back at that path, or write its new path as '{ADAPTER_KEY}.base' in "
            f"{Path(adapter_dir) / 'config.json'}"))
    if (Path(adapter_dir) / "config.json").resolve() == (base / "config.json").resolve():
        raise EngineError(BAD_CHECKPOINT, f"{adapter_dir} names itself as its base")
    return base


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def projector_module(model: torch.nn.Module) -> torch.nn.Module:
    """The LLaVA ``multi_modal_projector`` inside ``model`` (plain or peft-wrapped)."""
    for name, module in model.named_modules():
        if name.split(".")[-1] == "multi_modal_projector":
            return module
    raise EngineError(BAD_CHECKPOINT, "the model has no multi_modal_projector: not a LLaVA model")


def write_adapter(peft_model: Any, projector: dict[str, torch.Tensor], base: str | Path, name: str,
                  folder: Path) -> Path:
    """Save ``peft_model``'s adapter (safetensors), the projector tensors and the manifest."""
    import shutil

    from safetensors.torch import save_file

    base = Path(base).resolve()
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    peft_model.save_pretrained(str(folder), safe_serialization=True)
    save_file(projector, str(folder / PROJECTOR_FILE), metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    options = dict(config.get("rs_lvlm") or {})
    options.update({"name": name, "finetuned_from": str(base)})
    config["rs_lvlm"] = options
    config[ADAPTER_KEY] = {"format": FORMAT, "version": 1, "base": str(base), "base_name": base.name,
                           "base_config_sha256": _sha256(base / "config.json"), "projector": PROJECTOR_FILE}
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    for extra in ("preprocessor_config.json", "generation_config.json"):
        if (base / extra).is_file():
            shutil.copy(base / extra, folder / extra)
    return folder


def _file_keys(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:
        raise EngineError(BAD_CHECKPOINT, f"{path} is not a readable safetensors file: {exc}") from None


def _mismatch(what: str, path: Path, expected: dict[str, tuple], found: dict[str, tuple]) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(f"{k} (file {found[k]}, base {expected[k]})" for k in set(expected) & set(found)
                    if tuple(found[k]) != tuple(expected[k]))
    problems = [f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
                for label, items in (("missing", missing), ("not in the base", unexpected), ("wrong shape", shapes))
                if items]
    if problems:
        raise EngineError(BAD_CHECKPOINT, f"the {what} in {path} does not fit the base model ({'; '.join(problems)})")


def apply_adapter(model: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """``model`` (the loaded base) with the adapter merged in and the projector replaced."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    from engine.model.checkpoint import refuse_pickles

    adapter_dir = Path(adapter_dir)
    with checkpoint_errors():
        refuse_pickles(adapter_dir)
    for needed in ("adapter_config.json", ADAPTER_WEIGHTS, PROJECTOR_FILE):
        if not (adapter_dir / needed).is_file():
            raise EngineError(BAD_CHECKPOINT, f"incomplete adapter folder {adapter_dir}: {needed} is missing")
    proj = projector_module(model)
    expected_proj = {k: tuple(v.shape) for k, v in proj.state_dict().items()}
    _mismatch("projector", adapter_dir / PROJECTOR_FILE, expected_proj, _file_keys(adapter_dir / PROJECTOR_FILE))
    found = _file_keys(adapter_dir / ADAPTER_WEIGHTS)
    try:
        wrapped = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except Exception as exc:      # target modules absent from the base, tensors of another size ...
        raise EngineError(BAD_CHECKPOINT, f"the LoRA adapter in {adapter_dir} does not fit the base model: "
                                          f"{str(exc)[:400]}") from None
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(wrapped).items()}
    _mismatch("LoRA adapter", adapter_dir / ADAPTER_WEIGHTS, expected, found)
    merged = wrapped.merge_and_unload()
    weights = load_file(str(adapter_dir / PROJECTOR_FILE))
    target = projector_module(merged)
    reference = next(iter(target.parameters()))
    with torch.no_grad():
        target.load_state_dict({k: v.to(device=reference.device, dtype=reference.dtype) for k, v in weights.items()})
    return merged.eval()


def check_base_unchanged(adapter_dir: Path, manifest: dict, base: Path) -> str | None:
    """A warning when the base's config.json is not the one the adapter was trained on."""
    recorded = manifest.get("base_config_sha256")
    if recorded and recorded != _sha256(base / "config.json"):
        return (f"the base {base} has another config.json than when the adapter {adapter_dir} was trained; "
                f"its tensors fit, but the answers may differ from the fine-tune's")
    return None
