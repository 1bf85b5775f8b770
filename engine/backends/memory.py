"""Will the model fit?  Precision choice and a memory estimate made *before* loading.

Why: a 7B LLaVA needs about 14 GB in bf16 and 28 GB in fp32.  Loading it on a device that is too
small either fails half-way with a CUDA out-of-memory traceback or, on the CPU, makes the machine
swap until QGIS freezes.  The engine therefore reads the tensor shapes from the safetensors
headers (no tensor data is read), works out the bytes the weights will take in the chosen
precision plus the KV cache and working memory of one request, and refuses with the figures when
the device's free memory is smaller.

Precision (:func:`resolve_dtype`): fp32 on the CPU (half precision is slow or unsupported there),
bf16 on CUDA (fp16 on cards without bf16, or when asked).  Optional 8-bit / 4-bit loading through
bitsandbytes needs CUDA and the bitsandbytes package (:func:`resolve_quantization`).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from engine.errors import BAD_CHECKPOINT, BAD_REQUEST, EngineError

log = logging.getLogger("engine.backends.memory")

MODEL_TOO_LARGE = "model_too_large"
"""Error code: the model does not fit the chosen device's free memory (message has the figures)."""

GB = 1024 ** 3
DTYPE_ALIASES = {"auto": None, "": None, "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
                 "float16": "float16", "half": "float16", "fp32": "float32", "float32": "float32"}
QUANT_ALIASES = {"": None, "none": None, "no": None, "8bit": "8bit", "int8": "8bit", "8": "8bit",
                 "4bit": "4bit", "nf4": "4bit", "int4": "4bit", "4": "4bit"}
# Bytes one parameter takes once loaded, per precision.  8-/4-bit: bitsandbytes quantizes the
# linear layers (almost all of a 7B model); norms, embeddings and the LM head stay in 16 bit,
# hence a little over 1 and 0.5 byte.
BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "8bit": 1.1, "4bit": 0.6, "int8": 1.3}
"""``int8`` is the CPU's weight-only int8 language model (int8_cpu.py): one byte per LM matrix
weight plus the float32 vision tower, embeddings and norms (about 1.3 bytes a parameter for a 7B)."""
SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                        "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class WeightStats:
    """What the safetensors headers of a checkpoint folder say, without reading tensor data."""

    files: list[Path]
    parameters: int               # floating-point elements (the weights)
    other_elements: int           # integer / bool buffers
    bytes_on_disk: int


def shard_index(index: Path, folder: Path) -> list[Path]:
    """The shard files a ``*.index.json`` names, each checked to lie inside ``folder``.

    Why the check: the index is data from whoever made the checkpoint; a name such as
    ``/etc/passwd`` or ``../other/model.safetensors`` must not make the engine read elsewhere.
    """
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, OSError, TypeError, AttributeError) as exc:
        raise EngineError(BAD_CHECKPOINT, f"{index} is unreadable: {exc}") from None
    root = folder.resolve()
    paths = []
    for name in names:
        path = (folder / str(name)).resolve()
        if not isinstance(name, str) or Path(name).is_absolute() or root not in path.parents:
            raise EngineError(BAD_CHECKPOINT, f"{index.name} names {str(name)[:200]!r}, which is not a file inside "
                                              f"{folder}; shard names must be plain file names")
        paths.append(folder / name)
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise EngineError(BAD_CHECKPOINT, f"{folder}: shard(s) {', '.join(missing)} named by {index.name} are missing")
    return paths


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of a folder: those the index names, else every ``*.safetensors``."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return shard_index(index, model_dir)
    return sorted(model_dir.glob("*.safetensors"))


def weight_stats(model_dir: Path) -> WeightStats:
    """Count the parameters from the headers (``safe_open`` reads the JSON header only)."""
    from safetensors import safe_open

    files = safetensors_files(model_dir)
    params = other = 0
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    n = 1
                    for d in piece.get_shape():
                        n *= int(d)
                    if piece.get_dtype().startswith(("F", "BF")):
                        params += n
                    else:
                        other += n
        except EngineError:
            raise
        except Exception as exc:  # truncated or not a safetensors file
            raise EngineError(BAD_CHECKPOINT, f"{path} is not a readable safetensors file: {exc}") from None
    return WeightStats(files, params, other, sum(p.stat().st_size for p in files))


