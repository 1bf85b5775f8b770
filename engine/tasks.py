"""The ask vocabulary: task names, their aliases and tokens, default questions, precisions.

One home, because the same words cross every boundary: the protocol's ``task`` field, the CLI's
``--task``, the prompt's task token (``[grounding]`` ...), the training templates and the LLaVA
instruction builder.  A leaf module (standard library only), so everything may import it.
"""
from __future__ import annotations

import re

__all__ = [
    "TASKS", "EXTRA_TASKS", "TASK_TOKENS", "TASK_ALIASES", "DEFAULT_QUESTIONS", "SCAN_TASKS",
    "canonical_task", "default_question", "split_task_token",
    "PRECISIONS", "PRECISION_ALIASES", "canonical_precision", "LEVELS", "BACKENDS",
]

TASKS: tuple[str, ...] = ("caption", "vqa", "ground", "classify")
"""The product's tasks, as the protocol and the CLI name them."""
EXTRA_TASKS: tuple[str, ...] = ("refer", "identify")
"""GeoChat's referring (phrase -> box) and region-identification (box -> phrase) instructions."""
SCAN_TASKS: tuple[str, ...] = ("ground", "classify", "caption")
"""Tasks a whole-raster scan runs tile by tile."""

TASK_TOKENS: dict[str, str] = {
    "caption": "[caption]", "vqa": "[vqa]", "ground": "[grounding]", "classify": "[classify]",
    "refer": "[refer]", "identify": "[identify]",
}
TASK_ALIASES: dict[str, str] = {
    "ask": "vqa", "question": "vqa", "grounding": "ground", "detect": "ground", "classification": "classify",
    "describe": "caption",
}
DEFAULT_QUESTIONS: dict[str, str] = {
    "caption": "describe this image in detail.",
    "vqa": "what can you see in this image?",
    "ground": "locate the objects in this image and give their boxes.",
    "classify": "which scene class best describes this image?",
    "refer": "where is the object in this image?",
    "identify": "what is in the marked region?",
}

_TOKEN_TO_TASK = {token: task for task, token in TASK_TOKENS.items()}
_LEADING_TOKEN = re.compile(r"^\s*(\[[a-z]+\])\s*", re.IGNORECASE)


def canonical_task(name: str, allowed: tuple[str, ...] = TASKS) -> str:
    """The task id for a name or alias (case-insensitive); ``ValueError`` lists the choices."""
    key = str(name or "").strip().lower()
    key = TASK_ALIASES.get(key, key)
    if key not in allowed:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(allowed)}")
    return key


def default_question(task: str) -> str:
    """The question a task asks when the user gives none."""
    if task not in DEFAULT_QUESTIONS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(DEFAULT_QUESTIONS)}")
    return DEFAULT_QUESTIONS[task]


def split_task_token(question: str | None) -> tuple[str | None, str]:
    """``("ground", "Locate all airplanes.")`` for ``"[grounding] Locate all airplanes."``.

    Why: analysts (and GeoChat's README) type questions with a task token; the prompt builders
    add their own, so a leading known token is taken off once here and never doubled.  Unknown
    bracketed words are left in the question.
    """
    text = " ".join((question or "").split())
    match = _LEADING_TOKEN.match(text)
    if match and match.group(1).lower() in _TOKEN_TO_TASK:
        return _TOKEN_TO_TASK[match.group(1).lower()], text[match.end():]
    return None, text


PRECISIONS: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16", "int8")
"""``--precision`` choices.  ``int8`` is weight-only int8 decoding on a CPU; bitsandbytes
quantization on CUDA is a separate setting (``quantization``: 8bit / 4bit)."""
PRECISION_ALIASES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
                                     "": "auto"}


def canonical_precision(name: str | None) -> str:
    """The precision id for a name or alias; ``ValueError`` lists the choices."""
    key = str(name or "auto").strip().lower().replace("torch.", "")
    key = PRECISION_ALIASES.get(key, key)
    if key not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    return key


LEVELS: tuple[str, ...] = ("object", "region", "scene")
"""The seed's semantic levels, fine to coarse: visual tokens, knowledge entries, experts and the
``retrieved`` list of a result are each labelled with one of these."""

BACKENDS: tuple[str, ...] = ("auto", "transformers", "vllm")
"""``--backend`` choices for LLaVA-family folders: vLLM on CUDA when installed (``auto``), else
transformers with the engine's fused decode step."""
