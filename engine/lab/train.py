"""Training: ``python -m engine train --config configs/tiny.json --out DIR``.

The embedded model is trained here, by the project's own code, on the procedural aerial scenes
(engine.data). One config file fixes everything that changes the result (preset, switches, data
seed, batch, learning rate, budget), so a run is reproducible and the ablation runs differ only
in the switches they name. Training is resumable from its run folder; the optimiser state is
stored as safetensors + JSON like the model, so no pickle is ever written or read.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from engine.paths import KNOWLEDGE_DIR
from .batches import DEFAULT_TASK_MIX, Collator, SampleStream, SceneStream

log = logging.getLogger("engine.lab.train")


@dataclass
class TrainConfig:
    """Everything a run depends on; saved next to its checkpoint as train_config.json."""

    preset: str = "tiny"
    model_overrides: dict = field(default_factory=dict)
    use_sam: bool = True
    use_experts: bool = True
    seed: int = 0
    data_seed: int = 0                 # training scenes come from rng([data_seed, i]); eval uses other seeds
    n_scenes: int = 1_000_000          # size of the (lazily rendered) scene stream
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.05
    warmup_steps: int = 200
    max_steps: int = 20_000
    time_budget_min: float = 60.0      # stop at whichever comes first: max_steps or the budget
    retrieval_loss_weight: float = 0.5
    vocab_size: int = 2000
    tokenizer_scenes: int = 3000       # scenes whose texts train the tokenizer
    log_every: int = 25
    save_every: int = 500
    device: str = "auto"
    num_workers: int = 1
    extra_ground_per_scene: int = 0   # oversample the hardest task: extra grounding samples per scene
    # samples per scene and task (overrides the one-of-each default; extra_ground adds to "ground")
    task_mix: dict = field(default_factory=dict)
    vqa_qtypes: list = field(default_factory=list)   # VQA types drawn first (oversampling)
    follow_up_every: int = 0    # every n-th scene asks its last VQA question as a follow-up turn
    # object-centric model: train the detector alone (dense boxes, no language) for this long
    # first, on batches of detector_batch_size scenes; its detections then feed the object tokens.
    detector_warmup_min: float = 0.0
    detector_batch_size: int = 16
    # after the warm-up, keep the detector as it is (eval-mode normalisation, no gradient): the
    # object tokens in training are then exactly the detections seen at inference, and a step
    # costs one detector forward instead of a forward and a backward
    freeze_detector: bool = False
    # continue from a trained checkpoint folder (its weights and tokenizer) instead of from
    # scratch: no detector warm-up; parameters of features switched on since (their config
    # switches in model_overrides) start at their initialisation, which leaves the model as it was
    init_from: str | None = None

    @classmethod
    def from_file(cls, path: Path, **overrides) -> "TrainConfig":
        data = json.loads(Path(path).read_text()) if path else {}
        data.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown training config keys: {sorted(unknown)}")
        return cls(**data)


DEFAULT_INDEX_DIR = KNOWLEDGE_DIR / "index"
"""The shipped knowledge index every run trains against (and copies into its checkpoint)."""


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def tokenizer_corpus(config: TrainConfig, image_size: int, kb_entries: list) -> Iterator[str]:
    """Texts the tokenizer learns from: prompts and answers of sample scenes plus the knowledge base."""
    from engine.data.instructions import SyntheticInstructionDataset
    from engine.model.prompts import build_prompt

    dataset = SyntheticInstructionDataset(seed=config.data_seed + 7919, n_scenes=config.tokenizer_scenes,
                                          image_size=32)
    for i in range(config.tokenizer_scenes):
        for sample in dataset[i]:
            yield build_prompt(sample.task, sample.question)
            yield sample.answer
    for entry in kb_entries:
        yield f"{entry.name}: {entry.definition}"


def lr_at(step: int, config: TrainConfig, progress: float) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio of the peak over ``progress`` in [0, 1].

    Progress is the larger of steps done / max_steps and time spent / time budget, so the decay
    ends with the run whichever limit binds, even when the machine's speed varies during it.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, max(0.0, progress))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def save_train_state(run_dir: Path, model, optimizer, step: int, scenes_seen: int, elapsed: float) -> None:
    """Model and optimiser moments as safetensors, counters as JSON: resumable without pickle."""
    state, seen = {}, set()
    for k, v in model.state_dict().items():
        if v.data_ptr() in seen:  # tied weights (lm_head = embeddings) are stored once
            continue
        seen.add(v.data_ptr())
        state[f"model.{k}"] = v.detach().cpu().contiguous()
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.dim() > 0:
                    state[f"optim.{names[id(p)]}.{key}"] = value.detach().cpu().contiguous()
    tmp = run_dir / "train_state.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(run_dir / "train_state.safetensors")
    (run_dir / "train_state.json").write_text(json.dumps({"step": step, "scenes_seen": scenes_seen,
                                                          "elapsed_s": elapsed}))


def load_train_state(run_dir: Path, model, optimizer) -> tuple[int, int, float]:
    state = load_file(str(run_dir / "train_state.safetensors"))
    counters = json.loads((run_dir / "train_state.json").read_text())
    model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")}, strict=False)
    params = dict(model.named_parameters())
    for key, value in state.items():
        if not key.startswith("optim."):
            continue
        name, slot = key[6:].rsplit(".", 1)
        p = params[name]
        optimizer.state[p][slot] = value.to(p.device)
        optimizer.state[p]["step"] = torch.tensor(float(counters["step"]))
    return counters["step"], counters["scenes_seen"], counters["elapsed_s"]


def model_config_for(config: TrainConfig, tokenizer):
    """The model's config: the preset, the run's switches and the tokenizer's special ids."""
    from engine.model.config import RsLvlmConfig

    model_config = RsLvlmConfig.preset(config.preset, vocab_size=len(tokenizer), use_sam=config.use_sam,
                                       use_experts=config.use_experts,
                                       retrieval_loss_weight=config.retrieval_loss_weight, **config.model_overrides)
    if not model_config.name:
        model_config.name = f"rs-lvlm-{config.preset}"
    model_config.pad_token_id = tokenizer.pad_token_id
    model_config.bos_token_id = tokenizer.bos_token_id
    model_config.eos_token_id = tokenizer.eos_token_id
    model_config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    model_config.grid_token_start = tokenizer.convert_tokens_to_ids("<0>")
    if model_config.vision_backbone == "centernet" and not model_config.object_classes:
        from engine.data.scene_generator import OBJECT_CLASSES

        model_config.object_classes = tuple(OBJECT_CLASSES)
    if model_config.vision_backbone == "centernet" and not model_config.colour_names:
        from engine.data.scene_generator import COLOUR_NAMES, SIZE_NAMES

        model_config.colour_names, model_config.size_names = tuple(COLOUR_NAMES), tuple(SIZE_NAMES)
    if model_config.training_gsd is None:    # the synthetic scenes: 256 px read as 0.5 m pixels
        from engine.data.sample_raster import DEFAULT_PIXEL_SIZE, SCENE_RENDER_SIZE

        model_config.training_gsd, model_config.training_scene_size = DEFAULT_PIXEL_SIZE, SCENE_RENDER_SIZE
    obj0 = tokenizer.convert_tokens_to_ids("<obj0>")
    model_config.object_token_start = obj0 if obj0 is not None and obj0 != tokenizer.unk_token_id else None
    return model_config


