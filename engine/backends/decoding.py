"""The one decode loop every backend uses: sampling, streaming, stop strings, box scores.

Why one loop: what the analyst sees (streamed pieces, a cut at a stop string, box confidences,
cancellation between tokens) must not depend on which model answers.  A backend supplies two
functions, ``prefill()`` (the prompt and images once, returning the last logits) and
``step(tokens, alive)`` (one token per row through its KV cache, returning the next logits);
everything between them is here.

Per row, generation ends at an end-of-sequence id (reason ``"eos"``; the id is kept in the
row's tokens), when the decoded text contains a stop string (``"stop_string"``; the text is cut
before it), at ``max_new_tokens`` (``"max_tokens"``) or when ``should_stop()`` turns true
between two steps (``"cancelled"``, every unfinished row).  Text that might be the start of a
stop string, or an incomplete UTF-8 character, is held back until it is known, so the streamed
pieces of a row concatenate exactly to its final text.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from engine.grounding import GridBox

from .base import StopCheck, TokenCallback

__all__ = ["DecodeResult", "decode", "sample_next_token", "box_scores", "text_score"]

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(history_ids (B, T), scores (B, V)) -> scores``, as transformers' logits processors."""


@dataclass
class DecodeResult:
    sequences: list[list[int]]                   # generated ids per row (prompt excluded, eos kept)
    texts: list[str]                             # decoded answers (special tokens and stop string cut)
    stopped_reason: str                          # "cancelled" > "max_tokens" > "stop_string" > "eos"
    stopped_reasons: list[str] = field(default_factory=list)   # per row
    logprobs: list[list[float]] = field(default_factory=list)  # per row: log p of each generated token
    token_ends: list[list[int]] = field(default_factory=list)  # per row: text length after each token
    retrieved: dict = field(default_factory=dict)              # what the backend's prefill retrieved


def sample_next_token(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0,
                      top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) next tokens: argmax, or a sample from the temperature-scaled nucleus (top-p)."""
    if not do_sample or temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(dim=-1) - sorted_p > top_p                   # keeps the top token
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator)[:, 0].to(logits.device)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class _Row:
    """Streaming state of one batch row: tokens so far, decoded text, how much was streamed."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.ends: list[int] = []
        self.text = ""
        self.emitted = 0
        self.reason: str | None = None


def decode(prefill: Callable[[], torch.Tensor], step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
           batch: int, *, max_new_tokens: int, eos_ids: Sequence[int], pad_id: int, tokenizer=None,
           stop_strings: Sequence[str] = (), on_token: TokenCallback | None = None,
           should_stop: StopCheck | None = None, do_sample: bool = False, temperature: float = 1.0,
           top_p: float = 1.0, generator: torch.Generator | None = None,
           banned_ids: torch.Tensor | None = None, logits_processors: Sequence[LogitsProcessor] = (),
           prompt_ids: torch.Tensor | None = None) -> DecodeResult:
    """Run ``prefill`` once, then ``step`` until every row has ended (see the module docstring).

    ``on_token(row, piece)`` is called once per generated token other than an eos id (plus, at
    the end, once to flush text held back); ``banned_ids`` are never chosen (their probability
    is taken out before the recorded log-probabilities); ``logits_processors`` see the prompt
    (``prompt_ids``) plus what was generated, and change the choice, not the recorded scores.
    """
    rows = [_Row() for _ in range(batch)]
    if should_stop is not None and should_stop():
        return _result(rows, cancelled=True)
    logits = prefill()
    eos = {int(e) for e in eos_ids}
    history = prompt_ids
    cancelled = False
    for index in range(max_new_tokens):
        scores = logits.float()
        if banned_ids is not None and banned_ids.numel():
            scores[:, banned_ids.to(scores.device)] = float("-inf")
        model_logp = torch.log_softmax(scores, dim=-1)
        for proc in logits_processors:
            scores = proc(history, scores)
        next_tokens = sample_next_token(scores, do_sample, temperature, top_p, generator)   # (B,)
        alive = torch.tensor([r.reason is None for r in rows], device=next_tokens.device)
        next_tokens = torch.where(alive, next_tokens, torch.full_like(next_tokens, pad_id))
        chosen = model_logp.gather(1, next_tokens[:, None])[:, 0].tolist()
        for row_index, row in enumerate(rows):
            if row.reason is None:
                row.logprobs.append(max(float(chosen[row_index]), -1e4))
                _advance(row, row_index, int(next_tokens[row_index]), eos, tokenizer, stop_strings, on_token)
        if all(r.reason is not None for r in rows) or index == max_new_tokens - 1:
            break
        if should_stop is not None and should_stop():
            cancelled = True
            break
        if history is not None:
            history = torch.cat([history, next_tokens[:, None].to(history.device)], dim=1)
        logits = step(next_tokens, alive)
    return _result(rows, cancelled, on_token)


