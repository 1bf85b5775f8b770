"""Checkpoint directories: save and load, with safetensors only and errors an analyst can act on.

Layout::

    config.json          RsLvlmConfig
    model.safetensors    weights (non-persistent buffers and the tied LM head are not stored)
    tokenizer.json       (+ tokenizer_config.json)
    knowledge/           the knowledge index the model was trained with (index.faiss,
                         embeddings.npy, entries.jsonl, meta.json from engine.knowledge), or just
                         embeddings.npy + levels.npy when no index directory was given

Why so strict: a pickle (``.bin``, ``.pt``, ``.ckpt`` ...) can execute code when loaded, and the
plugin loads checkpoints that users download, so pickles are refused outright, never "tried".
Every failure is a :class:`~engine.model.errors.CheckpointError` whose message names the file or tensor.
Loading builds the model on the meta device and materialises it once, so a 7B checkpoint never
pays for a random initialisation.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import PICKLE_SUFFIXES, CheckpointError

from .config import LEVEL_NAMES, RsLvlmConfig, knowledge_level_ids
from .modeling_rs_lvlm import RsLvlmForConditionalGeneration
from .tokenizer import load_tokenizer, save_tokenizer

__all__ = ["save_checkpoint", "load_checkpoint", "LoadedModel", "weights_state_dict", "refuse_pickles", "read_weights",
           "state_mismatches",
           "load_knowledge_arrays", "PICKLE_SUFFIXES"]

WEIGHTS_NAME = "model.safetensors"
HOW_TO_GET_A_MODEL = ("build the embedded default with `make model` (or train one with "
                      "`python -m engine train`), or point --model at a checkpoint directory")


@dataclass
class LoadedModel:
    model: RsLvlmForConditionalGeneration
    tokenizer: object                      # transformers.PreTrainedTokenizerFast
    config: RsLvlmConfig
    knowledge_dir: Path | None             # <model_dir>/knowledge when present


def weights_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Persistent tensors to store: contiguous CPU copies, without the tied LM head."""
    state = model.state_dict()
    if getattr(model, "config", None) is not None and model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_checkpoint(model: RsLvlmForConditionalGeneration, tokenizer, out_dir: str | Path,
                    knowledge_index_dir: Path | None = None, weights_dtype: torch.dtype | None = None) -> Path:
    """Write a checkpoint directory (see the module docstring) and return its path.

    ``weights_dtype`` (e.g. float16) stores floating tensors at that precision: the shipped model
    is half the size on disk and is cast back to the loading dtype (float32 on CPU) when loaded.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}")
    model.config.to_json_file(out / "config.json")
    tmp = out / (WEIGHTS_NAME + ".partial")
    state = weights_state_dict(model)
    if weights_dtype is not None:
        state = {k: v.to(weights_dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(tmp), metadata={"format": "pt", "model_type": "rs_lvlm"})
    tmp.replace(out / WEIGHTS_NAME)                                  # never a half-written file
    save_tokenizer(tokenizer, out)

    kdir = out / "knowledge"
    if knowledge_index_dir is not None and Path(knowledge_index_dir).resolve() != kdir.resolve():
        if model.sam is not None:
            emb = np.load(Path(knowledge_index_dir) / "embeddings.npy", allow_pickle=False)
            if emb.shape != tuple(model.sam.knowledge_embeddings.shape):
                raise ValueError(f"knowledge index {knowledge_index_dir} has embeddings {emb.shape}, the model "
                                 f"{tuple(model.sam.knowledge_embeddings.shape)}: not the knowledge it was built with")
        shutil.rmtree(kdir, ignore_errors=True)
        shutil.copytree(knowledge_index_dir, kdir)
    elif knowledge_index_dir is None and model.sam is not None:
        kdir.mkdir(exist_ok=True)
        np.save(kdir / "embeddings.npy", model.sam.knowledge_embeddings.float().cpu().numpy())
        np.save(kdir / "levels.npy", model.sam.knowledge_levels.cpu().numpy().astype(np.int64))
    return out


def refuse_pickles(model_dir: Path) -> None:
    """Raise CheckpointError if any pickle-format file lies anywhere under ``model_dir``."""
    pickles = sorted(p for p in model_dir.rglob("*") if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        names = ", ".join(str(p.relative_to(model_dir)) for p in pickles[:5]) + (" ..." if len(pickles) > 5 else "")
        raise CheckpointError((
            f"{model_dir} contains pickle-format files ({names}). Pickle files are never loaded, because "
            "loading one can run arbitrary code. Convert the weights to safetensors in a trusted environment "
            "(e.g. safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')) "
            "and remove the pickle files from the directory."))


def load_knowledge_arrays(kdir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, 384) float32 embeddings and (N,) knowledge level ids from a ``knowledge/`` dir."""
    emb_path = kdir / "embeddings.npy"
    if not emb_path.is_file():
        raise CheckpointError(f"{emb_path} is missing: the model's knowledge base is part of the checkpoint")
    try:
        emb = np.load(emb_path, allow_pickle=False).astype(np.float32, copy=False)
        if (kdir / "levels.npy").is_file():
            levels = np.load(kdir / "levels.npy", allow_pickle=False).astype(np.int64)
        elif (kdir / "entries.jsonl").is_file():
            lines = (kdir / "entries.jsonl").read_text(encoding="utf-8").splitlines()
            levels = np.array(knowledge_level_ids(json.loads(l)["level"] for l in lines if l.strip()), dtype=np.int64)
        else:
            raise CheckpointError(f"{kdir} has neither levels.npy nor entries.jsonl")
    except CheckpointError:
        raise
    except Exception as exc:                                        # corrupt npy / json, unknown level
        raise CheckpointError(f"knowledge in {kdir} is unreadable: {exc}") from None
    bad_ids = levels.size and not 0 <= levels.min() <= levels.max() < len(LEVEL_NAMES)
    if emb.ndim != 2 or levels.shape != (emb.shape[0],) or bad_ids:
        raise CheckpointError(f"knowledge in {kdir} is inconsistent: embeddings {emb.shape}, levels {levels.shape}")
    return emb, levels


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file (a clear CheckpointError when it is corrupt)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:                                        # SafetensorError, OSError, ...
        raise CheckpointError((
            f"{path} is truncated or corrupt and cannot be read as safetensors ({exc}). "
            "Copy or export the checkpoint again.")) from None


