"""Prompt layout shared by training, evaluation and the engine.

One layout for every task, so the model always finds the image and the task in the same place::

    <s> <image> \\n [task] question \\n answer </s>

The loss is on the answer and ``</s>`` only (the prompt is given, not predicted).  Prompt and
answer are tokenized separately, at training and at inference alike, so the model is trained on
exactly the token boundary it sees when it starts generating.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = [
    "TASKS", "DEFAULT_QUESTIONS", "default_question", "build_prompt", "encode_prompt", "encode_example", "pad_batch",
]

IGNORE_INDEX = -100
TASKS: dict[str, str] = {
    "caption": "[caption]",
    "vqa": "[vqa]",
    "ground": "[grounding]",
    "classify": "[classify]",
    "refer": "[refer]",
    "identify": "[identify]",
}
"""Task name -> task token.  The product's four tasks first; ``refer``/``identify`` are GeoChat's
referring (phrase -> box) and region-identification (box -> phrase) instructions."""
DEFAULT_QUESTIONS: dict[str, str] = {
    "caption": "describe this image in detail.",
    "vqa": "what can you see in this image?",
    "ground": "locate the objects in this image and give their boxes.",
    "classify": "which scene class best describes this image?",
    "refer": "where is the object in this image?",
    "identify": "what is in the marked region?",
}


def default_question(task: str) -> str:
    """The question a task asks when the user gives none."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    return DEFAULT_QUESTIONS[task]


def build_prompt(task: str, question: str | None = None) -> str:
    """``"<image>\\n[task] question\\n"``; an empty question takes the task's default."""
    question = " ".join((question or "").split()) or default_question(task)
    if "<image>" in question:
        question = question.replace("<image>", "image")   # exactly one <image> per prompt
    return f"<image>\n{TASKS[task]} {question}\n"


def encode_prompt(tokenizer, task: str, question: str | None = None) -> list[int]:
    """Token ids of ``<s>`` + prompt: what generation starts from."""
    return [tokenizer.bos_token_id] + tokenizer.encode(build_prompt(task, question), add_special_tokens=False)


def encode_example(tokenizer, task: str, question: str | None, answer: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one training example; labels are -100 on ``<s>`` and the prompt."""
    prompt = encode_prompt(tokenizer, task, question)
    target = tokenizer.encode(answer.strip(), add_special_tokens=False) + [tokenizer.eos_token_id]
    return prompt + target, [IGNORE_INDEX] * len(prompt) + target


def pad_batch(
    sequences: Sequence[Sequence[int]],
    pad_token_id: int,
    labels: Sequence[Sequence[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Left-pad to (B, T): input_ids, attention_mask and, if given, labels (padded with -100)."""
    t = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), t), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), t), dtype=torch.long)
    out_labels = None if labels is None else torch.full((len(sequences), t), IGNORE_INDEX, dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, t - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, t - len(seq):] = 1
        if out_labels is not None and len(labels[row]):
            out_labels[row, t - len(labels[row]):] = torch.as_tensor(labels[row], dtype=torch.long)
    return ids, mask, out_labels
