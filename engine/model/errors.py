"""The model package's one error: a checkpoint that is missing or cannot be used.

Why its own class: the model knows nothing of the engine's protocol.  It says whether the
checkpoint is absent (``missing``) or broken, with a message naming the file or tensor; the
backends turn that into the engine's coded error (``no_model`` / ``bad_checkpoint``).
"""
from __future__ import annotations

__all__ = ["CheckpointError", "PICKLE_SUFFIXES"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
"""File suffixes of pickle-format weights: never loaded anywhere (loading one can run code)."""


class CheckpointError(Exception):
    """A checkpoint folder that is absent (``missing=True``) or unusable (truncated, pickles...)."""

    def __init__(self, message: str, missing: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.missing = missing
