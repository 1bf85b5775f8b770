"""LLaVA-1.5-family checkpoints (GeoChat, LLaVA-1.5, ...) behind the engine's pipeline interface.

A folder in the transformers layout (``config.json`` with ``model_type: "llava"``, safetensors
weights of a ``LlavaForConditionalGeneration``, tokenizer files, optionally
``preprocessor_config.json``) answers the product's four tasks exactly like the embedded model:
streamed tokens, cancellation between tokens, and grounded boxes parsed from GeoChat's box text by
:func:`engine.grounding.parse_boxes`, so that the service georeferences them with the same
code.  Original LLaVA / GeoChat folders are converted once with ``python -m engine convert``.

Prompts follow GeoChat (itself LLaVA-1.5): the Vicuna v1 conversation template, the image first in
the user turn (``USER: <image>\\n...``), task tokens ``[grounding]`` / ``[refer]`` / ``[identify]``
and boxes written as ``{<x1><y1><x2><y2>|θ}`` on a 0-100 grid (:func:`build_instruction`).

This backend has no knowledge base: ``Answer.retrieved`` is always ``[]`` (``info()`` says so).

Images: the chip is resized (bicubic, antialiased) straight to the vision tower's square input,
never cropped or padded, so that the 0-100 grid of the answer spans exactly the chip the service
georeferences; then scaled to 0..1 and normalised with the processor's mean/std (CLIP's when the
folder has no ``preprocessor_config.json``).

Generation is a plain loop over the KV cache (greedy, or temperature / top-p sampling) so that
each token is streamed as soon as it exists, ``should_stop()`` is polled between tokens, and each
token's probability under the model is kept: a box's score is the geometric mean probability of
the tokens that wrote its ``{...}`` text.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from engine.errors import BAD_CHECKPOINT, EngineError
from engine.tasks import split_task_token
from engine.grounding import GridBox, parse_boxes

from .base import Answer
from .memory import MODEL_TOO_LARGE, check_fits, resolve_dtype, resolve_quantization, safetensors_files
from .tokenizer_files import IMAGE_TOKEN, load_tokenizer

log = logging.getLogger("engine.backends.llava")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
STOP_STRINGS = ("USER:",)
"""Text that ends an answer even when the model does not emit ``</s>`` (it starts a new turn)."""

SHORT_ANSWER = "Answer the question using a single word or phrase."
CLASS_ANSWER = "Answer with one word or short phrase."
DEFAULT_SCENE_CLASSES = (
    "airport", "bare land", "baseball field", "beach", "bridge", "center", "church", "commercial",
    "dense residential", "desert", "farmland", "forest", "industrial", "meadow", "medium residential",
    "mountain", "park", "parking", "playground", "pond", "port", "railway station", "resort", "river",
    "school", "sparse residential", "square", "stadium", "storage tanks", "viaduct")


# -- prompts ---------------------------------------------------------------------------------
def scene_classes() -> list[str]:
    """Scene classes offered by ``classify``: the knowledge base's scene classes when readable."""
    from engine.paths import KNOWLEDGE_DIR

    path = KNOWLEDGE_DIR / "entries.jsonl"
    names: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    entry = json.loads(line)
                    if entry.get("kind") == "scene_class" and entry.get("name"):
                        names.append(str(entry["name"]))
    except (OSError, ValueError):
        names = []
    return names or list(DEFAULT_SCENE_CLASSES)