def build_model(config: TrainConfig, tokenizer, knowledge, device: str):
    from engine.model.modeling_rs_lvlm import RsLvlmForConditionalGeneration

    model_config = model_config_for(config, tokenizer)
    model = RsLvlmForConditionalGeneration(model_config, torch.from_numpy(np.asarray(knowledge.embeddings)),
                                           torch.as_tensor(np.asarray(knowledge.level_ids), dtype=torch.long))
    return model.to(device)


def train(config: TrainConfig, out_dir: Path, run_dir: Path, resume: bool = True) -> dict:
    """Train one model to ``out_dir`` (a checkpoint folder); returns the run summary."""
    from tqdm import tqdm

    from engine.device import resolve_device
    from engine.model.tokenizer import build_tokenizer, load_tokenizer

    set_seed(config.seed)
    device = resolve_device(config.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train_config.json").write_text(json.dumps(asdict(config), indent=2))
    from engine.knowledge import KnowledgeBase, SentenceEncoder

    knowledge = KnowledgeBase.load(DEFAULT_INDEX_DIR)
    from engine.model.config import RsLvlmConfig

    image_size = RsLvlmConfig.preset(config.preset, **config.model_overrides).image_size
    if config.init_from:
        tokenizer = load_tokenizer(Path(config.init_from))
    elif (run_dir / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(run_dir)
    else:
        t0 = time.perf_counter()
        entries = [knowledge.entry(i) for i in range(len(knowledge.level_ids))]
        tokenizer = build_tokenizer(tokenizer_corpus(config, image_size, entries), vocab_size=config.vocab_size)
        tokenizer.save_pretrained(str(run_dir))
        log.info("tokenizer: %d tokens in %.1f s", len(tokenizer), time.perf_counter() - t0)
    model = build_model(config, tokenizer, knowledge, device)
    if config.init_from and not (resume and (run_dir / "train_state.safetensors").is_file()):
        new = initialise_from(model, Path(config.init_from))
        log.info("initialised from %s; new parameters: %s", config.init_from, ", ".join(new) or "none")
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98))
    step, scenes_seen, elapsed = 0, 0, 0.0
    if resume and (run_dir / "train_state.safetensors").is_file():
        step, scenes_seen, elapsed = load_train_state(run_dir, model, optimizer)
        log.info("resumed from step %d (%.1f min)", step, elapsed / 60)
    collate = Collator(tokenizer, model.config, knowledge, SentenceEncoder())
    budget_s = config.time_budget_min * 60
    log_path = run_dir / "loss_log.jsonl"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    model.train()
    bar = tqdm(total=config.max_steps, initial=step, desc="train", file=sys.stderr, mininterval=5, dynamic_ncols=True)
    started = time.perf_counter() - elapsed
    window: list[float] = []
    warmup_s = config.detector_warmup_min * 60 if model.config.vision_backbone == "centernet" else 0.0
    if config.init_from:
        warmup_s = 0.0                                # the checkpoint's detector is trained already
    for phase in ("detector", "all"):
        if phase == "detector" and time.perf_counter() - started >= warmup_s:
            continue
        # A resumed run continues on scenes it has not seen (deterministic for a given resume point).
        if phase == "detector":
            stream, batch_size = SceneStream(config.data_seed, config.n_scenes, image_size, scenes_seen), \
                config.detector_batch_size
        else:
            if (warmup_s or config.init_from) and config.freeze_detector:
                model.vision.detector.eval().requires_grad_(False)
                collate.with_detection_targets = False
            stream, batch_size = SampleStream(config.data_seed, config.n_scenes, image_size, scenes_seen,
                                              task_mix(config), tuple(config.vqa_qtypes),
                                              config.follow_up_every), config.batch_size
        # Batches are collated in the worker (question embeddings, detection targets), beside training.
        loader = torch.utils.data.DataLoader(stream, batch_size=batch_size,
                                             collate_fn=collate.detector_batch if phase == "detector" else collate,
                                             worker_init_fn=_one_thread, num_workers=config.num_workers,
                                             prefetch_factor=4 if config.num_workers else None)
        for batch in loader:
            now = time.perf_counter() - started
            if step >= config.max_steps or now >= budget_s or (phase == "detector" and now >= warmup_s):
                break
            progress = max(step / config.max_steps, now / budget_s)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config, progress)
            with autocast:
                out = _forward(model, batch, device, detector_only=phase == "detector")
            _optimise(model, optimizer, out.loss)
            step += 1
            scenes_seen += int(batch["pixel_values"].shape[0])
            window.append(float(out.loss.detach()))
            bar.update(1)
            if step % config.log_every == 0:
                record = {"step": step, "phase": phase, "loss": float(np.mean(window)),
                          **{name: float(getattr(out, name).detach()) for name in ("lm_loss", "retrieval_loss", "detection_loss")
                             if getattr(out, name, None) is not None},
                          "lr": optimizer.param_groups[0]["lr"], "elapsed_s": round(time.perf_counter() - started, 1)}
                with log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{record['loss']:.3f}")
                window.clear()
            if step % config.save_every == 0:
                save_train_state(run_dir, model, optimizer, step, scenes_seen, time.perf_counter() - started)
    bar.close()
    return _finish(model, optimizer, tokenizer, config, device, run_dir, out_dir, step, scenes_seen,
                   time.perf_counter() - started)