def _advance(row: _Row, index: int, token: int, eos: set[int], tokenizer, stop_strings: Sequence[str],
             on_token: TokenCallback | None) -> None:
    """Append one token to a row: stream its text piece, detect end-of-sequence and stop strings."""
    row.tokens.append(token)
    if token in eos:
        row.ends.append(len(row.text))
        row.reason = "eos"
        return
    safe = row.emitted
    if tokenizer is not None:
        row.text = tokenizer.decode(row.tokens, skip_special_tokens=True)
        row.ends.append(len(row.text))
        hits = [i for i in (row.text.find(s) for s in stop_strings if s) if i >= 0]
        if hits:
            row.text, row.reason = row.text[: min(hits)], "stop_string"
            safe = len(row.text)
        elif not row.text.endswith("\ufffd"):          # else: incomplete UTF-8 character, wait
            safe = len(row.text) - _held_back(row.text, stop_strings)
    else:
        row.ends.append(0)
    piece, row.emitted = row.text[row.emitted:safe], max(row.emitted, safe)
    if on_token is not None:
        on_token(index, piece)


def _held_back(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    return max((n for s in stop_strings for n in range(1, min(len(s), len(text) + 1))
                if text.endswith(s[:n])), default=0)


def _result(rows: list[_Row], cancelled: bool, on_token: TokenCallback | None = None) -> DecodeResult:
    for index, row in enumerate(rows):
        if row.reason is None:
            row.reason = "cancelled" if cancelled else "max_tokens"
        if on_token is not None and row.emitted < len(row.text):     # flush held-back text
            on_token(index, row.text[row.emitted:])
            row.emitted = len(row.text)
    reasons = [r.reason for r in rows]
    overall = next((r for r in ("cancelled", "max_tokens", "stop_string") if r in reasons), "eos")
    return DecodeResult([r.tokens for r in rows], [r.text for r in rows], overall, reasons,
                        [r.logprobs for r in rows], [r.ends for r in rows])


def text_score(token_logps: list[float]) -> float | None:
    """The answer's confidence: the geometric-mean probability of the tokens it was written with."""
    return math.exp(sum(token_logps) / len(token_logps)) if token_logps else None


def box_scores(text: str, token_ends: list[int], token_logps: list[float], boxes: list[GridBox]) -> list[float]:
    """Geometric mean probability of the tokens overlapping each box's ``{...}`` text.

    ``token_ends[k]`` is the length of the decoded answer after token ``k``.  Boxes are matched to
    the ``{...}`` groups of ``text`` in order; when the model wrote boxes without braces (the
    parser accepts them) the groups cannot be matched and every box gets the answer's mean.
    """
    if not boxes:
        return []
    if not token_logps:
        return [0.0] * len(boxes)
    spans, pos = [], 0
    while True:
        start = text.find("{", pos)
        end = text.find("}", start + 1) if start >= 0 else -1
        if start < 0 or end < 0:
            break
        spans.append((start, end + 1))
        pos = end + 1
    overall = text_score(token_logps)
    if len(spans) != len(boxes):
        return [overall] * len(boxes)
    scores = []
    for a, b in spans:
        picked = [lp for k, lp in enumerate(token_logps)
                  if (token_ends[k - 1] if k else 0) < b and token_ends[k] > a]
        scores.append(math.exp(sum(picked) / len(picked)) if picked else overall)
    return scores