def build_instruction(task: str, question: str | None) -> tuple[str, str]:
    """(user instruction in GeoChat's conventions, the question as shown to the analyst).

    * ``ground``: no question -> ``[grounding] Describe the image in detail.`` (GeoChat's grounded
      description, every object with its box); a short phrase such as "airplanes" -> GeoChat's
      referring form ``[refer] Give me the location of <p> airplanes </p>``; anything longer ->
      ``[grounding] {question}``.
    * ``caption``: the question, else ``Describe the image in detail.``
    * ``classify``: the question + "Answer with one word or short phrase.", else "Classify the image
      within one of the given classes: ..." over the knowledge base's scene classes.
    * ``vqa``: the question + LLaVA-1.5's short-answer suffix.
    """
    _, q = split_task_token(question)
    q = q.replace(IMAGE_TOKEN, "image")
    if task == "ground":
        if not q:
            return "[grounding] Describe the image in detail.", "Describe the image in detail."
        if len(q.split()) <= 4 and not q.endswith("?"):
            return f"[refer] Give me the location of <p> {q} </p>", q
        return f"[grounding] {q}", q
    if task == "caption":
        q = q or "Describe the image in detail."
        return q, q
    if task == "classify":
        if q:
            return f"{q} {CLASS_ANSWER}", q
        classes = ", ".join(scene_classes())
        text = f"Classify the image within one of the given classes: {classes}. {CLASS_ANSWER}"
        return text, "Which scene class best describes this image?"
    if task in ("refer", "identify"):
        return f"[{task}] {q}", q
    q = q or "What can you see in this image?"
    return f"{q}\n{SHORT_ANSWER}", q


def vicuna_v1_prompt(instruction: str, image_placeholder: str = IMAGE_TOKEN) -> str:
    """``SYSTEM USER: <image>\\n{instruction} ASSISTANT:`` (separators " " and ``</s>``)."""
    return f"{VICUNA_V1_SYSTEM} USER: {image_placeholder}\n{instruction} ASSISTANT:"


# -- images ----------------------------------------------------------------------------------
def preprocess_images(images: Sequence[np.ndarray], size: int, mean: Sequence[float] = CLIP_MEAN,
                      std: Sequence[float] = CLIP_STD, rescale: float = 1 / 255) -> torch.Tensor:
    """HxWx3 uint8 arrays -> (B, 3, size, size) float32, resized without crop or padding."""
    out = []
    for img in images:
        arr = np.asarray(img)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] < 3:
            raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
        t = torch.from_numpy(np.ascontiguousarray(arr[..., :3])).permute(2, 0, 1).float().unsqueeze(0)
        if t.shape[-2:] != (size, size):
            t = torch.nn.functional.interpolate(t, size=(size, size), mode="bicubic", align_corners=False,
                                                antialias=True).clamp_(0, 255)
        out.append(t[0])
    x = torch.stack(out) * rescale
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


# -- box scores ------------------------------------------------------------------------------
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
    overall = math.exp(sum(token_logps) / len(token_logps))
    if len(spans) != len(boxes):
        return [overall] * len(boxes)
    scores = []
    for a, b in spans:
        picked = [lp for k, lp in enumerate(token_logps)
                  if (token_ends[k - 1] if k else 0) < b and token_ends[k] > a]
        scores.append(math.exp(sum(picked) / len(picked)) if picked else overall)
    return scores


