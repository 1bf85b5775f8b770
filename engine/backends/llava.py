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
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from engine.errors import BAD_CHECKPOINT, BAD_REQUEST, EngineError
from engine.tasks import split_task_token
from engine.grounding import parse_boxes

from engine.model.image_processing import CLIP_MEAN, CLIP_STD, preprocess_images

from .base import Answer
from .decoding import box_scores, decode, text_score
from .memory import MODEL_TOO_LARGE, check_fits, resolve_dtype, resolve_quantization, safetensors_files
from .tokenizer_files import IMAGE_TOKEN, load_tokenizer

log = logging.getLogger("engine.backends.llava")

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


def vicuna_v1_prompt(instruction: str, image_placeholder: str = IMAGE_TOKEN,
                     history: Sequence[dict] | None = None) -> str:
    """``SYSTEM USER: <image>\\n{instruction} ASSISTANT:`` (separators " " and ``</s>``).

    Earlier turns (``{"question", "answer"}``) come first, the image in the first user turn, as
    LLaVA-1.5 / GeoChat write a multi-turn conversation.
    """
    turns = [(str(t.get("question", "")), str(t.get("answer", ""))) for t in (history or [])]
    if not turns:
        return f"{VICUNA_V1_SYSTEM} USER: {image_placeholder}\n{instruction} ASSISTANT:"
    text = f"{VICUNA_V1_SYSTEM} USER: {image_placeholder}\n{turns[0][0]} ASSISTANT: {turns[0][1]}</s>"
    for question, answer in turns[1:]:
        text += f"USER: {question} ASSISTANT: {answer}</s>"
    return text + f"USER: {instruction} ASSISTANT:"


# -- the pipeline ----------------------------------------------------------------------------
FUSED_COPY_LIMIT_BYTES = 2 * 1024 ** 3
"""Language models with more weight bytes than this decode on their own modules
(fast_decode.ModuleLayer) instead of fused copies: a 7B's copy would be 9 GB more in bfloat16."""


def _weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _has_accelerate() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


