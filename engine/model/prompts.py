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

from engine.grounding import readable_text
from engine.tasks import DEFAULT_QUESTIONS, TASK_TOKENS, default_question, split_task_token

__all__ = [
    "TASKS", "DEFAULT_QUESTIONS", "default_question", "build_prompt", "encode_prompt", "encode_example", "pad_batch",
]

IGNORE_INDEX = -100
TASKS = TASK_TOKENS
"""Task name -> task token (:mod:`engine.tasks` is their home)."""


def build_prompt(task: str, question: str | None = None, history: Sequence[dict] | None = None) -> str:
    """``"<image>\\n[task] question\\n"``; an empty question takes the task's default.

    A question that already starts with a task token ("[grounding] airplanes") gets no second
    one: the token is the task's, written once.  ``history`` (earlier ``{"question", "answer"}``
    turns on the same image) is written before the question as ``[vqa] q\\na\\n`` per turn, so a
    follow-up ("and how many are white?") sees what it follows.
    """
    if task not in TASK_TOKENS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASK_TOKENS)}")
    _, question = split_task_token(question)
    question = _no_image_token(question or default_question(task))
    turns = ""
    for turn in history or ():
        _, earlier = split_task_token(str(turn.get("question", "")))
        # as the analyst read it ("2 airplanes", "red"): the dock sends the raw text, boxes
        # included, and training writes earlier turns the same readable way
        answer = " ".join(readable_text(str(turn.get("answer", "")), "ground").split())
        turns += f"{TASK_TOKENS['vqa']} {_no_image_token(earlier)}\n{_no_image_token(answer)}\n"
    return f"<image>\n{turns}{TASK_TOKENS[task]} {question}\n"


def _no_image_token(text: str) -> str:
    """Exactly one ``<image>`` per prompt: the one the prompt puts there."""
    return text.replace("<image>", "image")


def encode_prompt(tokenizer, task: str, question: str | None = None, history: Sequence[dict] | None = None) -> list[int]:
    """Token ids of ``<s>`` + prompt: what generation starts from."""
    return [tokenizer.bos_token_id] + tokenizer.encode(build_prompt(task, question, history), add_special_tokens=False)


def encode_example(tokenizer, task: str, question: str | None, answer: str,
                   history: Sequence[dict] | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one training example; labels are -100 on ``<s>`` and the prompt
    (earlier turns of ``history`` included: only the last answer is learnt)."""
    prompt = encode_prompt(tokenizer, task, question, history)
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
