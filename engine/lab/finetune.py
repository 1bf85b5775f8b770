"""LoRA fine-tuning of a LLaVA-family folder (GeoChat, LLaVA-1.5, after ``engine convert``) on a
weighted mix of data sets in published formats: ``python -m engine.lab.finetune --config CFG``.

Why this shape: users want to adapt a GeoChat-class model to their own labelled imagery on one
GPU (or a CPU for a smoke run) and then check the gain with the frozen evaluator.  So the
language model gets LoRA adapters (peft; the vision tower frozen, or LoRA too), the projector is
trained in full, the data come from :class:`engine.data.mixed_stream.MixedStream` asking the very
questions :mod:`engine.lab.dataset_eval` asks a LLaVA folder, and the result is saved as a plain
transformers LLaVA folder in safetensors (LoRA merged) that every engine command loads.

Config (JSON): ``base`` (LLaVA folder), ``data`` (``FORMAT:PATH`` strings or ``{"dataset",
"weight", "split"}``), ``out``; optional ``steps``, ``batch_size``, ``lr``, ``warmup_steps``,
``seed``, ``device``, ``precision``, ``gradient_checkpointing``, ``log_every``, ``save_every``,
``lora`` (``r``, ``alpha``, ``dropout``, ``target_modules``), ``vision`` (``frozen`` | ``lora``),
``train_projector``, ``save`` (``merged`` | ``adapter`` | ``both``: ``out/final/`` with the LoRA
merged, and / or ``out/adapter/``, the peft adapter + projector that the engine applies to the
base when it loads the folder, :mod:`engine.backends.lora_adapter`), ``seed_components``
(``true`` or RS-LVLM config overrides: the seed's SAM, level projectors and semantic experts are
built around the LLaVA base and trained with the LoRA LM, :mod:`engine.lab.seed_components`).
``python -m engine train --config CFG`` runs this module when CFG names a ``base``.  A ``base``
that is one of our own RS-LVLM checkpoints (``config.json`` model_type ``rs_lvlm``) is fine-tuned
in full instead (``train_detector`` to train its detector too), :mod:`engine.lab.finetune_own`,
by the same loop.  Resumable: ``out/checkpoint/`` holds the adapter and projector weights
(safetensors) and the step; a rerun continues from there at the next sample of the mix (AdamW's
moments restart: no pickled optimizer state is written).  The loss log is ``out/loss_log.jsonl``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

log = logging.getLogger("engine.lab.finetune")

__all__ = ["DEFAULTS", "load_config", "encode_sample", "collate", "lora_parameters", "finetune", "train_loop",
           "memory_estimate", "main"]

DEFAULTS: dict[str, Any] = {
    "steps": 200, "batch_size": 4, "lr": 2e-4, "warmup_steps": 10, "seed": 0, "device": "auto",
    "precision": "auto", "gradient_checkpointing": False, "log_every": 10, "save_every": 100,
    "lora": {"r": 8, "alpha": 16, "dropout": 0.05,
             "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
    "vision": "frozen", "train_projector": True, "save": "merged", "seed_components": False,
    "train_detector": False,
}
SAVE_CHOICES = ("merged", "adapter", "both")


def load_config(path: str | Path | dict) -> dict:
    """The config with defaults filled in; ``base``, ``data`` and ``out`` are required.  An RS-LVLM
    ``base`` gets the full fine-tune's checks and defaults (:func:`engine.lab.finetune_own.check_config`)."""
    from engine.lab.finetune_own import check_config, is_own_checkpoint

    cfg = dict(path) if isinstance(path, dict) else json.loads(Path(path).read_text(encoding="utf-8"))
    missing = [k for k in ("base", "data", "out") if k not in cfg]
    if missing:
        raise ValueError(f"fine-tuning config lacks {', '.join(missing)}")
    out = {**DEFAULTS, **cfg}
    out["lora"] = {**DEFAULTS["lora"], **cfg.get("lora", {})}
    if is_own_checkpoint(out["base"]):
        return check_config(cfg, out)
    if out["train_detector"]:
        raise ValueError("train_detector applies to RS-LVLM checkpoints with a detector, not to LLaVA bases")
    if out["vision"] not in ("frozen", "lora"):
        raise ValueError(f"vision must be 'frozen' or 'lora', got {out['vision']!r}")
    if out["save"] not in SAVE_CHOICES:
        raise ValueError(f"save must be one of {', '.join(SAVE_CHOICES)}, got {out['save']!r}")
    if not isinstance(out["seed_components"], (bool, dict)):
        raise ValueError("seed_components must be true, false or an object of RS-LVLM config overrides")
    if out["seed_components"] is not False:
        clash = [f"{k} {out[k]!r}" for k, ok in (("save", "merged"), ("vision", "frozen")) if out[k] != ok]
        clash += ["gradient_checkpointing"] if out["gradient_checkpointing"] else []
        if clash:
            raise ValueError("seed_components trains into a full RS-LVLM checkpoint (save 'merged', vision "
                             f"'frozen', no gradient checkpointing); this config has {', '.join(clash)}")
    return out