def state_mismatches(model: torch.nn.Module, state: dict[str, torch.Tensor]
                     ) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, misshaped) tensors of ``state`` against ``model``'s persistent
    tensors (the tied LM head is not stored, so it is not missing)."""
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(f"{k} (file {tuple(state[k].shape)}, model {expected[k]})"
                       for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    return missing, unexpected, misshaped


def _describe(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def load_checkpoint(model_dir: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | str | None = None,
                    knowledge: tuple[np.ndarray, np.ndarray] | None = None) -> LoadedModel:
    """Load a checkpoint directory onto ``device`` (optionally cast to ``dtype``), in eval mode.

    ``knowledge`` (embeddings, level ids) is what a caller that already loaded the checkpoint's
    knowledge index passes, so the folder is read once; else it is read from ``knowledge/``.
    """
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError(missing=True, message=f"no model at {d}: the directory does not exist; {HOW_TO_GET_A_MODEL}.")
    refuse_pickles(d)
    cfg_path, weights_path = d / "config.json", d / WEIGHTS_NAME
    if not cfg_path.is_file() and not weights_path.is_file():
        raise CheckpointError(missing=True, message=f"no model at {d}: it has no config.json or {WEIGHTS_NAME}; {HOW_TO_GET_A_MODEL}.")
    for path in (cfg_path, weights_path, d / "tokenizer.json"):
        if not path.is_file():
            raise CheckpointError(f"incomplete checkpoint {d}: {path.name} is missing")
    try:
        config = RsLvlmConfig.from_json_file(cfg_path)
    except Exception as exc:
        raise CheckpointError(f"{cfg_path} is not a valid RS-LVLM config: {exc}") from None
    try:
        tokenizer = load_tokenizer(d)
    except Exception as exc:
        raise CheckpointError(f"{d / 'tokenizer.json'} is unreadable: {exc}") from None
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(f"tokenizer.json has {len(tokenizer)} tokens, config.json only {config.vocab_size}")
    if knowledge is None and config.use_sam:
        knowledge = load_knowledge_arrays(d / "knowledge")
    elif not config.use_sam:
        knowledge = None
    state = read_weights(weights_path)

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    emb, levels = (None, None) if knowledge is None else (torch.from_numpy(a) for a in knowledge)
    model = RsLvlmForConditionalGeneration.build(config, emb, levels, device=device, dtype=dtype, initialise=False)
    missing, unexpected, misshaped = state_mismatches(model, state)
    problems = [f"missing tensors: {_describe(missing)}" if missing else "",
                f"unexpected tensors: {_describe(unexpected)}" if unexpected else "",
                f"tensors with the wrong shape: {_describe(misshaped)}" if misshaped else ""]
    if any(problems):
        raise CheckpointError(f"{weights_path} does not match {cfg_path}: " + "; ".join(p for p in problems if p))
    model.load_state_dict(state, strict=False)
    model.eval()
    kdir = d / "knowledge"
    return LoadedModel(model, tokenizer, config, kdir if kdir.is_dir() else None)

