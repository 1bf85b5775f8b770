"""Autoregressive generation with a KV cache, token streaming, stop strings and cancellation.

Why our own loop rather than ``transformers.GenerationMixin``: the prompt is spliced with visual
tokens and the retrieval results of the prefill must come back with the answer; the engine needs
a per-token callback (to stream text to QGIS) and a cancellation check between tokens.  The loop
is the textbook one: prefill the whole (left-padded) batch once, then feed one token per row per
step, reusing the cache.  ``use_cache=False`` recomputes everything each step; it exists to prove
that the cache changes nothing (a test compares the two).

Per row, generation ends at ``</s>`` (reason ``"eos"``), when the decoded text contains a stop
string (``"stop_string"``; the text is cut before it), at ``max_new_tokens`` (``"max_tokens"``)
or when ``should_stop()`` turns true between two steps (``"cancelled"``, every unfinished row).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .fast_decode import FusedDecoder
from .modeling_rs_lvlm import RsLvlmForConditionalGeneration
from .semantic_augmentation import Retriever

__all__ = ["generate", "GenerationResult", "sample_next_token"]


@dataclass
class GenerationResult:
    sequences: list[list[int]]                   # generated ids per row (prompt excluded, </s> kept)
    texts: list[str]                             # decoded answers (special tokens and stop string cut)
    retrieved: dict[str, tuple[torch.Tensor, torch.Tensor]]  # level -> (scores (B,k), ids (B,k))
    stopped_reason: str                          # "cancelled" > "max_tokens" > "stop_string" > "eos"
    stopped_reasons: list[str] = field(default_factory=list)  # per row
    logprobs: list[list[float]] = field(default_factory=list)  # per row: log p of each generated token


def sample_next_token(
    logits: torch.Tensor,                         # (B, V)
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
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
        self.text = ""
        self.emitted = 0
        self.reason: str | None = None


@torch.no_grad()
def generate(
    model: RsLvlmForConditionalGeneration,
    pixel_values: torch.Tensor,                   # (B, 3, H, W)
    input_ids: torch.Tensor,                      # (B, T) left-padded prompts, one <image> each
    attention_mask: torch.Tensor | None,          # (B, T)
    question_embeds: torch.Tensor | None = None,  # (B, 384)
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    on_token: Callable[[int, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    retriever: Retriever | None = None,
    fast: bool = True,
    int8: bool = False,
) -> GenerationResult:
    """Generate answers for a batch of images and prompts (see the module docstring).

    ``on_token(row, piece)`` is called once per generated token other than ``</s>`` (plus, rarely,
    once at the end to flush text held back as a possible stop-string start); the pieces of a
    row concatenate to its final text (a piece is empty while a multi-byte character is
    incomplete, or without a tokenizer).  ``fast`` decodes with :class:`FusedDecoder` (same
    function, fewer operations; ``int8`` with int8 matrices on a CPU); ``fast=False`` is the
    module-by-module reference path."""
    device = model.device
    b = input_ids.shape[0]
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    pixel_values = pixel_values.to(device=device, dtype=model.dtype)
    if question_embeds is not None:
        question_embeds = question_embeds.to(device)
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    rows = [_Row() for _ in range(b)]
    if should_stop is not None and should_stop():
        return _result(rows, {}, cancelled=True)

    out = model(pixel_values, input_ids, attention_mask, question_embeds=question_embeds,
                use_cache=use_cache, retriever=retriever, logits_to_keep=1)
    retrieved = {k: (s.cpu(), i.cpu()) for k, (s, i) in out.retrieved.items()}
    spliced_mask, cache = out.attention_mask, out.past_key_values
    logits = out.logits[:, -1]                                                      # (B, V)
    decoder = None
    if use_cache and fast and not model.training and max_new_tokens > 1:
        decoder = FusedDecoder(model, b, capacity=spliced_mask.shape[1] + max_new_tokens, int8=int8)
        decoder.load_cache(cache)
        cache = None
    generated = torch.empty(b, 0, dtype=torch.long, device=device)                 # (B, steps)
    cancelled = False
    for step in range(max_new_tokens):
        next_tokens = sample_next_token(logits, do_sample, temperature, top_p, generator)   # (B,)
        alive = torch.tensor([r.reason is None for r in rows], device=device)
        next_tokens = torch.where(alive, next_tokens, torch.full_like(next_tokens, pad))
        chosen = torch.log_softmax(logits.float(), dim=-1).gather(1, next_tokens[:, None])[:, 0].tolist()
        for index, row in enumerate(rows):
            if row.reason is None:
                row.logprobs.append(chosen[index])
                _advance(row, index, int(next_tokens[index]), eos, tokenizer, stop_strings, on_token)
        if all(r.reason is not None for r in rows):
            break
        if step == max_new_tokens - 1:
            break
        if should_stop is not None and should_stop():
            cancelled = True
            break
        generated = torch.cat([generated, next_tokens[:, None]], dim=1)
        new_mask = alive.long()[:, None]                                            # (B, 1)
        spliced_mask = torch.cat([spliced_mask, new_mask], dim=1)
        if decoder is not None:
            logits = decoder.step(next_tokens, spliced_mask)
        elif use_cache:
            out = model(None, next_tokens[:, None], spliced_mask, past_key_values=cache,
                        use_cache=True, logits_to_keep=1)
            cache, logits = out.past_key_values, out.logits[:, -1]
        else:
            gen_mask = torch.cat([attention_mask, spliced_mask[:, -generated.shape[1]:]], dim=1)
            out = model(pixel_values, torch.cat([input_ids, generated], dim=1), gen_mask,
                        question_embeds=question_embeds, retriever=retriever, logits_to_keep=1)
            logits = out.logits[:, -1]
    return _result(rows, retrieved, cancelled, on_token)


def _advance(row: _Row, index: int, token: int, eos: int, tokenizer, stop_strings: Sequence[str],
             on_token: Callable[[int, str], None] | None) -> None:
    """Append one token to a row: stream its text piece, detect </s> and stop strings.

    Text that might be the beginning of a stop string is held back until it is known not to be
    one, so that the streamed pieces never contain (part of) a stop string."""
    row.tokens.append(token)
    if token == eos:
        row.reason = "eos"
        return
    safe = row.emitted
    if tokenizer is not None:
        row.text = tokenizer.decode(row.tokens, skip_special_tokens=True)
        hits = [i for i in (row.text.find(s) for s in stop_strings if s) if i >= 0]
        if hits:
            row.text, row.reason = row.text[: min(hits)], "stop_string"
            safe = len(row.text)
        elif not row.text.endswith("\ufffd"):          # else: incomplete UTF-8 character, wait
            safe = len(row.text) - _held_back(row.text, stop_strings)
    piece, row.emitted = row.text[row.emitted:safe], max(row.emitted, safe)
    if on_token is not None:
        on_token(index, piece)


def _held_back(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    return max((n for s in stop_strings for n in range(1, min(len(s), len(text) + 1))
                if text.endswith(s[:n])), default=0)


def _result(rows: list[_Row], retrieved: dict, cancelled: bool,
            on_token: Callable[[int, str], None] | None = None) -> GenerationResult:
    for index, row in enumerate(rows):
        if row.reason is None:
            row.reason = "cancelled" if cancelled else "max_tokens"
        if on_token is not None and row.emitted < len(row.text):     # flush held-back text
            on_token(index, row.text[row.emitted:])
            row.emitted = len(row.text)
    reasons = [r.reason for r in rows]
    overall = next((r for r in ("cancelled", "max_tokens", "stop_string") if r in reasons), "eos")
    return GenerationResult([r.tokens for r in rows], [r.text for r in rows], retrieved, overall, reasons,
                            [r.logprobs for r in rows])