def encode_sample(pipeline: Any, sample: Any) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one sample in the backend's own Vicuna prompt: the loss is on the
    answer (written after ``ASSISTANT:`` with its leading space, as generated) and ``</s>``."""
    from engine.backends.llava import build_instruction

    instruction, _ = build_instruction(sample.task, sample.question)
    prompt = pipeline.prompt_ids(instruction)
    eos = pipeline.tokenizer.eos_token_id
    target = pipeline.tokenizer.encode(" " + sample.answer.strip(), add_special_tokens=False) + [eos]
    return prompt + target, [-100] * len(prompt) + target


def collate(pipeline: Any, samples: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Right-padded ids, mask and labels (-100 on prompt and padding) and the pixel values."""
    from engine.model.image_processing import preprocess_images

    encoded = [encode_sample(pipeline, s) for s in samples]
    length = max(len(ids) for ids, _ in encoded)
    pad = pipeline.tokenizer.pad_token_id if pipeline.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(samples), length), pad, dtype=torch.long)
    labels = torch.full((len(samples), length), -100, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, (seq, lab) in enumerate(encoded):
        ids[row, :len(seq)], labels[row, :len(lab)], mask[row, :len(seq)] = torch.tensor(seq), torch.tensor(lab), 1
    pixels = preprocess_images([s.image for s in samples], pipeline.image_size, pipeline.image_mean,
                               pipeline.image_std, pipeline.rescale).to(pipeline.dtype)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


def _target_regex(names: Sequence[str], vision: str) -> str:
    parts = "language_model|vision_tower" if vision == "lora" else "language_model"
    return rf".*({parts}).*\.({'|'.join(map(str, names))})"


def lora_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps: every trained tensor (the LoRA matrices, the projector, and with
    ``seed_components`` the SAM, level projectors and experts; for an RS-LVLM base everything
    but a frozen detector); the frozen base is not repeated."""
    return {k: v.detach().cpu().contiguous() for k, v in model.named_parameters() if v.requires_grad}


def _lr(step: int, cfg: dict) -> float:
    warm = max(int(cfg["warmup_steps"]), 1)
    if step < warm:
        return cfg["lr"] * (step + 1) / warm
    t = (step - warm) / max(cfg["steps"] - warm, 1)
    return cfg["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def _save_checkpoint(model: torch.nn.Module, folder: Path, step: int, state: Any = lora_parameters) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "trainable.safetensors.partial"
    save_file(state(model), str(tmp))
    tmp.replace(folder / "trainable.safetensors")                    # never a half-written file
    (folder / "state.json").write_text(json.dumps({"step": step}))


def _resume(model: torch.nn.Module, folder: Path) -> int:
    from safetensors.torch import load_file

    state = folder / "state.json"
    if not state.is_file():
        return 0
    weights = load_file(str(folder / "trainable.safetensors"))
    params = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v.to(params[k].dtype))
    return int(json.loads(state.read_text())["step"])


def finetune(config: str | Path | dict, progress: bool = True) -> dict:
    """Run the config; returns a summary (steps, first and last losses, output folder)."""
    cfg = load_config(config)
    from engine.lab.finetune_own import finetune_own, is_own_checkpoint

    if is_own_checkpoint(cfg["base"]):
        return finetune_own(cfg, progress)
    if cfg["seed_components"] is not False:
        from engine.lab.seed_components import finetune_seed_components

        return finetune_seed_components(cfg, progress)
    from peft import LoraConfig, get_peft_model

    from engine.backends.llava import LlavaPipeline
    from engine.data.mixed_stream import MixedStream, parse_sources
    from engine.device import resolve_device

    out = Path(cfg["out"])
    device = resolve_device(cfg["device"])
    torch.manual_seed(int(cfg["seed"]))
    precision = None if cfg["precision"] == "auto" else cfg["precision"]
    pipeline = LlavaPipeline.load(cfg["base"], device=device, dtype=precision)
    lora = cfg["lora"]
    model = get_peft_model(pipeline.model, LoraConfig(
        r=int(lora["r"]), lora_alpha=int(lora["alpha"]), lora_dropout=float(lora["dropout"]),
        target_modules=_target_regex(lora["target_modules"], cfg["vision"]), bias="none"))
    for name, p in model.named_parameters():
        if "multi_modal_projector" in name:
            p.requires_grad_(bool(cfg["train_projector"]))
    if cfg["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    stream = MixedStream(parse_sources(cfg["data"]), int(cfg["seed"]), pipeline.image_size, family="llava")

    def batch_of(samples: list) -> dict[str, torch.Tensor]:
        return {k: v.to(pipeline.model.device) for k, v in collate(pipeline, samples).items()}

    summary = train_loop(model, cfg, stream, batch_of, progress)
    saved = {}
    if cfg["save"] in ("adapter", "both"):
        saved["adapter"] = str(_save_adapter(model, pipeline, cfg, out / "adapter"))
    if cfg["save"] in ("merged", "both"):
        saved["merged"] = str(_save_merged(model, pipeline, cfg, out / "final"))
    return {**summary, "model": saved.get("merged", saved.get("adapter")), "saved": saved}


def train_loop(model: torch.nn.Module, cfg: dict, stream: Any, batch_of: Any, progress: bool = True, *,
               state: Any = lora_parameters, autocast: Any = None, keep_eval: Sequence[torch.nn.Module] = ()) -> dict:
    """AdamW over the model's trainable tensors for ``cfg["steps"]`` steps of ``batch_size``
    samples from ``stream`` (``batch_of(samples)`` -> the model's keyword arguments, its output
    has ``.loss``), resuming from and saving to ``out/checkpoint/`` (``state(model)``: the tensors
    kept), logging to ``out/loss_log.jsonl``.  The forward runs inside ``autocast`` (a context
    manager, e.g. bfloat16 autocast) and the modules of ``keep_eval`` (a frozen detector) stay in
    eval mode.  Returns the steps, where it started and the first and last losses."""
    from tqdm import tqdm

    out = Path(cfg["out"])
    start = _resume(model, out / "checkpoint")
    samples = stream.samples(start=start * int(cfg["batch_size"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg["lr"], weight_decay=0.0)
    out.mkdir(parents=True, exist_ok=True)
    losses: list[float] = []
    model.train()
    for module in keep_eval:
        module.eval()
    bar = tqdm(total=cfg["steps"], initial=start, desc="finetune", file=sys.stderr, disable=not progress)
    with open(out / "loss_log.jsonl", "a", encoding="utf-8") as logf:
        for step in range(start, int(cfg["steps"])):
            batch = batch_of([next(samples) for _ in range(int(cfg["batch_size"]))])
            for group in optimizer.param_groups:
                group["lr"] = _lr(step, cfg)
            with autocast if autocast is not None else contextlib.nullcontext():
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if (step + 1) % int(cfg["log_every"]) == 0 or step + 1 == cfg["steps"]:
                logf.write(json.dumps({"step": step + 1, "loss": round(losses[-1], 5), "lr": _lr(step, cfg)}) + "\n")
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if (step + 1) % int(cfg["save_every"]) == 0:
                _save_checkpoint(model, out / "checkpoint", step + 1, state)
            bar.update(1)
    bar.close()
    _save_checkpoint(model, out / "checkpoint", int(cfg["steps"]), state)
    model.eval()
    return {"steps": int(cfg["steps"]), "started_at": start, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "trainable_parameters": sum(p.numel() for p in trainable)}


def _save_adapter(model: Any, pipeline: Any, cfg: dict, folder: Path) -> Path:
    """The LoRA as a peft adapter folder plus the projector and a config.json naming the base:
    what :mod:`engine.backends.lora_adapter` applies to the base when the engine loads it."""
    from engine.backends.lora_adapter import write_adapter

    projector = {k: v.detach().cpu().contiguous() for k, v in
                 model.get_base_model().model.multi_modal_projector.state_dict().items()}
    return write_adapter(model, projector, cfg["base"], f"{pipeline.name}-finetuned", folder)


def _save_merged(model: Any, pipeline: Any, cfg: dict, folder: Path) -> Path:
    """LoRA merged into the weights, saved as a transformers LLaVA folder the engine loads."""
    merged = model.merge_and_unload()
    merged.eval()
    options = dict(getattr(merged.config, "rs_lvlm", None) or {})
    options.update({"name": f"{pipeline.name}-finetuned", "finetuned_from": str(cfg["base"])})
    merged.config.rs_lvlm = options
    if folder.exists():
        shutil.rmtree(folder)
    merged.save_pretrained(str(folder))
    pipeline.tokenizer.save_pretrained(str(folder))
    for extra in ("preprocessor_config.json", "generation_config.json"):
        if (Path(cfg["base"]) / extra).is_file() and not (folder / extra).is_file():
            shutil.copy(Path(cfg["base"]) / extra, folder / extra)
    return folder


def _linear_shapes(text: dict) -> dict[str, tuple[int, int]]:
    h, i = int(text["hidden_size"]), int(text["intermediate_size"])
    heads = int(text["num_attention_heads"])
    kv = int(text.get("num_key_value_heads") or heads) * (h // heads)
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def memory_estimate(llava_config: dict, cfg: dict, text_tokens: int = 128) -> dict:
    """GiB a fine-tune needs, from the LLaVA config.json and the fine-tuning config (bf16 on CUDA).

    Weights: every parameter in 2 bytes (4 on fp32).  Trainable (LoRA matrices of the chosen
    modules, r x (in + out) each, plus the projector): weight, gradient and two AdamW moments.
    Activations per sample: with gradient checkpointing one hidden state per layer is kept and one
    layer is recomputed at a time; without it every layer keeps ~ (16 h + 3 i + heads x seq) values
    per token (eager attention); plus fp32 logits over the sequence for the loss.
    """
    text, vision = llava_config["text_config"], llava_config["vision_config"]
    h, layers, vocab = int(text["hidden_size"]), int(text["num_hidden_layers"]), int(text["vocab_size"])
    shapes = _linear_shapes(text)
    lm = layers * sum(a * b for a, b in shapes.values()) + 2 * vocab * h
    vh, vi = int(vision["hidden_size"]), int(vision["intermediate_size"])
    tower = int(vision["num_hidden_layers"]) * (4 * vh * vh + 2 * vh * vi)
    projector = vh * h + h * h
    lora = cfg.get("lora", DEFAULTS["lora"])
    lora_params = layers * sum(int(lora["r"]) * (a + b) for name, (a, b) in shapes.items()
                               if name in lora["target_modules"])
    trainable = lora_params + (projector if cfg.get("train_projector", True) else 0)
    elem = 4 if cfg.get("precision") in ("float32", "fp32") else 2
    tokens = (int(vision["image_size"]) // int(vision["patch_size"])) ** 2 + text_tokens
    heads, inter = int(text["num_attention_heads"]), int(text["intermediate_size"])
    per_layer = tokens * (16 * h + 3 * inter + heads * tokens) * elem
    if cfg.get("gradient_checkpointing"):
        activations = layers * tokens * h * elem + per_layer
    else:
        activations = layers * per_layer
    activations += tokens * vocab * 4
    gib = 1024 ** 3
    batch = int(cfg.get("batch_size", DEFAULTS["batch_size"]))
    out = {"parameters": lm + tower + projector, "trainable_parameters": trainable, "sequence_tokens": tokens,
           "weights_gib": (lm + tower + projector) * elem / gib, "optimizer_gib": trainable * (elem * 2 + 8) / gib,
           "activations_per_sample_gib": activations / gib}
    out["total_gib"] = out["weights_gib"] + out["optimizer_gib"] + batch * out["activations_per_sample_gib"]
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.lab.finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--estimate", action="store_true", help="print the memory estimate and stop")
    parser.add_argument("--out", type=Path, help="run folder (overrides the config's out)")
    args = parser.parse_args(argv)
    raw = json.loads(args.config.read_text(encoding="utf-8"))
    if args.out is not None:
        raw["out"] = str(args.out)
    cfg = load_config(raw)
    if args.estimate:
        from engine.lab.finetune_own import is_own_checkpoint

        if is_own_checkpoint(cfg["base"]):
            parser.error("--estimate counts the LoRA fine-tune of a LLaVA base, not the full fine-tune of an "
                         "RS-LVLM checkpoint")
        print(json.dumps(memory_estimate(json.loads((Path(cfg["base"]) / "config.json").read_text()), cfg)))
        return 0
    print(json.dumps(finetune(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
