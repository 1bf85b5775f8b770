"""The one configuration class of the RS-LVLM, for every size from the embedded default to 7B.

Why one flat dataclass: every component (vision encoder, Semantic Augmentation Module,
projectors, language model, experts) reads its sizes from the same object, the object is saved
verbatim as ``config.json`` next to the weights, and the named presets differ only in numbers, so
the tiny CPU model and the 7B model run exactly the same code.

Levels
------
The model reasons at three semantic levels, fine to coarse: ``object`` (fine patch tokens),
``region`` (pooled patches from a deeper layer) and ``scene`` (global tokens from the last
layer).  Two id conventions, both fixed here:

* token levels (every token of the language model): ``0`` text, ``1`` object, ``2`` region,
  ``3`` scene -- what routes tokens to the experts;
* knowledge levels (every knowledge-base entry): the index in :data:`LEVEL_NAMES`, i.e.
  ``0`` object, ``1`` region, ``2`` scene -- the same ids as
  ``engine.knowledge.knowledge_base.KnowledgeBase.level_ids``, so those pass straight through.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

__all__ = [
    "RsLvlmConfig",
    "LEVEL_NAMES",
    "LEVEL_TEXT",
    "LEVEL_OBJECT",
    "LEVEL_REGION",
    "LEVEL_SCENE",
    "knowledge_level_id",
    "knowledge_level_ids",
]

LEVEL_NAMES: tuple[str, str, str] = ("object", "region", "scene")
"""Names of the visual levels, fine to coarse; ``LEVEL_NAMES[i]`` has token level id ``i + 1``."""
LEVEL_TEXT = 0
LEVEL_OBJECT = 1
LEVEL_REGION = 2
LEVEL_SCENE = 3


def knowledge_level_id(level: str | int) -> int:
    """Knowledge level id (0 object, 1 region, 2 scene) of a level name or id; ``ValueError``
    for anything else."""
    if isinstance(level, str):
        key = level.strip().lower()
        if key not in LEVEL_NAMES:
            raise ValueError(f"unknown level {level!r}; expected one of {LEVEL_NAMES}")
        return LEVEL_NAMES.index(key)
    if not 0 <= int(level) < len(LEVEL_NAMES):
        raise ValueError(f"knowledge level id must be in 0..{len(LEVEL_NAMES) - 1}, got {level}")
    return int(level)


def knowledge_level_ids(levels: Iterable[str | int]) -> list[int]:
    """Vectorised :func:`knowledge_level_id` (e.g. the ``level`` field of ``entries.jsonl``)."""
    return [knowledge_level_id(v) for v in levels]


@dataclass
class RsLvlmConfig:
    """Every size and switch of the model.  See :meth:`preset` for the named sizes."""

    # ---- vision encoder (a CLIP-layout ViT: class token, pre-norm blocks) --------------------
    image_size: int = 128
    patch_size: int = 16
    num_channels: int = 3
    vision_hidden_size: int = 256
    vision_num_layers: int = 6
    vision_num_heads: int = 4
    vision_intermediate_size: int = 1024
    vision_hidden_act: str = "gelu"
    vision_layer_norm_eps: float = 1e-5
    # depth (number of blocks applied, 1-based) at which each level's tokens are read
    object_layer: int = 3
    region_layer: int = 5
    scene_layer: int = 6
    region_pool: int = 2          # region tokens = region-layer patches average-pooled k x k
    scene_grid: int = 2           # scene tokens = [class token, global mean, g x g pooled grid]
    num_levels: int = 3
    # "vit": the CLIP-layout ViT read at three depths (LLaVA-compatible); "centernet": the
    # object-centric encoder (engine.model.object_vision): detections are the object tokens.
    vision_backbone: str = "vit"
    detector_channels: tuple[int, int, int, int] = (24, 48, 96, 160)   # strides 2, 4, 8, 16
    num_object_tokens: int = 32
    num_object_classes: int = 8
    object_classes: tuple[str, ...] = ()   # names of the detector's classes (set at training)
    num_colours: int = 6
    num_size_words: int = 3
    # names of the colour and size-word heads' outputs (set at training): what a question's
    # description is matched against (engine.model.referring)
    colour_names: tuple[str, ...] = ()
    size_names: tuple[str, ...] = ()
    num_land_cover: int = 6
    region_grid: int = 4          # centernet: region tokens = pyramid pooled to g x g
    detection_loss_weight: float = 1.0
    # centernet: one extra object-level token per class carrying how many of its detections
    # score >= count_min_score (counting and comparison become a look-up, see object_vision)
    class_count_tokens: bool = False
    count_min_score: float = 0.3
    # training writes colour / position answers as "<obj k> red": the answer first points at the
    # object it is about, then reads the attribute off that token (engine.lab.batches)
    vqa_references: bool = False
    # with class_count_tokens: counting / comparison answers point first at the count token of
    # each class they are about ("<obj K+c> 3", K = num_object_tokens), then give the number
    count_references: bool = False
    # a reference token <obj k> written in the text carries, besides its own embedding, the
    # gated features of object-level token k (pointer-network style): the word that follows a
    # pointer is read off the input at hand instead of looked up again by attention
    reference_feedback: bool = False
    # with reference_feedback: the fed-back token also goes through a learnt H x H map (zero at
    # first), so its colour / box evidence can be written straight into the directions of the
    # answer words (measured: with the per-channel gate alone colour answers stayed class priors)
    reference_feedback_projection: bool = False
    # with reference_feedback: a reference to a detection also carries a learnt map (zero at
    # first) of its box coordinates and of its centre's offset from the detection referred to
    # last before it ("<obj0> and <obj1> left"),
    # so "left of" / "top" is read off the two pointed boxes (measured: with the object tokens'
    # own coordinates alone position answers stayed the prior "left" / "top", 0.38 / 0.29)
    reference_geometry: bool = False
    # id of the first object reference token <obj0> (set from the tokenizer at training)
    object_token_start: int | None = None
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    # ---- Semantic Augmentation Module (retrieval + gated cross-attention) -------------------
    use_sam: bool = True
    knowledge_dim: int = 384      # all-MiniLM-L6-v2 sentence embeddings
    retrieval_top_k: int = 5
    sam_num_heads: int = 4
    sam_ffn_mult: int = 2
    retrieval_temperature: float = 0.07
    learnable_temperature: bool = True
    retrieval_loss_weight: float = 0.5

    # ---- language model (Llama blocks) -----------------------------------------------------
    vocab_size: int = 3000
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = True

    # ---- semantic-aware experts ------------------------------------------------------------
    use_experts: bool = True
    expert_intermediate_size: int | None = None   # level experts; None -> intermediate_size // 2

    # ---- special token ids (fixed by engine.model.tokenizer's special-token order) ----------
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    unk_token_id: int = 3
    image_token_id: int = 4

    initializer_range: float = 0.02
    gradient_checkpointing: bool = False
    # Grounding: the <0>..<100> box tokens are contiguous ids from grid_token_start (set from the
    # tokenizer at training). With grid_label_sigma > 0 their targets are a Gaussian over nearby
    # grid values instead of one-hot, so a box 1 cell off is "almost right" rather than as wrong
    # as one across the image: the loss then teaches localisation, not only token identity.
    grid_token_start: int | None = None
    grid_label_sigma: float = 0.0
    # Add to each object / region token the (gated) embeddings of the grid tokens of its cell
    # centre, so that writing a box is partly copying from the visual token that shows the object.
    grid_position_hint: bool = False

    # The ground the training scenes covered: scene_size source pixels of training_gsd metres
    # each (the synthetic scenes are rendered at 256 px and read as 0.5 m pixels, the sample
    # raster's scale).  A scan tiles other rasters so that a tile covers the same ground.
    training_gsd: float | None = None
    training_scene_size: int | None = None

    model_type: str = field(default="rs_lvlm")
    name: str = ""        # shown to the analyst ("rs-lvlm-tiny"); empty: the checkpoint folder's name

    def __post_init__(self) -> None:
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        self.detector_channels = tuple(int(v) for v in self.detector_channels)
        self.object_classes = tuple(str(v) for v in self.object_classes)
        self.colour_names = tuple(str(v) for v in self.colour_names)
        self.size_names = tuple(str(v) for v in self.size_names)
        if self.vision_backbone not in ("vit", "centernet"):
            raise ValueError(f"vision_backbone must be 'vit' or 'centernet', got {self.vision_backbone!r}")
        if self.vision_backbone == "centernet" and self.image_size % 16:
            raise ValueError(f"the centernet backbone needs image_size divisible by 16, got {self.image_size}")
        if self.count_references and not (self.vision_backbone == "centernet" and self.class_count_tokens):
            raise ValueError("count_references needs the centernet backbone with class_count_tokens")
        if self.reference_feedback_projection and not self.reference_feedback:
            raise ValueError("reference_feedback_projection needs reference_feedback")
        if self.reference_geometry and not (self.reference_feedback and self.vision_backbone == "centernet"):
            raise ValueError("reference_geometry needs reference_feedback and the centernet backbone")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.expert_intermediate_size is None:
            self.expert_intermediate_size = max(1, self.intermediate_size // 2)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        for name in ("object_layer", "region_layer", "scene_layer"):
            depth = getattr(self, name)
            if not 1 <= depth <= self.vision_num_layers:
                raise ValueError(f"{name}={depth} must be in 1..vision_num_layers={self.vision_num_layers}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.vision_hidden_size % self.vision_num_heads:
            raise ValueError("vision_hidden_size must be divisible by vision_num_heads")
        if self.num_levels != 3:
            raise ValueError("the model has exactly three levels (object, region, scene)")

    # ---- derived sizes ---------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def level_token_counts(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """Number of (object, region, scene) tokens for an input of ``height x width`` pixels."""
        if self.vision_backbone == "centernet":
            n_obj = self.num_object_tokens + (self.num_object_classes if self.class_count_tokens else 0)
            return n_obj, self.region_grid ** 2, 1 + self.scene_grid ** 2
        gh = (height or self.image_size) // self.patch_size
        gw = (width or self.image_size) // self.patch_size
        region = math.ceil(gh / self.region_pool) * math.ceil(gw / self.region_pool)
        return gh * gw, region, 2 + self.scene_grid ** 2

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens replacing the ``<image>`` token at the default image size."""
        return sum(self.level_token_counts())

    # ---- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_mean"] = list(self.image_mean)
        d["image_std"] = list(self.image_std)
        d["detector_channels"] = list(self.detector_channels)
        d["object_classes"] = list(self.object_classes)
        d["colour_names"] = list(self.colour_names)
        d["size_names"] = list(self.size_names)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RsLvlmConfig":
        """Build from a dict; unknown keys (from a newer version) are ignored, not fatal."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json_string(), encoding="utf-8")

    @classmethod
    def from_json_file(cls, path: str | Path) -> "RsLvlmConfig":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def replace(self, **overrides: Any) -> "RsLvlmConfig":
        """A copy with some fields changed (re-validated)."""
        return dataclasses.replace(self, **overrides)

    # ---- presets ---------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "RsLvlmConfig":
        """Named sizes: ``tiny`` (embedded default, < 20M parameters, trains on CPU),
        ``base`` (~200M, one consumer GPU) and ``7b`` (LLaMA-7B language model with a
        ViT-L/14-336 vision encoder; the level experts are kept narrow so that the whole model
        stays at ~7.2B parameters).  ``overrides`` replace any field (e.g. ``vocab_size`` from the
        tokenizer)."""
        key = name.lower()
        if key not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[key], **overrides})


_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        image_size=128, patch_size=16, vision_hidden_size=192, vision_num_layers=4,
        vision_num_heads=4, vision_intermediate_size=768, object_layer=2, region_layer=3,
        scene_layer=4, vocab_size=2000, hidden_size=256, intermediate_size=640,
        expert_intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
        max_position_embeddings=1024, tie_word_embeddings=True, retrieval_top_k=5,
        sam_num_heads=4,
    ),
    "base": dict(
        image_size=224, patch_size=16, vision_hidden_size=512, vision_num_layers=8,
        vision_num_heads=8, vision_intermediate_size=2048, object_layer=4, region_layer=6,
        scene_layer=8, vocab_size=8000, hidden_size=768, intermediate_size=2048,
        expert_intermediate_size=1024, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=2048, tie_word_embeddings=True, retrieval_top_k=5,
        sam_num_heads=8,
    ),
    "7b": dict(
        image_size=336, patch_size=14, vision_hidden_size=1024, vision_num_layers=24,
        vision_num_heads=16, vision_intermediate_size=4096, vision_hidden_act="quick_gelu",
        object_layer=12, region_layer=18, scene_layer=24, vocab_size=32000, hidden_size=4096,
        intermediate_size=11008, expert_intermediate_size=128, num_hidden_layers=32,
        num_attention_heads=32, max_position_embeddings=4096, tie_word_embeddings=False,
        rms_norm_eps=1e-5, retrieval_top_k=8, sam_num_heads=16,
    ),
}
