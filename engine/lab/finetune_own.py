"""Full fine-tuning of one of our own RS-LVLM checkpoints on a weighted mix of published data sets.

``python -m engine train --config CFG`` runs this when CFG's ``base`` is an RS-LVLM checkpoint
folder (its ``config.json`` has ``model_type`` ``rs_lvlm``: ``resources/model``, the output of
``engine train``, or an earlier fine-tune), see :mod:`engine.lab.finetune` for the LLaVA bases.

Why a full fine-tune and not LoRA: our checkpoints are small (the embedded one has ~20 M
parameters), so every tensor fits an optimizer on a CPU or one GPU, and the parts that carry the
seed paper's method (SAM, level projectors, semantic experts) are full tensors anyway.  So the
language model, SAM, the level projectors, the experts and the vision levels all train; the
object-centric model's detector stays frozen (eval-mode normalisation, no gradient: the object
tokens in training are the detections seen at inference) unless ``"train_detector": true``,
which trains it with dense detection targets built from the data's boxes.

Data: :class:`engine.data.mixed_stream.MixedStream` (family ``rs_lvlm``, the evaluator's own
prompts) collated by the embedded training's :class:`engine.lab.batches.Collator` over the
checkpoint's tokenizer and knowledge index: grounding answers become reference slots
(``vehicle <obj0>``) whose boxes pick the detections, the question embeddings and retrieval
targets train SAM.  Each sample is first made to fit the Collator (:func:`training_sample`).

The loop is :func:`engine.lab.finetune.train_loop` (AdamW, warm-up + cosine, tqdm bar,
``out/loss_log.jsonl``, ``out/checkpoint/`` with the trained tensors in safetensors and the step
in ``state.json``), under bfloat16 autocast on CUDA with float32 weights.  The result is saved
with :func:`engine.model.checkpoint.save_checkpoint` as ``out/final/``, an RS-LVLM folder with the
base's tokenizer and knowledge index, named ``<base name>-finetuned``.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["is_own_checkpoint", "check_config", "detection_objects", "training_sample", "ignore_unannotated",
           "trained_state", "finetune_own"]

OWN_DEFAULTS: dict[str, Any] = {"lr": 1e-4}
"""Defaults that differ from the LoRA fine-tune's: a full fine-tune moves every weight, so a
tenth of the embedded training's peak learning rate."""
LORA_ONLY = ("lora", "vision", "gradient_checkpointing", "seed_components")
UNANNOTATED = 0.999
"""Heatmap value of an image without box annotations: not 1, so no centre is a positive, and
``(1 - 0.999) ** 4`` leaves its negatives ~1e-12 of their weight in the focal loss, so the image
neither teaches nor suppresses detections (a scene-folder airport is not an empty image)."""


