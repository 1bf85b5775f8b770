"""The inference pipeline the engine keeps loaded: checkpoint + knowledge index + question encoder.

It turns image chips and a question into answers with their grounded boxes, per-box confidence
and the knowledge entries the Semantic Augmentation Module retrieved (shown to the analyst to
explain the answer). Retrieval at inference goes through the faiss index of the checkpoint's
knowledge folder, the same inner-product search the model was trained with.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from engine.grounding import parse_boxes
from engine.tasks import LEVELS, split_task_token

from .base import Answer, StopCheck, TokenCallback, checkpoint_errors
from .decoding import DecodeResult, box_scores, decode, text_score



def generate(model, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             question_embeds: torch.Tensor | None = None, *, max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, stop_strings: Sequence[str] = (), tokenizer=None,
             on_token: TokenCallback | None = None, should_stop: StopCheck | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None, retriever=None, fast: bool = True,
             int8: bool = False, grammar=None) -> DecodeResult:
    """Answers for a batch of images and left-padded prompts (one ``<image>`` each), through the
    shared decode loop; ``result.retrieved`` holds what the SAM fused (level -> (scores, ids)).
    ``grammar``: the question's :class:`engine.model.referring.AnswerGrammar` (which detections
    its references prefer, which answer words its evidence rules out); without one references
    keep only the grammar of :func:`engine.model.references.constrain_references`."""
    from engine.model.generation import RsLvlmDecodeSteps

    steps = RsLvlmDecodeSteps(model, pixel_values, input_ids, attention_mask, question_embeds,
                              max_new_tokens=max_new_tokens, use_cache=use_cache, retriever=retriever,
                              fast=fast, int8=int8)
    steps.grammar = grammar
    result = decode(steps.prefill, steps.step, input_ids.shape[0], max_new_tokens=max_new_tokens,
                    eos_ids=steps.eos_ids, pad_id=steps.pad_id, tokenizer=tokenizer, stop_strings=stop_strings,
                    on_token=on_token, should_stop=should_stop, do_sample=do_sample, temperature=temperature,
                    top_p=top_p, generator=generator)
    result.retrieved = steps.retrieved
    result.detections = steps.detections
    return result


class RsLvlmPipeline:
    """Loads a checkpoint folder once and answers many requests with it."""

    def __init__(self, loaded, knowledge, encoder, device: str, model_dir: Path) -> None:
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        self.knowledge = knowledge
        self.encoder = encoder
        self.device = device
        self.model_dir = model_dir
        self.name = getattr(self.config, "name", None) or model_dir.name
        self._question_cache: dict[str, np.ndarray] = {}
        self.int8_decode = False           # decode with int8 matrices (CPU; see fast_decode.py)
        self.grammar = "evidence"          # engine.model.referring.GRAMMARS

    @classmethod
    def load(cls, model_dir: Path | str, device: str = "cpu", dtype: torch.dtype | str | None = None,
             knowledge_dir: Path | str | None = None) -> "RsLvlmPipeline":
        """``knowledge_dir``: a knowledge index to retrieve from instead of the checkpoint's own
        (the analyst's, rebuilt with their entries by ``build-knowledge``; the shipped entries
        come first in it, so the model's trained retrieval still finds them)."""
        from engine.knowledge import KnowledgeBase, SentenceEncoder
        from engine.model.checkpoint import load_checkpoint

        model_dir = Path(model_dir)
        if dtype is None and device == "cuda":
            dtype = torch.bfloat16
        with checkpoint_errors():
            kdir = Path(knowledge_dir) if knowledge_dir else model_dir / "knowledge"
            # an index asked for must be whole (KnowledgeBase.load says what is wrong with it)
            knowledge = (KnowledgeBase.load(kdir, device=device)
                         if knowledge_dir or (kdir / "index.faiss").is_file() else None)
            arrays = None if knowledge is None else (knowledge.embeddings, knowledge.level_ids)
            loaded = load_checkpoint(model_dir, device=device, dtype=dtype, knowledge=arrays)  # the folder read once
            if knowledge is None:
                knowledge = KnowledgeBase.load(loaded.knowledge_dir, device=device)
        loaded.model.eval()
        return cls(loaded, knowledge, SentenceEncoder(), device, model_dir)

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    def info(self) -> dict:
        counts = self.model.parameter_counts()
        return {"name": self.name, "path": str(self.model_dir), "parameters": counts,
                "parameters_total": counts.get("total"), "image_size": self.image_size,
                "use_sam": bool(self.config.use_sam), "use_experts": bool(self.config.use_experts),
                "knowledge_entries": int(len(self.knowledge.level_ids)),
                "knowledge_index": str(self.knowledge.index_dir),
                "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
                "int8_decode": self.int8_decode, "answer_grammar": self.grammar}

    # -- helpers ----------------------------------------------------------------------------
    def question_embeds(self, questions: list[str]) -> torch.Tensor:
        """MiniLM embeddings of the questions, cached: analysts repeat questions."""
        missing = [q for q in dict.fromkeys(questions) if q not in self._question_cache]
        if missing:
            for q, v in zip(missing, self.encoder.encode(missing)):
                self._question_cache[q] = v
        return torch.from_numpy(np.stack([self._question_cache[q] for q in questions])).to(self.device)

    def retriever(self, queries: np.ndarray, k: int, level: str) -> tuple[np.ndarray, np.ndarray]:
        return self.knowledge.search(np.ascontiguousarray(queries, dtype=np.float32), k, level=level)

    def _encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        bos = self.tokenizer.bos_token_id
        rows = [[bos] + r if bos is not None and (not r or r[0] != bos) else r for r in rows]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, length - len(r):] = torch.tensor(r)
            mask[i, length - len(r):] = 1
        return ids.to(self.device), mask.to(self.device)

    # -- answering --------------------------------------------------------------------------
    @torch.inference_mode()
    def answer(self, images: list[np.ndarray], task: str, question: str | None, *, max_new_tokens: int = 64,
               on_token: Callable[[int, str], None] | None = None, should_stop: Callable[[], bool] | None = None,
               do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
               history: list[dict] | None = None) -> list[Answer]:
        """Answer the same task/question for each image (several regions run as one batch);
        ``history`` holds earlier ``{"question", "answer"}`` turns on the same region."""
        from engine.model.image_processing import preprocess_images
        from engine.model.prompts import build_prompt, default_question
        from engine.model.references import REFERENCE_RE, object_class_names, resolve_references
        from engine.model.referring import AnswerGrammar, Vocabulary, asked_attribute

        t0 = time.perf_counter()
        asked = split_task_token(question)[1] or default_question(task)
        prompt = build_prompt(task, question, history)
        pixel_values = preprocess_images(images, self.image_size).to(self.device)
        dtype = next(self.model.parameters()).dtype
        pixel_values = pixel_values.to(dtype)
        input_ids, attention = self._encode_prompts([prompt] * len(images))
        q_embeds = self.question_embeds([asked] * len(images)).to(dtype)
        t_prep = time.perf_counter()
        first_token_at: list[float] = []

        def stream(i: int, piece: str) -> None:
            if not first_token_at:
                first_token_at.append(time.perf_counter())
            if on_token is not None:
                on_token(i, REFERENCE_RE.sub("", piece))     # a reference is shown as its box, at the end

        grammar = None
        names = object_class_names(self.config)
        start = getattr(self.config, "object_token_start", None)
        if names and start is not None:
            grammar = AnswerGrammar(asked, Vocabulary.of(self.config), self.tokenizer, int(start),
                                    first_class_from_question=task == "vqa", level=self.grammar,
                                    attribute=asked_attribute(asked) if task == "vqa" else None,
                                    min_listed_score=float(self.config.count_min_score))
        result = generate(self.model, pixel_values, input_ids, attention, q_embeds, max_new_tokens=max_new_tokens,
                          do_sample=do_sample, temperature=temperature, top_p=top_p, tokenizer=self.tokenizer,
                          on_token=stream, should_stop=should_stop, retriever=self.retriever,
                          int8=self.int8_decode, grammar=grammar)
        t_gen = time.perf_counter()
        answers = []
        detections = getattr(result, "detections", None)
        for i, text in enumerate(result.texts):
            text = text.strip()
            referenced = None
            if detections is not None and "<obj" in text:
                # Grounding by reference: <obj k> -> detection k's box text; its score is the box's.
                text, referenced = resolve_references(text, detections[0][i].tolist(), detections[1][i].tolist(),
                                                      detections[2][i].tolist())
                text = text.strip()
            boxes = parse_boxes(text) if task == "ground" or "{<" in text else []
            if referenced is not None and len(referenced) == len(boxes):
                scores = [r.score for r in referenced]
                # Evidence boxes of a VQA answer ("{box} red") have no phrase before them: they
                # are labelled with their detection's class for the map layer.
                boxes = [replace(b, label=names[r.cls]) if not b.label and r.cls is not None and r.cls < len(names)
                         else b for b, r in zip(boxes, referenced)]
            else:
                scores = box_scores(result.texts[i], result.token_ends[i], result.logprobs[i], boxes)
            answers.append(Answer(text=text, boxes=boxes, box_scores=scores,
                                  retrieved=self._retrieved_for(result.retrieved, i), stopped_reason=result.stopped_reason,
                                  prompt_question=asked, text_score=text_score(result.logprobs[i])))
        n_tokens = sum(len(s) for s in result.sequences)
        timing = {"prepare_s": t_prep - t0, "generate_s": t_gen - t_prep, "new_tokens": n_tokens,
                  "first_token_s": (first_token_at[0] - t0) if first_token_at else None,
                  "tokens_per_s": n_tokens / max(t_gen - t_prep, 1e-9)}
        for a in answers:
            a.timing = dict(timing)
        return answers

    def _retrieved_for(self, retrieved: dict, row: int) -> list[dict]:
        """The entries the SAM fused for one image, as {level, entry, score} for the analyst."""
        out = []
        for level in LEVELS:
            if not retrieved or level not in retrieved:
                continue
            scores, ids = retrieved[level]
            scores = scores[row].tolist() if hasattr(scores, "tolist") else list(scores[row])
            ids = ids[row].tolist() if hasattr(ids, "tolist") else list(ids[row])
            for score, idx in zip(scores, ids):
                if idx < 0:
                    continue
                entry = self.knowledge.entry(int(idx))
                out.append({"level": level, "entry": entry.name, "id": entry.id, "kind": entry.kind,
                            "definition": entry.definition, "score": round(float(score), 4)})
        return out