def initialise_from(model, folder: Path) -> list[str]:
    """Load a trained checkpoint folder's weights into ``model`` (built from this run's config);
    returns the names of the parameters the checkpoint lacks.  A tensor the model has no place
    for, or of another shape, is an error: the run's config must extend the checkpoint's."""
    from engine.model.checkpoint import WEIGHTS_NAME, read_weights, refuse_pickles, state_mismatches

    refuse_pickles(folder)
    state = read_weights(folder / WEIGHTS_NAME)
    missing, unexpected, misshaped = state_mismatches(model, state)
    if unexpected or misshaped:
        raise ValueError(f"{folder} does not fit this run's model: unexpected {unexpected[:5]}, "
                         f"other shapes {misshaped[:5]}")
    own = model.state_dict()
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
    return missing


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def task_mix(config: TrainConfig) -> dict[str, int]:
    """Samples per scene and task: the config's mix (default one of each) plus extra grounding."""
    mix = dict(config.task_mix or DEFAULT_TASK_MIX)
    mix["ground"] = mix.get("ground", 0) + config.extra_ground_per_scene
    return mix


class _DetectorOutput:
    """What a detector-only step returns (the loss and its one term)."""

    def __init__(self, loss: torch.Tensor) -> None:
        self.loss = self.detection_loss = loss