class LlavaPipeline:
    """A loaded LlavaForConditionalGeneration with its tokenizer and image preprocessing."""

    backend = "llava"

    def __init__(self, model, tokenizer, config, device: str, model_dir: Path, dtype: torch.dtype,
                 quantization: str | None = None, memory: dict | None = None, int8: bool = False) -> None:
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
        self.int8 = int8                   # weight-only int8 language model on the CPU (int8_cpu.py)
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
        self.fused_decode = quantization is None
        self._decode_on_own_modules = _weight_bytes(self.model.model.language_model) > FUSED_COPY_LIMIT_BYTES
        """Decode steps on fused weights and a static KV cache (engine.model.fast_decode); the
        prefill stays transformers'. int8 models run the same step on their own int8 modules
        (int8_cpu.Int8FusedDecoder); off for bitsandbytes models (their matrices are packed)."""
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

        A LoRA adapter folder (:mod:`engine.backends.lora_adapter`) loads its base, merges the
        adapter into it and takes the adapter's projector and name.
        """
        from transformers import LlavaConfig, LlavaForConditionalGeneration
        from transformers.utils import logging as hf_logging

        model_dir = Path(model_dir)
        raw = cls._read_json(model_dir / "config.json")
        adapter_dir, manifest = None, None
        if "rs_lvlm_adapter" in raw:
            from .lora_adapter import adapter_manifest, resolve_base

            manifest = adapter_manifest(raw)
            adapter_dir, model_dir = model_dir, resolve_base(model_dir, manifest)
            if quantization or os.environ.get("RS_LVLM_QUANTIZE"):
                raise EngineError(BAD_REQUEST, f"{adapter_dir} is a LoRA adapter, merged into its base's weights "
                                               f"when loaded: 8bit/4bit quantization cannot take the merge; load it "
                                               f"in bfloat16, or fine-tune with save 'merged' and quantize that")
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
        requested = dtype or os.environ.get("RS_LVLM_DTYPE") or options.get("precision")
        int8 = str(requested or "").lower() == "int8"
        if int8 and device != "cpu":
            raise EngineError(BAD_REQUEST, "int8 precision is for the CPU; on CUDA use bfloat16 or 8bit/4bit "
                                           "quantization (RS_LVLM_QUANTIZE, bitsandbytes)")
        # int8: loaded in bfloat16 (the peak) and converted layer by layer (int8_cpu.py).
        torch_dtype = torch.bfloat16 if int8 else resolve_dtype(device, requested)
        quant = resolve_quantization(device, quantization or os.environ.get("RS_LVLM_QUANTIZE")
                                     or options.get("quantization"))
        n_image = (int(config.vision_config.image_size) // int(config.vision_config.patch_size)) ** 2
        precision = quant or ("int8" if int8 else str(torch_dtype).replace("torch.", ""))
        memory = check_fits(model_dir, device, precision, config.text_config.to_dict(), context_tokens=n_image + 512)
        if int8:   # the bfloat16 copy is the peak while loading
            memory["load_peak"] = check_fits(model_dir, device, "bfloat16")
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
        if adapter_dir is not None:
            from .lora_adapter import apply_adapter

            model = apply_adapter(model, adapter_dir)
        if int8:
            from .int8_cpu import quantize_language_model_int8

            model = quantize_language_model_int8(model)
            torch_dtype = torch.float32  # what the activations (and pixel values) are in
        model.eval()
        pipeline = cls(model, tokenizer, config, device, model_dir, torch_dtype, quant, memory, int8=int8)
        if adapter_dir is not None:
            from .lora_adapter import check_base_unchanged

            adapter_options = cls._read_json(adapter_dir / "config.json").get("rs_lvlm") or {}
            pipeline.name = adapter_options.get("name") or adapter_dir.name
            pipeline.options.update(adapter_options, adapter={"path": str(adapter_dir), "base": str(model_dir)})
            pipeline.model_dir = adapter_dir
            warning = check_base_unchanged(adapter_dir, manifest, model_dir)
            if warning:
                log.warning("%s", warning)
        return pipeline

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
                "dtype": "int8" if self.int8 else str(self.dtype).replace("torch.", ""),
                "quantization": self.quantization, "fused_decode": self.fused_decode,
                "conversation": "vicuna_v1", "use_sam": False, "use_experts": False, "knowledge_entries": 0,
                "retrieval": "none: this backend has no knowledge base, 'retrieved' is always []",
                "converted_from": self.options.get("converted_from"), "adapter": self.options.get("adapter"),
                "memory": self.memory}

    # -- prompt ------------------------------------------------------------------------------
    def prompt_ids(self, instruction: str, history: Sequence[dict] | None = None) -> list[int]:
        """Token ids of the Vicuna v1 prompt with the image token repeated once per image patch."""
        start, end = self.image_wrap
        before, after = vicuna_v1_prompt(instruction, f"{start}{IMAGE_TOKEN}{end}", history).split(IMAGE_TOKEN, 1)
        ids = []
        if self.tokenizer.bos_token_id is not None:
            ids.append(int(self.tokenizer.bos_token_id))
        ids += self.tokenizer.encode(before, add_special_tokens=False)
        ids += [self.image_token_id] * self.image_tokens
        ids += self.tokenizer.encode(after, add_special_tokens=False)
        return ids

    def _fused_decoder(self, batch: int, capacity: int):
        from engine.model.fast_decode import FusedDecoder, ModuleLayer

        if self.int8:
            from .int8_cpu import Int8FusedDecoder

            return Int8FusedDecoder(self.model, batch, capacity)
        lm = self.model.model.language_model
        weights = None
        if self._decode_on_own_modules:
            weights = ([ModuleLayer(layer) for layer in lm.layers], self.model.lm_head)
        return FusedDecoder(self.model, batch, capacity, language_model=lm, lm_head=self.model.lm_head,
                            weights=weights)

    # -- answering ---------------------------------------------------------------------------
    @torch.inference_mode()
    def answer(self, images: list[np.ndarray], task: str, question: str | None, *, max_new_tokens: int = 64,
               on_token: Callable[[int, str], None] | None = None, should_stop: Callable[[], bool] | None = None,
               do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
               history: list[dict] | None = None) -> list[Answer]:
        """Answer the same task/question for each image (one batch; the prompts are identical).

        ``history`` (earlier ``{"question", "answer"}`` turns on the same region) is sent as the
        earlier turns of the Vicuna conversation, the image in the first one.
        """
        t0 = time.perf_counter()
        instruction, asked = build_instruction(task, question)
        ids = self.prompt_ids(instruction, history)
        n = len(images)
        device = self.model.device if self.device == "cuda" else torch.device(self.device)
        input_ids = torch.tensor([ids] * n, dtype=torch.long, device=device)
        pixel_values = preprocess_images(images, self.image_size, self.image_mean, self.image_std,
                                         self.rescale).to(device=device, dtype=self.dtype)
        state: dict = {}
        first_token_at: list[float] = []
        t_prep = time.perf_counter()

        def prefill() -> torch.Tensor:
            out = self.model(input_ids=input_ids, pixel_values=pixel_values, use_cache=True, logits_to_keep=1)
            state["past"], state["mask"] = out.past_key_values, torch.ones_like(input_ids)
            if self.fused_decode and max_new_tokens > 1:
                state["fused"] = self._fused_decoder(n, input_ids.shape[1] + max_new_tokens)
                state["fused"].load_cache(out.past_key_values)
                state["past"] = None
            return out.logits[:, -1, :]

        def step(tokens: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
            state["mask"] = torch.cat([state["mask"], alive.long()[:, None]], dim=1)
            if "fused" in state:
                return state["fused"].step(tokens, state["mask"])
            out = self.model(input_ids=tokens.unsqueeze(1), past_key_values=state["past"], use_cache=True,
                             attention_mask=state["mask"])
            state["past"] = out.past_key_values
            return out.logits[:, -1, :]

        def stream(row: int, piece: str) -> None:
            if piece and not first_token_at:
                first_token_at.append(time.perf_counter())
            if piece and on_token is not None:
                on_token(row, piece)

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        result = decode(prefill, step, n, max_new_tokens=max_new_tokens, eos_ids=sorted(self.eos_ids), pad_id=int(pad),
                        tokenizer=self.tokenizer, stop_strings=STOP_STRINGS, on_token=stream,
                        should_stop=should_stop, do_sample=do_sample, temperature=temperature, top_p=top_p,
                        banned_ids=self._banned, logits_processors=self.logits_processors, prompt_ids=input_ids)
        t_gen = time.perf_counter()

        answers = []
        for i in range(n):
            raw = result.texts[i]
            text = raw.strip()
            boxes = parse_boxes(text) if task == "ground" or "{<" in text else []
            scores = box_scores(raw, result.token_ends[i], result.logprobs[i], boxes)
            answers.append(Answer(text=text, boxes=boxes, box_scores=scores, retrieved=[],
                                  stopped_reason=result.stopped_reasons[i], prompt_question=asked,
                                  text_score=text_score(result.logprobs[i])))
        n_tokens = sum(len([t for t in seq if t not in self.eos_ids]) for seq in result.sequences)
        timing = {"prepare_s": t_prep - t0, "generate_s": t_gen - t_prep, "new_tokens": n_tokens,
                  "tokens_per_s": n_tokens / max(t_gen - t_prep, 1e-9)}
        if first_token_at:  # numbers only: the service rounds every timing value
            timing["first_token_s"] = first_token_at[0] - t0
        for a in answers:
            a.timing = dict(timing)
        return answers