def _streamable(text: str) -> int:
    """How much of a growing answer can be streamed now: not a trailing partial UTF-8 character
    (decoded as U+FFFD until its last byte arrives) nor a tail that may become a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for stop in STOP_STRINGS:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:k]):
                end -= k
                break
    return end


# -- the pipeline ----------------------------------------------------------------------------
def _has_accelerate() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


class LlavaPipeline:
    """A loaded LlavaForConditionalGeneration with its tokenizer and image preprocessing."""

    backend = "llava"

    def __init__(self, model, tokenizer, config, device: str, model_dir: Path, dtype: torch.dtype,
                 quantization: str | None = None, memory: dict | None = None) -> None:
        from transformers import LlavaConfig

        if isinstance(config, dict):
            config = LlavaConfig.from_dict(config)
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.device = device
        self.model_dir = Path(model_dir)
        self.dtype = dtype
        self.quantization = quantization
        self.memory = memory or {}
        self.options = dict(getattr(config, "rs_lvlm", None) or {})
        self.name = self.options.get("name") or self.model_dir.name
        self._image_size = int(config.vision_config.image_size)
        self.patch_size = int(config.vision_config.patch_size)
        full = config.vision_feature_select_strategy == "full"
        self.image_tokens = (self._image_size // self.patch_size) ** 2 + (1 if full else 0)
        self.image_token_id = int(config.image_token_index)
        proc = self._read_json(self.model_dir / "preprocessor_config.json")
        self.image_mean = tuple(proc.get("image_mean", CLIP_MEAN))
        self.image_std = tuple(proc.get("image_std", CLIP_STD))
        self.rescale = float(proc.get("rescale_factor", 1 / 255))
        self.image_wrap = ("<im_start>", "<im_end>") if self.options.get("mm_use_im_start_end") else ("", "")
        vocab_rows = int(config.text_config.vocab_size)
        # Never generated: the image placeholder, rows beyond the tokenizer (padded vocabularies),
        # <s> and the padding token (when it is not </s>).
        banned = {self.image_token_id} | set(range(len(tokenizer), vocab_rows))
        banned |= {t for t in (tokenizer.bos_token_id, tokenizer.pad_token_id)
                   if t is not None and t != tokenizer.eos_token_id}
        self._banned = torch.tensor(sorted(i for i in banned if 0 <= i < vocab_rows), dtype=torch.long)
        self.eos_ids = self._eos_ids()
        self.logits_processors: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = []
        """Extra ``(input_ids, scores) -> scores`` hooks (transformers LogitsProcessor compatible),
        applied after the model's distribution is recorded: for constrained decoding and tests."""

    @staticmethod
    def _read_json(path: Path) -> dict:
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            return {}

    def _eos_ids(self) -> set[int]:
        ids = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.config.text_config, "eos_token_id", None),
                       self._read_json(self.model_dir / "generation_config.json").get("eos_token_id")):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, list):
                ids.update(int(i) for i in source)
        return ids

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def load(cls, model_dir: Path | str, device: str = "cpu", dtype: str | torch.dtype | None = None,
             quantization: str | None = None) -> "LlavaPipeline":
        """Load a transformers-layout LLaVA folder (safetensors only) after checking it fits.

        Precision and quantization come from the arguments, else ``RS_LVLM_DTYPE`` /
        ``RS_LVLM_QUANTIZE``, else ``precision`` / ``quantization`` in the ``rs_lvlm`` section of
        config.json, else fp32 on CPU / bf16 on CUDA without quantization.
        """
        from transformers import LlavaConfig, LlavaForConditionalGeneration
        from transformers.utils import logging as hf_logging

        model_dir = Path(model_dir)
        raw = cls._read_json(model_dir / "config.json")
        if raw.get("model_type") != "llava":
            raise EngineError(BAD_CHECKPOINT, f"{model_dir / 'config.json'} is not a LLaVA config (model_type "
                                              f"{raw.get('model_type')!r})")
        try:
            config = LlavaConfig.from_pretrained(str(model_dir), local_files_only=True)
        except Exception as exc:
            raise EngineError(BAD_CHECKPOINT,
                              f"{model_dir / 'config.json'} is not a valid LLaVA config: {exc}") from None
        options = raw.get("rs_lvlm") or {}
        if not safetensors_files(model_dir):
            raise EngineError(BAD_CHECKPOINT, f"{model_dir} has no .safetensors weights")
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).replace("torch.", "")
        torch_dtype = resolve_dtype(device, dtype or os.environ.get("RS_LVLM_DTYPE") or options.get("precision"))
        quant = resolve_quantization(device, quantization or os.environ.get("RS_LVLM_QUANTIZE")
                                     or options.get("quantization"))
        n_image = (int(config.vision_config.image_size) // int(config.vision_config.patch_size)) ** 2
        precision = quant or str(torch_dtype).replace("torch.", "")
        memory = check_fits(model_dir, device, precision, config.text_config.to_dict(), context_tokens=n_image + 512)
        direct_to_gpu = device == "cuda" and (quant is not None or _has_accelerate())
        if device == "cuda" and not direct_to_gpu:   # the weights pass through CPU memory on their way
            check_fits(model_dir, "cpu", precision)
        tokenizer = load_tokenizer(model_dir)

        kwargs: dict = {"config": config, "dtype": torch_dtype, "use_safetensors": True,
                        "local_files_only": True, "output_loading_info": True}
        if quant:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = (
                BitsAndBytesConfig(load_in_8bit=True) if quant == "8bit" else
                BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype))
        if direct_to_gpu:
            kwargs["device_map"] = {"": 0}  # straight to the GPU (needs accelerate), no copy in CPU memory
        hf_logging.disable_progress_bar()
        try:
            model, info = LlavaForConditionalGeneration.from_pretrained(str(model_dir), **kwargs)
        except EngineError:
            raise
        except torch.OutOfMemoryError as exc:
            raise EngineError(MODEL_TOO_LARGE, f"out of memory while loading {model_dir} on {device} "
                                               f"(estimate before loading: {memory}): {exc}") from None
        except Exception as exc:
            raise EngineError(BAD_CHECKPOINT, f"could not load the LLaVA checkpoint {model_dir}: {exc}") from None
        problems = {k: v for k, v in (info or {}).items() if k in ("missing_keys", "mismatched_keys") and v}
        if problems:
            detail = "; ".join(f"{k}: {', '.join(map(str, sorted(v)[:5]))}{' ...' if len(v) > 5 else ''}"
                               for k, v in problems.items())
            raise EngineError(BAD_CHECKPOINT, f"{model_dir} does not match its config ({detail})")
        if "device_map" not in kwargs:
            model.to(device)            # CUDA without accelerate: loaded in CPU memory first, then moved
        model.eval()
        return cls(model, tokenizer, config, device, model_dir, torch_dtype, quant, memory)

    # -- description -------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self._image_size

    def info(self) -> dict:
        inner = getattr(self.model, "model", self.model)

        def count(module) -> int:
            return sum(p.numel() for p in module.parameters()) if module is not None else 0

        parts = {"vision_tower": count(getattr(inner, "vision_tower", None)),
                 "projector": count(getattr(inner, "multi_modal_projector", None)),
                 "language_model": count(getattr(inner, "language_model", None)) + count(
                     getattr(self.model, "lm_head", None))}
        total = count(self.model)
        return {"name": self.name, "path": str(self.model_dir), "backend": self.backend,
                "architecture": "LlavaForConditionalGeneration", "parameters": {"total": total, **parts},
                "parameters_total": total, "image_size": self.image_size, "image_tokens": self.image_tokens,
                "dtype": str(self.dtype).replace("torch.", ""), "quantization": self.quantization,
                "conversation": "vicuna_v1", "use_sam": False, "use_experts": False, "knowledge_entries": 0,
                "retrieval": "none: this backend has no knowledge base, 'retrieved' is always []",
                "converted_from": self.options.get("converted_from"), "memory": self.memory}

    # -- prompt ------------------------------------------------------------------------------
    def prompt_ids(self, instruction: str) -> list[int]:
        """Token ids of the Vicuna v1 prompt with the image token repeated once per image patch."""
        start, end = self.image_wrap
        before, after = vicuna_v1_prompt(instruction, f"{start}{IMAGE_TOKEN}{end}").split(IMAGE_TOKEN, 1)
        ids = []
        if self.tokenizer.bos_token_id is not None:
            ids.append(int(self.tokenizer.bos_token_id))
        ids += self.tokenizer.encode(before, add_special_tokens=False)
        ids += [self.image_token_id] * self.image_tokens
        ids += self.tokenizer.encode(after, add_special_tokens=False)
        return ids

    # -- answering ---------------------------------------------------------------------------
    def _choose(self, scores: torch.Tensor, do_sample: bool, temperature: float, top_p: float) -> torch.Tensor:
        if not do_sample or temperature <= 0:
            return scores.argmax(dim=-1)
        probs = torch.softmax(scores / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            keep = sorted_p.cumsum(dim=-1) - sorted_p < top_p   # always keeps the top token
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        return torch.multinomial(probs / probs.sum(dim=-1, keepdim=True), 1).squeeze(-1)

    @torch.inference_mode()
    def answer(self, images: list[np.ndarray], task: str, question: str | None, *, max_new_tokens: int = 64,
               on_token: Callable[[int, str], None] | None = None, should_stop: Callable[[], bool] | None = None,
               do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0) -> list[Answer]:
        """Answer the same task/question for each image (one batch; the prompts are identical)."""
        t0 = time.perf_counter()
        instruction, asked = build_instruction(task, question)
        ids = self.prompt_ids(instruction)
        n = len(images)
        device = self.model.device if self.device == "cuda" else torch.device(self.device)
        input_ids = torch.tensor([ids] * n, dtype=torch.long, device=device)
        pixel_values = preprocess_images(images, self.image_size, self.image_mean, self.image_std,
                                         self.rescale).to(device=device, dtype=self.dtype)
        generated: list[list[int]] = [[] for _ in range(n)]
        logps: list[list[float]] = [[] for _ in range(n)]
        ends: list[list[int]] = [[] for _ in range(n)]
        texts = [""] * n
        emitted = [0] * n
        reasons: list[str | None] = [None] * n
        banned = self._banned.to(device)
        first_token_at: list[float] = []
        t_prep = time.perf_counter()

        if should_stop is not None and should_stop():
            reasons = ["cancelled"] * n
        else:
            out = self.model(input_ids=input_ids, pixel_values=pixel_values, use_cache=True, logits_to_keep=1)
            past, logits = out.past_key_values, out.logits[:, -1, :]
            history = input_ids
            for step in range(max_new_tokens):
                scores = logits.float()
                if banned.numel():
                    scores[:, banned] = float("-inf")
                model_logp = torch.log_softmax(scores, dim=-1)
                for proc in self.logits_processors:
                    scores = proc(history, scores)
                tokens = self._choose(scores, do_sample, temperature, top_p)
                picked = model_logp.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
                for i in range(n):
                    if reasons[i] is not None:
                        continue
                    tok = int(tokens[i])
                    if tok in self.eos_ids:
                        reasons[i] = "eos"
                        continue
                    generated[i].append(tok)
                    logps[i].append(max(float(picked[i]), -1e4))
                    text = self.tokenizer.decode(generated[i], skip_special_tokens=True)
                    ends[i].append(len(text))
                    cut = min((text.find(s) for s in STOP_STRINGS if s in text), default=-1)
                    if cut >= 0:
                        text, reasons[i] = text[:cut], "stop_string"
                    texts[i] = text
                    ready = _streamable(text) if reasons[i] is None else len(text)
                    if ready > emitted[i]:
                        if not first_token_at:
                            first_token_at.append(time.perf_counter())
                        if on_token is not None:
                            on_token(i, text[emitted[i]:ready])
                        emitted[i] = ready
                if all(r is not None for r in reasons):
                    break
                if should_stop is not None and should_stop():
                    reasons = [r or "cancelled" for r in reasons]
                    break
                if step == max_new_tokens - 1:
                    break
                feed = tokens.clone()
                history = torch.cat([history, feed.unsqueeze(1)], dim=1)
                out = self.model(input_ids=feed.unsqueeze(1), past_key_values=past, use_cache=True)
                past, logits = out.past_key_values, out.logits[:, -1, :]
            reasons = [r or "max_tokens" for r in reasons]
            for i in range(n):           # what was held back (a stop-string prefix, partial UTF-8)
                if len(texts[i]) > emitted[i] and on_token is not None:
                    on_token(i, texts[i][emitted[i]:])
        t_gen = time.perf_counter()

        answers = []
        for i in range(n):
            raw = texts[i]
            text = raw.strip()
            boxes = parse_boxes(text) if task == "ground" or "{<" in text else []
            scores = box_scores(raw, ends[i], logps[i], boxes)
            answers.append(Answer(text=text, boxes=boxes, box_scores=scores, retrieved=[],
                                  stopped_reason=reasons[i], prompt_question=asked))
        n_tokens = sum(len(g) for g in generated)
        timing = {"prepare_s": t_prep - t0, "generate_s": t_gen - t_prep, "new_tokens": n_tokens,
                  "tokens_per_s": n_tokens / max(t_gen - t_prep, 1e-9)}
        if first_token_at:  # numbers only: the service rounds every timing value
            timing["first_token_s"] = first_token_at[0] - t0
        for a in answers:
            a.timing = dict(timing)
        return answers