def resolve_dtype(device: str, requested: str | None = None):
    """torch dtype for a device: fp32 on CPU (bf16 if asked); bf16 on CUDA (fp16 if asked or without bf16)."""
    import torch

    key = DTYPE_ALIASES.get(str(requested or "").lower().replace("torch.", ""), "invalid")
    if key == "invalid":
        raise EngineError(BAD_REQUEST, f"unknown precision {requested!r}; use auto, bf16, fp16 or fp32")
    if device != "cuda":
        if key == "bfloat16":
            return torch.bfloat16        # half the memory; PyTorch's CPU bf16 kernels are vectorised
        if key not in (None, "float32"):
            log.info("precision %s ignored on the CPU: float16 kernels are slow there, using float32", key)
        return torch.float32
    if key is None or key == "bfloat16":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        log.info("this GPU has no bfloat16: using float16")
        return torch.float16
    return getattr(torch, key)


def resolve_quantization(device: str, requested: str | None) -> str | None:
    """``None``, ``"8bit"`` or ``"4bit"``; asking for it without CUDA or bitsandbytes is an error."""
    key = QUANT_ALIASES.get(str(requested or "").lower(), "invalid")
    if key == "invalid":
        raise EngineError(BAD_REQUEST, f"unknown quantization {requested!r}; use none, 8bit or 4bit")
    if key is None:
        return None
    if device != "cuda":
        raise EngineError(BAD_REQUEST,
                          f"{key} loading needs a CUDA GPU (bitsandbytes); on the CPU the model runs in float32")
    import importlib.util

    missing = [name for name in ("bitsandbytes", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:   # optional dependencies, looked for only when quantization is asked for
        raise EngineError(BAD_REQUEST, f"{key} loading needs the {' and '.join(missing)} package(s): "
                                       f".venv-engine/bin/pip install {' '.join(missing)}")
    return key


def kv_cache_bytes(config: dict, tokens: int, elem_bytes: float) -> int:
    """Bytes of the key/value cache of ``tokens`` positions for a Llama-style text config."""
    layers = int(config.get("num_hidden_layers", 0))
    heads = int(config.get("num_attention_heads", 1))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or int(config.get("hidden_size", 0)) // max(heads, 1))
    return int(2 * layers * kv_heads * head_dim * tokens * elem_bytes)


def available_bytes(device: str) -> tuple[int | None, str]:
    """Free memory of the device and where the figure comes from; ``None`` when unknown."""
    if device == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info()
        return int(free), f"free memory of {torch.cuda.get_device_name()}"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except OSError:
        pass
    try:  # macOS / Windows, when psutil happens to be installed
        import psutil  # type: ignore

        return int(psutil.virtual_memory().available), "available memory (psutil)"
    except ImportError:
        return None, "unknown (no /proc/meminfo)"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} billion" if n >= 1e8 else f"{n / 1e6:.2f} million"


def estimate_bytes(stats: WeightStats, precision: str, text_config: dict | None = None,
                   context_tokens: int = 0) -> int:
    """Weights in the chosen precision + KV cache of one request + 10 % and 256 MiB working memory."""
    weights = stats.parameters * BYTES_PER_PARAM[precision] + stats.other_elements * 8
    elem = 4.0 if precision == "float32" else 2.0
    cache = kv_cache_bytes(text_config or {}, context_tokens, elem) if context_tokens else 0
    return int(weights * 1.10 + cache + 256 * 2 ** 20)


def check_fits(model_dir: Path, device: str, precision: str, text_config: dict | None = None,
               context_tokens: int = 0) -> dict:
    """Raise ``EngineError(MODEL_TOO_LARGE)`` with needed vs available GB when it cannot fit.

    ``RS_LVLM_SKIP_MEMORY_CHECK=1`` turns the refusal into a warning (for machines whose free
    memory figure is misleading, e.g. with swap or unified memory).  Returns the figures.
    """
    stats = weight_stats(model_dir)
    needed = estimate_bytes(stats, precision, text_config, context_tokens)
    available, source = available_bytes(device)
    figures = {"parameters": stats.parameters, "precision": precision, "needed_gb": round(needed / GB, 2),
               "available_gb": None if available is None else round(available / GB, 2), "memory_source": source}
    if available is not None and needed > available:
        message = (f"the model in {model_dir} does not fit on {device}: it needs about {needed / GB:.2f} GB "
                   f"({_count(stats.parameters)} parameters in {precision} plus the KV cache and working memory) "
                   f"but only {available / GB:.2f} GB is available ({source}). ")
        if device == "cuda":
            message += ("Try 4-bit or 8-bit loading (RS_LVLM_QUANTIZE=4bit, needs bitsandbytes), a larger GPU, "
                        "or free GPU memory.")
        else:
            message += "Close other programs, use a machine with more memory, or run on a GPU (--device cuda)."
        if os.environ.get("RS_LVLM_SKIP_MEMORY_CHECK") == "1":
            log.warning("%s (RS_LVLM_SKIP_MEMORY_CHECK=1: loading anyway)", message)
        else:
            raise EngineError(MODEL_TOO_LARGE, message)
    return figures
