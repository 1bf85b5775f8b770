"""Choosing and describing the compute device.

The plugin shows the analyst which device answers (CPU or the CUDA card's name), and ``auto``
must quietly fall back to the CPU on laptops without a GPU.
"""
from __future__ import annotations

from .errors import BAD_REQUEST, EngineError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(requested: str = "auto") -> str:
    """Return ``"cpu"`` or ``"cuda"`` for a user choice; asking for CUDA without one is an error."""
    import torch

    if requested not in DEVICE_CHOICES:
        raise EngineError(BAD_REQUEST, f"unknown device {requested!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise EngineError(BAD_REQUEST, "device 'cuda' was requested but no CUDA device is available; use 'cpu' or 'auto'")
    return requested


def describe_device(device: str) -> dict:
    """A human-readable description: the CUDA card's name and memory, or the CPU and its threads."""
    import platform

    import torch

    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return {"device": props.name, "device_type": "cuda", "memory_gb": round(props.total_memory / 2**30, 1)}
    threads = torch.get_num_threads()
    return {"device": f"CPU ({platform.processor() or platform.machine()}, {threads} thread{'s' if threads != 1 else ''})",
            "device_type": "cpu"}