def _forward(model, batch: dict, device: str, detector_only: bool):
    """One batch through the model (nanoGPT style: the model returns its own loss)."""
    moved = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            moved[k] = {lk: lv.to(device) for lk, lv in v.items()}
        elif isinstance(v, tuple):
            moved[k] = type(v)(*(t.to(device) for t in v))
        else:
            moved[k] = v.to(device)
    if detector_only:
        from engine.model.detector import detection_loss

        raw = model.vision.detector(moved["pixel_values"].to(model.dtype))
        return _DetectorOutput(detection_loss(raw, moved["detection_targets"]))
    return model(**moved)


def _optimise(model, optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def _finish(model, optimizer, tokenizer, config: TrainConfig, device: str, run_dir: Path, out_dir: Path,
            step: int, scenes_seen: int, elapsed: float) -> dict:
    """Save the resumable state and the checkpoint folder with its summary and loss log."""
    from engine.model.checkpoint import save_checkpoint

    log_path = run_dir / "loss_log.jsonl"
    save_train_state(run_dir, model, optimizer, step, scenes_seen, elapsed)
    model.eval()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    save_checkpoint(model, tokenizer, out_dir, knowledge_index_dir=DEFAULT_INDEX_DIR)
    summary = {"steps": step, "samples_seen": scenes_seen, "elapsed_min": round(elapsed / 60, 2),
               "device": device, "config": asdict(config),
               "parameters": model.parameter_counts() if hasattr(model, "parameter_counts") else None}
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    shutil.copy(log_path, out_dir / "loss_log.jsonl") if log_path.is_file() else None
    log.info("trained %d steps in %.1f min -> %s", step, elapsed / 60, out_dir)
    return summary


def names_a_base(config_path: Path | None) -> bool:
    """Whether a training config is a fine-tuning config: it names a ``base`` model folder."""
    if config_path is None or not Path(config_path).is_file():
        return False
    try:
        data = json.loads(Path(config_path).read_text(encoding="utf-8"))
    except ValueError:
        return False
    return isinstance(data, dict) and "base" in data


def main(argv: list[str] | None = None) -> int:
    """``--config CFG``: a config with ``base: DIR`` (a LLaVA folder) and ``data: [FORMAT:PATH ...]``
    runs the LoRA fine-tuning of :mod:`engine.lab.finetune` (its flags: ``--estimate``, ``--out``);
    any other config trains the embedded model."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(argv)
    if names_a_base(known.config):
        from .finetune import main as finetune_main

        return finetune_main(argv)
    parser = argparse.ArgumentParser(prog="python -m engine train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="JSON training config (see TrainConfig; with 'base': the LoRA "
                                                    "fine-tuning of engine.lab.finetune); default: tiny")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument("--run-dir", type=Path, help="resumable state and logs (default: runs/<out name>)")
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--time-budget-min", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--use-sam", type=int, choices=(0, 1))
    parser.add_argument("--use-experts", type=int, choices=(0, 1))
    args = parser.parse_args(argv)
    config = TrainConfig.from_file(args.config, max_steps=args.max_steps, time_budget_min=args.time_budget_min,
                                   seed=args.seed, device=args.device,
                                   use_sam=None if args.use_sam is None else bool(args.use_sam),
                                   use_experts=None if args.use_experts is None else bool(args.use_experts))
    run_dir = args.run_dir or Path("runs") / args.out.name
    if args.no_resume and run_dir.exists():
        shutil.rmtree(run_dir)
    summary = train(config, args.out, run_dir, resume=not args.no_resume)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
    return 0