def is_own_checkpoint(base: str | Path) -> bool:
    """Whether ``base`` is an RS-LVLM checkpoint folder (``config.json`` model_type ``rs_lvlm``)."""
    try:
        config = json.loads((Path(base) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "rs_lvlm"


def check_config(raw: dict, cfg: dict) -> dict:
    """The fine-tuning config (defaults filled) for an RS-LVLM base: LoRA-only keys refused."""
    from engine.lab.finetune import DEFAULTS

    given = [k for k in LORA_ONLY if k in raw and raw[k] != DEFAULTS[k]]
    if cfg["save"] != "merged":
        given.append(f"save {cfg['save']!r}")
    if given:
        raise ValueError(f"{cfg['base']} is an RS-LVLM checkpoint: it is fine-tuned in full into out/final/, so "
                         f"{', '.join(given)} (LoRA options for LLaVA bases) do not apply")
    if cfg["precision"] not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"precision must be auto, float32 or bfloat16 (autocast), got {cfg['precision']!r}")
    if not isinstance(cfg["train_detector"], bool):
        raise ValueError("train_detector must be true or false")
    return {**cfg, **{k: v for k, v in OWN_DEFAULTS.items() if k not in raw}}


def detection_objects(sources: Sequence[Any], classes: Sequence[str]) -> dict[str, np.ndarray]:
    """Image path -> (n, 7) detector rows (normalised x1, y1, x2, y2, class, colour -1, size -1)
    of every box the sources' items give that image whose class is one of ``classes``; images
    whose boxes are all of other classes are left out (unannotated for the detector)."""
    from engine.data.benchmark_formats import read_benchmark
    from engine.data.real_datasets import canonical_object_name

    index = {name: i for i, name in enumerate(classes)}
    rows: dict[str, dict[tuple, list[float]]] = {}
    for source in sources:
        for item in read_benchmark(source.spec, source.split).items:
            for box in item.boxes:
                cls = index.get(canonical_object_name(box.label) or box.label)
                if cls is not None:
                    edges = tuple(round(v / 100, 6) for v in (box.x1, box.y1, box.x2, box.y2))
                    rows.setdefault(str(item.image), {})[edges] = [*edges, cls, -1, -1]   # an object once
    return {path: np.asarray(list(objs.values()), dtype=np.float32).reshape(-1, 7) for path, objs in rows.items()}


def _known(knowledge: Any, name: str, level: str) -> bool:
    try:
        knowledge.id_of_name(name, level)
    except KeyError:
        return False
    return True


def training_sample(sample: Any, knowledge: Any, objects: dict[str, np.ndarray] | None = None) -> Any:
    """A stream sample as the Collator takes it: a grounding sample's boxes in the order its
    answer writes them (slot i = the i-th box text), knowledge targets the index has (the
    Collator looks every name up), and with ``objects`` the image's detector rows in
    ``meta["objects"]`` (absent: the image is unannotated)."""
    from engine.data.real_datasets import canonical_object_name

    boxes = sample.boxes
    if sample.task == "ground":                   # the answer groups boxes by class (item_sample)
        groups: dict[str, list] = {}
        for box in boxes:
            groups.setdefault(canonical_object_name(box.label) or box.label or "object", []).append(box)
        boxes = [box for group in groups.values() for box in group]
    targets = {level: [n for n in names if _known(knowledge, n, level)]
               for level, names in sample.knowledge_targets.items()}
    meta = dict(sample.meta)
    if objects is not None and meta.get("source") in objects:
        meta["objects"] = objects[meta["source"]]
    return replace(sample, boxes=boxes, knowledge_targets=targets, meta=meta)


def ignore_unannotated(targets: Any, annotated: Sequence[bool]) -> Any:
    """Detection targets with the heatmaps of unannotated images set to :data:`UNANNOTATED`, and
    the objects' size / offset / attribute terms dropped when no object has both a colour and a
    size word: :func:`engine.model.detector.detection_loss` averages those cross-entropies over
    the labelled objects, 0 / 0 = NaN when none is (published boxes have no attributes), so such
    a batch trains the heatmap (where objects of which class are) and not the box sizes."""
    heatmap = targets.heatmap.clone()
    for row, known in enumerate(annotated):
        if not known:
            heatmap[row] = UNANNOTATED
    mask = targets.mask
    if not (bool((targets.colour[mask] >= 0).any()) and bool((targets.size_word[mask] >= 0).any())):
        mask = torch.zeros_like(mask)
    return targets._replace(heatmap=heatmap, mask=mask)


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What ``out/checkpoint/`` keeps: every trainable tensor and the persistent buffers of the
    modules that train (a trained detector's normalisation statistics)."""
    from engine.lab.finetune import lora_parameters

    state = lora_parameters(model)
    persistent = set(model.state_dict())
    for prefix, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            for name, buffer in module.named_buffers(recurse=False):
                key = f"{prefix}.{name}" if prefix else name
                if key in persistent:
                    state[key] = buffer.detach().cpu().contiguous()
    return state


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, tuple):                                   # DetectionTargets
        return type(value)(*(_to(v, device) for v in value))
    return value.to(device)


def _stored_dtype(folder: Path) -> torch.dtype | None:
    """float16 / bfloat16 when the base stores its weights so (the final folder keeps that size)."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        kinds = {f.get_slice(k).get_dtype() for k in f.keys()}
    return torch.float16 if "F16" in kinds else torch.bfloat16 if "BF16" in kinds else None


def finetune_own(cfg: dict, progress: bool = True) -> dict:
    """Fine-tune the RS-LVLM checkpoint ``cfg["base"]`` in full and save ``out/final/``."""
    from engine.backends.base import checkpoint_errors
    from engine.data.mixed_stream import MixedStream, parse_sources
    from engine.device import resolve_device
    from engine.knowledge import KnowledgeBase, SentenceEncoder
    from engine.lab.batches import Collator
    from engine.lab.finetune import train_loop
    from engine.model.checkpoint import load_checkpoint, save_checkpoint

    out, base = Path(cfg["out"]), Path(cfg["base"])
    device = resolve_device(cfg["device"])
    torch.manual_seed(int(cfg["seed"]))
    with checkpoint_errors():
        loaded = load_checkpoint(base, device=device, dtype=torch.float32)
        knowledge = KnowledgeBase.load(base / "knowledge")
    model, config = loaded.model, loaded.config
    detector = getattr(model.vision, "detector", None)
    if cfg["train_detector"] and detector is None:
        raise ValueError(f"train_detector: {base} has no detector (vision_backbone {config.vision_backbone!r})")
    if cfg["train_detector"] and not config.object_classes:
        raise ValueError(f"train_detector: {base}/config.json names no object_classes to map the data's boxes to")
    model.requires_grad_(True)
    if not cfg["train_projector"]:
        model.projector.requires_grad_(False)
    frozen = [] if detector is None or cfg["train_detector"] else [detector.requires_grad_(False)]
    collator = Collator(loaded.tokenizer, config, knowledge, SentenceEncoder())
    collator.with_detection_targets = collator.object_centric and bool(cfg["train_detector"])
    sources = parse_sources(cfg["data"])
    objects = detection_objects(sources, config.object_classes) if collator.with_detection_targets else None
    stream = MixedStream(sources, int(cfg["seed"]), int(config.image_size), family="rs_lvlm")

    def batch_of(samples: list) -> dict:
        samples = [training_sample(s, knowledge, objects) for s in samples]
        batch = collator(samples)
        if "detection_targets" in batch:
            batch["detection_targets"] = ignore_unannotated(batch["detection_targets"],
                                                            ["objects" in s.meta for s in samples])
        return _to(batch, torch.device(device))

    precision = cfg["precision"]
    if precision == "auto":
        precision = "bfloat16" if device == "cuda" else "float32"
    autocast = (torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if precision == "bfloat16"
                else contextlib.nullcontext())
    summary = train_loop(model, cfg, stream, batch_of, progress, state=trained_state, autocast=autocast,
                         keep_eval=frozen)
    model.eval()
    name = model.config.name or base.name
    model.config.name = name if name.endswith("-finetuned") else f"{name}-finetuned"
    final = out / "final"
    if final.exists():
        shutil.rmtree(final)
    save_checkpoint(model, loaded.tokenizer, final, knowledge_index_dir=base / "knowledge",
                    weights_dtype=_stored_dtype(base))
    summary = {**summary, "model": str(final), "saved": {"merged": str(final)}, "finetuned_from": str(base),
               "device": device, "precision": precision, "train_detector": bool(cfg["train_detector"]),
               "detector_annotated_images": len(objects) if objects is not None else None}
    (final / "train_summary.json").write_text(json.dumps(summary, indent=2))
    if (out / "loss_log.jsonl").is_file():
        shutil.copy(out / "loss_log.jsonl", final / "loss_log.jsonl")
    return summary
