"""The embedded model's two decode functions: prefill the prompt once, then one token a step.

Why only these two: the loop around them (sampling, streaming, stop strings, cancellation, box
scores) is shared by every backend (:mod:`engine.backends.decoding`); what is the model's own is
how a prompt spliced with visual tokens and retrieval is prefilled, and how one step reuses the
KV cache.  ``use_cache=False`` recomputes everything each step; it exists to prove that the
cache changes nothing (a test compares the two).  ``fast`` decodes with :class:`FusedDecoder`
(same function, fewer operations; ``int8`` with int8 matrices on a CPU); ``fast=False`` is the
module-by-module reference path.
"""
from __future__ import annotations

import torch

from .fast_decode import FusedDecoder
from .modeling_rs_lvlm import RsLvlmForConditionalGeneration
from .object_vision import class_counts
from .references import constrain_references, reference_offsets
from .referring import AnswerGrammar
from .semantic_augmentation import Retriever

__all__ = ["RsLvlmDecodeSteps"]


class RsLvlmDecodeSteps:
    """``prefill()`` and ``step(tokens, alive)`` for one batch of prompts and images."""

    def __init__(self, model: RsLvlmForConditionalGeneration, pixel_values: torch.Tensor,
                 input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 question_embeds: torch.Tensor | None = None, *, max_new_tokens: int = 64,
                 use_cache: bool = True, retriever: Retriever | None = None, fast: bool = True,
                 int8: bool = False) -> None:
        device = model.device
        self.model = model
        self.input_ids = input_ids.to(device)                                           # (B, T) left-padded
        self.attention_mask = (torch.ones_like(self.input_ids) if attention_mask is None
                               else attention_mask.to(device))
        self.pixel_values = pixel_values.to(device=device, dtype=model.dtype)         # (B, 3, H, W)
        self.question_embeds = None if question_embeds is None else question_embeds.to(device)
        self.max_new_tokens = max_new_tokens
        self.use_cache, self.retriever, self.fast, self.int8 = use_cache, retriever, fast, int8
        self.retrieved: dict = {}
        # (B, K, 4) boxes, (B, K) scores, (B, K) classes of the object tokens' detections
        self.detections: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # which detections a reference should prefer, when a listing must go on, which answer
        # words the evidence rules out (the pipeline sets it from the question; see referring.py)
        self.grammar: AnswerGrammar | None = None
        self._cache = None
        self._decoder: FusedDecoder | None = None
        self._spliced_mask: torch.Tensor | None = None
        self._generated = torch.empty(self.input_ids.shape[0], 0, dtype=torch.long, device=device)
        self._object_embeds: torch.Tensor | None = None
        self._object_boxes: torch.Tensor | None = None
        self._last_reference = torch.full((self.input_ids.shape[0],), -1, dtype=torch.long, device=device)
        # (B, R) scores and classes of what a reference may point at: the detections, then with
        # count_references the count token of each class (always valid, of its own class)
        self._referable: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def pad_id(self) -> int:
        return int(self.model.config.pad_token_id)

    @property
    def eos_ids(self) -> list[int]:
        return [int(self.model.config.eos_token_id)]

    @torch.no_grad()
    def prefill(self) -> torch.Tensor:
        """Logits (B, V) after the prompt; keeps the cache and what the SAM retrieved."""
        out = self.model(self.pixel_values, self.input_ids, self.attention_mask,
                         question_embeds=self.question_embeds, use_cache=self.use_cache,
                         retriever=self.retriever, logits_to_keep=1)
        self.retrieved = {k: (s.cpu(), i.cpu()) for k, (s, i) in out.retrieved.items()}
        # Object-centric models: the detections behind the object tokens, which <obj k> answers
        # refer to (engine.model.references resolves them to boxes).
        self.detections = (None if out.detections is None else
                           (out.detections.boxes.float().cpu(), out.detections.scores.float().cpu(),
                            out.detections.classes.cpu()))
        self._spliced_mask, self._cache = out.attention_mask, out.past_key_values
        self._object_embeds = out.object_embeds          # reference feedback in the steps
        self._object_boxes = out.object_boxes            # and the pointed boxes' geometry
        self._referable = None if self.detections is None else self._referable_targets(*self.detections[1:])
        if self.grammar is not None and out.detections is not None:
            d, config = out.detections, self.model.config
            counts = (class_counts(d, int(config.num_object_classes), float(config.count_min_score))
                      if config.class_count_tokens else None)
            self.grammar.bind(d.boxes, d.scores, d.classes, d.colour_probs.argmax(-1), d.size_probs.argmax(-1),
                              counts)
        if self.use_cache and self.fast and not self.model.training and self.max_new_tokens > 1:
            self._decoder = FusedDecoder(self.model, self.input_ids.shape[0],
                                         capacity=self._spliced_mask.shape[1] + self.max_new_tokens, int8=self.int8)
            self._decoder.load_cache(self._cache)
            self._cache = None
        return self._constrain(out.logits[:, -1])

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (ended rows feed padding, masked out) -> logits (B, V);
        references to object tokens are constrained (engine.model.references)."""
        return self._constrain(self._step(tokens, alive))

    def _constrain(self, logits: torch.Tensor) -> torch.Tensor:
        """References in the next token's logits follow the grammar of
        :func:`constrain_references` (also for the first token: an answer may open with one),
        refined by the question's :class:`AnswerGrammar` when the pipeline gave one."""
        start = self.model.config.object_token_start
        if self._referable is None or start is None:
            return logits
        scores, classes = self._referable
        if self.grammar is None:
            return constrain_references(logits, self._generated, scores, classes, int(start))
        rows = [row.tolist() for row in self._generated]
        preferred = [self.grammar.preferred(i, r, scores.shape[1]) for i, r in enumerate(rows)]
        must_list = [self.grammar.must_list_more(i, r) for i, r in enumerate(rows)]
        logits = constrain_references(logits, self._generated, scores, classes, int(start), preferred, must_list)
        for i, r in enumerate(rows):
            banned = self.grammar.banned_words(i, r)
            if banned:
                logits[i, banned] = float("-inf")
        return logits

    def _referable_targets(self, scores: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Computed once per prefill, not per step."""
        if not self.model.config.count_references:
            return scores, classes
        n = int(self.model.config.num_object_classes)
        scores = torch.cat([scores, scores.new_ones(scores.shape[0], n)], dim=1)
        classes = torch.cat([classes, torch.arange(n, dtype=classes.dtype).expand(classes.shape[0], n)], dim=1)
        return scores, classes

    def _step(self, tokens: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        self._generated = torch.cat([self._generated, tokens[:, None]], dim=1)
        self._spliced_mask = torch.cat([self._spliced_mask, alive.long()[:, None]], dim=1)
        previous = self._last_reference                  # reference geometry's context
        if self._object_boxes is not None:
            _, is_box = reference_offsets(tokens, int(self.model.config.object_token_start),
                                          self._object_boxes.shape[1])
            self._last_reference = torch.where(is_box, tokens, self._last_reference)
        if self._decoder is not None:
            extra = None
            if self._object_embeds is not None:
                extra = self.model.reference_feedback(tokens[:, None], self._object_embeds, self._object_boxes,
                                                      previous)[:, 0]
            return self._decoder.step(tokens, self._spliced_mask, extra)
        if self.use_cache:
            out = self.model(None, tokens[:, None], self._spliced_mask, past_key_values=self._cache,
                             use_cache=True, logits_to_keep=1, object_embeds=self._object_embeds,
                             object_boxes=self._object_boxes, previous_reference=previous)
            self._cache = out.past_key_values
            return out.logits[:, -1]
        steps = self._generated.shape[1]
        mask = torch.cat([self.attention_mask, self._spliced_mask[:, -steps:]], dim=1)
        out = self.model(self.pixel_values, torch.cat([self.input_ids, self._generated], dim=1), mask,
                         question_embeds=self.question_embeds, retriever=self.retriever, logits_to_keep=1)
        return out.logits[:, -1]
