"""The RS-LVLM: multi-level vision -> Semantic Augmentation -> level projectors -> expert LM.

Data flow for a batch of B images and prompts (LLaVA layout: each prompt holds one ``<image>``
token, replaced in place by the visual tokens ``[object..., region..., scene...]``)::

    pixel_values (B,3,H,W) -> MultiLevelVisionEncoder -> (B,N_obj,Dv) (B,N_reg,Dv) (B,N_sc,Dv)
        -> SemanticAugmentation (per level: query from tokens + question_embeds (B,384),
           top-k knowledge entries, gated cross-attention)          [skipped if not use_sam]
        -> MultiLevelProjector (+ level embedding)                  -> (B, Nv, H), levels 1..3
    input_ids (B,T) -> embed_tokens -> splice visual tokens at <image> -> (B, T-1+Nv, H)
        -> Llama decoder with SemanticExpertMLP (token_levels: 0 text, 1..3 visual) -> lm_head

Batches are left-padded; RoPE positions come from the attention mask, so a padded row computes
the same thing as the row alone.  ``labels`` are given on the text positions (B, T) and expanded
with -100 over the visual tokens here; the loss is the next-token cross-entropy plus
``retrieval_loss_weight`` x the SAM retrieval loss when ``retrieval_targets`` are given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from .config import RsLvlmConfig
from .experts import SemanticExpertMLP
from engine.grounding import GRID_MAX
from .language_model import RsLvlmLanguageModel
from .projector import MultiLevelProjector
from .semantic_augmentation import Retriever, SemanticAugmentation
from .detector import DetectionTargets, Detections, detection_loss
from .object_vision import (BOX_FEATURES, FOURIER_FEATURES, ObjectCentricVisionEncoder, box_features,
                            fourier_features)
from .references import assign_references, reference_offsets
from .vision import MultiLevelVisionEncoder

__all__ = ["RsLvlmForConditionalGeneration", "RsLvlmOutput", "VisualEncoding"]

IGNORE_INDEX = -100
GEOMETRY_HIDDEN = 128


@dataclass
class VisualEncoding:
    embeds: torch.Tensor                                   # (B, Nv, H) projected visual tokens
    token_levels: torch.Tensor                             # (Nv,) 1 object, 2 region, 3 scene
    retrieved: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    retrieval_loss: torch.Tensor | None = None
    detections: Detections | None = None                   # centernet backbone only
    detection_loss: torch.Tensor | None = None             # when detection targets were given


@dataclass
class RsLvlmOutput:
    loss: torch.Tensor | None
    lm_loss: torch.Tensor | None
    retrieval_loss: torch.Tensor | None
    logits: torch.Tensor                                   # (B, L, V) (L = last logits_to_keep)
    retrieved: dict[str, tuple[torch.Tensor, torch.Tensor]]  # level -> (scores (B,k), ids (B,k))
    past_key_values: Cache | None
    attention_mask: torch.Tensor | None = None             # (B, past + L_full) after splicing
    labels: torch.Tensor | None = None                     # (B, L_full) after splicing
    detection_loss: torch.Tensor | None = None
    detections: Detections | None = None
    object_embeds: torch.Tensor | None = None              # (B, N_obj, H) object-level tokens
    object_boxes: torch.Tensor | None = None               # (B, K, 4) their detections' boxes


class RsLvlmForConditionalGeneration(nn.Module):
    """The whole model.  ``knowledge_embeddings`` (N, 384) and ``knowledge_levels`` (N,) (ids as
    in :mod:`engine.model.config`) are the knowledge base SAM retrieves from; they are
    non-persistent buffers (shipped as ``knowledge/`` next to the checkpoint)."""

    def __init__(
        self,
        config: RsLvlmConfig,
        knowledge_embeddings: torch.Tensor | None = None,
        knowledge_levels: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        if knowledge_embeddings is None:
            knowledge_embeddings = torch.zeros(0, config.knowledge_dim)
            knowledge_levels = torch.zeros(0, dtype=torch.long)
        self.vision = (ObjectCentricVisionEncoder(config) if config.vision_backbone == "centernet"
                       else MultiLevelVisionEncoder(config))
        self.sam = SemanticAugmentation(config, knowledge_embeddings, knowledge_levels) if config.use_sam else None
        self.projector = MultiLevelProjector(config)
        self.language_model = RsLvlmLanguageModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.grid_position_hint:
            # x and y start apart (ones vs alternating signs) so the model can tell them apart.
            self.grid_hint_x = nn.Parameter(torch.ones(config.hidden_size))
            self.grid_hint_y = nn.Parameter(torch.ones(config.hidden_size) * torch.tensor([1.0, -1.0]).repeat(
                (config.hidden_size + 1) // 2)[:config.hidden_size])
        if config.reference_feedback:
            self.reference_feedback_gate = nn.Parameter(torch.zeros(config.hidden_size))
        if config.reference_feedback_projection:
            self.reference_feedback_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        if config.reference_geometry:
            # box features of the pointed detection, Fourier features of its centre's offset from
            # the reference before it, and whether there is one
            self.reference_geometry_mlp = nn.Sequential(
                nn.Linear(BOX_FEATURES + 2 * FOURIER_FEATURES + 1, GEOMETRY_HIDDEN), nn.GELU(),
                nn.Linear(GEOMETRY_HIDDEN, config.hidden_size))
        if config.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight
        self.init_weights()

    @classmethod
    def build(
        cls,
        config: RsLvlmConfig,
        knowledge_embeddings: torch.Tensor | None = None,
        knowledge_levels: torch.Tensor | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        initialise: bool = True,
    ) -> "RsLvlmForConditionalGeneration":
        """Build straight on ``device`` in ``dtype``: the module tree is made on the meta device,
        then materialised once, so a 7B model never exists as a float32 CPU copy first.  With
        ``initialise=False`` the weights are left uninitialised (they are about to be loaded)."""
        with torch.device("meta"):
            model = cls(config)
        if dtype is not None:
            model.to(dtype)
        model.to_empty(device=device)
        if config.tie_word_embeddings:                       # to_empty gives each its own tensor
            model.lm_head.weight = model.language_model.embed_tokens.weight
        if initialise:
            model.init_weights()
        model.language_model.reset_rotary(device)
        if model.sam is not None:
            if not config.learnable_temperature:
                model.sam.logit_scale = torch.tensor([math.log(1.0 / config.retrieval_temperature)], device=device)
            if knowledge_embeddings is None:
                knowledge_embeddings = torch.zeros(0, config.knowledge_dim)
                knowledge_levels = torch.zeros(0, dtype=torch.long)
            model.sam.set_knowledge(knowledge_embeddings, knowledge_levels)
        return model

    # ---- initialisation --------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers),
        norms at 1, biases at 0; SAM starts as the identity with question-only retrieval."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, LlamaRMSNorm):
                nn.init.ones_(module.weight)
        if isinstance(self.vision, ObjectCentricVisionEncoder):
            self.vision.detector.reset_parameters()
        else:
            nn.init.normal_(self.vision.class_embedding, std=std)
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, param in self.language_model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, std=residual_std)
        if self.sam is not None:
            self.sam.init_identity()
            self.sam.logit_scale.fill_(math.log(1.0 / self.config.retrieval_temperature))
        if self.config.reference_feedback:     # starts as the model without it (continued runs)
            self.reference_feedback_gate.zero_()
        if self.config.reference_feedback_projection:
            self.reference_feedback_proj.weight.zero_()
        if self.config.reference_geometry:
            self.reference_geometry_mlp[-1].weight.zero_()

    # ---- bookkeeping -----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def set_knowledge(self, embeddings: torch.Tensor, levels: torch.Tensor) -> None:
        """Swap the knowledge base SAM retrieves from (no-op when SAM is off)."""
        if self.sam is not None:
            self.sam.set_knowledge(embeddings, levels)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters by component; ``language_model`` excludes the experts and includes the LM
        head when it is not tied; ``total`` counts tied tensors once."""
        def count(module: nn.Module | None) -> int:
            return 0 if module is None else sum(p.numel() for p in module.parameters())

        experts = sum(count(m) for m in self.language_model.modules() if isinstance(m, SemanticExpertMLP))
        lm = count(self.language_model) - experts
        if not self.config.tie_word_embeddings:
            lm += self.lm_head.weight.numel()
        return {
            "vision": count(self.vision),
            "sam": count(self.sam),
            "projectors": count(self.projector),
            "language_model": lm,
            "experts": experts,
            "total": sum(p.numel() for p in self.parameters()),
        }

    # ---- forward ---------------------------------------------------------------------------
    def encode_images(
        self,
        pixel_values: torch.Tensor,
        question_embeds: torch.Tensor | None = None,
        retrieval_targets: dict[str | int, torch.Tensor] | None = None,
        retriever: Retriever | None = None,
        detection_targets: DetectionTargets | None = None,
    ) -> VisualEncoding:
        """(B, 3, H, W) images -> projected, level-tagged visual tokens and retrieved entries."""
        detections, det_loss = None, None
        if isinstance(self.vision, ObjectCentricVisionEncoder):
            vis = self.vision(pixel_values)
            levels, detections = tuple(vis.levels), vis.detections
            if detection_targets is not None:
                det_loss = detection_loss(vis.raw, detection_targets)
        else:
            levels = tuple(self.vision(pixel_values))
        retrieved, retrieval_loss = {}, None
        if self.sam is not None:
            sam_out = self.sam(levels, question_embeds, retrieval_targets, retriever)
            levels, retrieved, retrieval_loss = sam_out.levels, sam_out.retrieved, sam_out.retrieval_loss
        embeds, token_levels = self.projector(levels)
        if detections is not None:
            embeds = self._tag_objects(embeds, detections)
        elif self.config.grid_position_hint and self.config.grid_token_start is not None:
            embeds = embeds + self._grid_hint(levels, embeds.dtype)
        return VisualEncoding(embeds, token_levels, retrieved, retrieval_loss, detections, det_loss)

    def detect(self, pixel_values: torch.Tensor) -> Detections:
        """The object tokens' detections alone (what grounding references resolve to)."""
        if not isinstance(self.vision, ObjectCentricVisionEncoder):
            raise ValueError("this model has no detector (vision_backbone is not 'centernet')")
        return self.vision(pixel_values.to(self.dtype)).detections

    def _tag_objects(self, embeds: torch.Tensor, detections: Detections) -> torch.Tensor:
        """Add to object token k the embedding of its reference token ``<obj k>`` (so that
        writing a reference is copying the token's tag) and, with ``grid_position_hint``, the
        gated embeddings of the grid tokens of its box centre."""
        table = self.language_model.embed_tokens.weight                            # (V, H)
        k = detections.cells.shape[1]
        tags = embeds.new_zeros(embeds.shape[0], k, embeds.shape[-1])
        if self.config.object_token_start is not None:
            tags = tags + table[self.config.object_token_start + torch.arange(k, device=table.device)][None]
        g0 = self.config.grid_token_start
        if self.config.grid_position_hint and g0 is not None:
            centre = (detections.boxes[..., :2] + detections.boxes[..., 2:]) / 2 * GRID_MAX     # (B, K, 2)
            cell = centre.round().long().clamp(0, GRID_MAX)
            tags = tags + self.grid_hint_x * table[g0 + cell[..., 0]] + self.grid_hint_y * table[g0 + cell[..., 1]]
        rest = embeds.new_zeros(embeds.shape[0], embeds.shape[1] - k, embeds.shape[-1])
        return embeds + torch.cat([tags.to(embeds.dtype), rest], dim=1)

    def _grid_hint(self, levels: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
        """(1, Nv, H): for object and region tokens (row-major square grids), the gated
        embeddings of the <x> and <y> grid tokens of their cell centres; zero for scene tokens."""
        table = self.language_model.embed_tokens.weight                            # (V, H)
        g0, parts = self.config.grid_token_start, []
        for i, level in enumerate(levels):
            n = level.shape[1]
            side = int(round(math.sqrt(n)))
            if i < 2 and side * side == n:
                centres = torch.round((torch.arange(side, device=table.device) + 0.5) * GRID_MAX / side).long()
                xs, ys = centres.repeat(side), centres.repeat_interleave(side)    # row-major cells
                parts.append(self.grid_hint_x * table[g0 + xs] + self.grid_hint_y * table[g0 + ys])
            else:
                parts.append(table.new_zeros(n, table.shape[1]))
        return torch.cat(parts)[None].to(dtype)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,           # (B, 3, H, W)
        input_ids: torch.Tensor | None = None,              # (B, T), one <image> each if images
        attention_mask: torch.Tensor | None = None,         # (B, past + T)
        labels: torch.Tensor | None = None,                 # (B, T), -100 = no loss
        question_embeds: torch.Tensor | None = None,        # (B, 384)
        retrieval_targets: dict[str | int, torch.Tensor] | None = None,  # level -> (B, N) multi-hot
        past_key_values: Cache | None = None,
        use_cache: bool = False,
        *,
        retriever: Retriever | None = None,
        logits_to_keep: int = 0,
        position_ids: torch.Tensor | None = None,
        detection_targets: DetectionTargets | None = None,
        slot_boxes: torch.Tensor | None = None,            # (B, S, 4) boxes of <obj i> slots
        object_embeds: torch.Tensor | None = None,         # (B, N_obj, H) of the prefill, for steps
        object_boxes: torch.Tensor | None = None,          # (B, K, 4) of the prefill, for steps
        previous_reference: torch.Tensor | None = None,    # (B,) last <obj k> before input_ids, for steps
    ) -> RsLvlmOutput:
        if input_ids is None:
            raise ValueError("input_ids are required")
        b, t = input_ids.shape
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(b, past_len + t, dtype=torch.long, device=input_ids.device)
        past_mask, cur_mask = attention_mask[:, :-t], attention_mask[:, -t:]
        token_levels = torch.zeros_like(input_ids)                               # (B, T) text
        retrieved, retrieval_loss, visual = {}, None, None
        if pixel_values is not None:
            visual = self.encode_images(pixel_values, question_embeds, retrieval_targets, retriever,
                                        detection_targets)
            retrieved, retrieval_loss = visual.retrieved, visual.retrieval_loss
            if slot_boxes is not None and visual.detections is not None and self.config.object_token_start is not None:
                input_ids, labels = assign_references(input_ids, labels, slot_boxes, visual.detections,
                                                      self.config.object_token_start)
        embeds = self.language_model.embed_tokens(input_ids)                   # (B, T, H)
        if visual is not None:
            object_embeds = visual.embeds[:, :self.config.level_token_counts()[0]]
            if visual.detections is not None:
                object_boxes = visual.detections.boxes
        if self.config.reference_feedback and object_embeds is not None:
            embeds = embeds + self.reference_feedback(input_ids, object_embeds, object_boxes,
                                                      previous_reference).to(embeds.dtype)
        if visual is not None:
            embeds, token_levels, cur_mask, labels = self._splice(input_ids, embeds, visual, cur_mask, labels)
        attention_mask = torch.cat([past_mask, cur_mask], dim=1)

        hidden, cache = self.language_model(
            embeds, token_levels, attention_mask, position_ids, past_key_values, use_cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)                                            # (B, L, V)

        lm_loss = None
        if labels is not None:
            if logits_to_keep:
                raise ValueError("labels need the logits of every position (logits_to_keep=0)")
            lm_loss = self._lm_loss(logits, labels)
        losses = []
        if lm_loss is not None:
            losses.append(lm_loss)
        if retrieval_loss is not None:
            losses.append(self.config.retrieval_loss_weight * retrieval_loss)
        det_loss = visual.detection_loss if visual is not None else None
        if det_loss is not None:
            losses.append(self.config.detection_loss_weight * det_loss)
        loss = sum(losses[1:], losses[0]) if losses else None
        return RsLvlmOutput(loss, lm_loss, retrieval_loss, logits, retrieved, cache, attention_mask, labels,
                            det_loss, visual.detections if visual is not None else None,
                            object_embeds if self.config.reference_feedback else None,
                            object_boxes if self.config.reference_geometry else None)

    def reference_feedback(self, input_ids: torch.Tensor, object_embeds: torch.Tensor,
                           object_boxes: torch.Tensor | None = None,
                           previous_reference: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, H) to add to the embeddings of ``input_ids`` (B, T): at each reference token
        ``<obj k>`` the gated object-level token k of ``object_embeds`` (B, N_obj, H), zero
        elsewhere.  Why: a pointer network feeds the pointed-at item back as the next input; the
        small LM that learnt to point at the right object still read its colour or count wrongly
        (right word 0.38 given the right box), because reading needed a second attention hop."""
        start = self.config.object_token_start
        n, h = object_embeds.shape[1], object_embeds.shape[-1]
        if start is None:
            return object_embeds.new_zeros(*input_ids.shape, h)
        rel, is_ref = reference_offsets(input_ids, start, n)                      # (B, T)
        picked = object_embeds.gather(1, rel.clamp(0, n - 1)[..., None].expand(-1, -1, h))
        fed = self.reference_feedback_gate * picked
        if self.config.reference_feedback_projection:
            fed = fed + self.reference_feedback_proj(picked.to(self.reference_feedback_proj.weight.dtype))
        if self.config.reference_geometry and object_boxes is not None:
            fed = fed + self._reference_geometry(input_ids, object_boxes, previous_reference).to(fed.dtype)
        return fed * is_ref[..., None]

    def _reference_geometry(self, input_ids: torch.Tensor, boxes: torch.Tensor,
                            previous_reference: torch.Tensor | None) -> torch.Tensor:
        """(B, T, H): at a reference to detection k (``boxes`` (B, K, 4)), the learnt map of
        k's box and of its centre minus the centre of the detection referred to last before it
        (in ``input_ids``, or else ``previous_reference`` (B,), the last detection reference
        before them, -1 for none: a decode step's context); zero elsewhere and for references
        to count tokens.  Why explicit: "Is the ship left or right of the tank?" is the sign of
        one offset, which the small LM did not learn to compute from two tokens' Fourier
        features in the runs so far (position 0.38 / 0.29)."""
        start, k = int(self.config.object_token_start), boxes.shape[1]
        rel, is_box = reference_offsets(input_ids, start, k)                      # (B, T)
        at = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        last = torch.where(is_box, at, -1).cummax(dim=1).values                  # last at or before t
        before = torch.cat([last.new_full(last[:, :1].shape, -1), last[:, :-1]], dim=1)
        prel = input_ids.gather(1, before.clamp(min=0)) - start
        has_prev = before >= 0
        if previous_reference is not None:
            carried, carried_is_box = reference_offsets(previous_reference.reshape(-1, 1).to(input_ids),
                                                        start, k)                # (B, 1)
            prel = torch.where(has_prev, prel, carried.expand_as(prel))
            has_prev = has_prev | carried_is_box

        def pick(index: torch.Tensor) -> torch.Tensor:                          # (B, T, 4)
            return boxes.gather(1, index.clamp(0, k - 1)[..., None].expand(-1, -1, 4))
        box, pbox = pick(rel), pick(prel)
        pair = has_prev[..., None].to(box.dtype)
        offset = ((box[..., :2] + box[..., 2:]) - (pbox[..., :2] + pbox[..., 2:])) / 2 * pair
        dtype = self.reference_geometry_mlp[0].weight.dtype
        feats = torch.cat([box_features(box), fourier_features(offset), pair], dim=-1).to(dtype)
        return self.reference_geometry_mlp(feats) * is_box[..., None]

    def _splice(
        self,
        input_ids: torch.Tensor,            # (B, T)
        text_embeds: torch.Tensor,          # (B, T, H)
        visual: VisualEncoding,             # embeds (B, Nv, H), token_levels (Nv,)
        mask: torch.Tensor,                 # (B, T)
        labels: torch.Tensor | None,        # (B, T) or already spliced (B, T - 1 + Nv)
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Replace each row's single ``<image>`` token by the Nv visual tokens (vectorised)."""
        b, t = input_ids.shape
        nv, h = visual.embeds.shape[1], text_embeds.shape[-1]
        if visual.embeds.shape[0] != b:
            raise ValueError(f"{visual.embeds.shape[0]} images for {b} prompts")
        is_image = input_ids == self.config.image_token_id
        if not bool((is_image.sum(dim=1) == 1).all()):
            raise ValueError("every prompt must contain exactly one <image> token when pixel_values are given")
        p = is_image.long().argmax(dim=1)[:, None]                               # (B, 1)
        j = torch.arange(t - 1 + nv, device=input_ids.device)[None]              # (1, L)
        is_vis = (j >= p) & (j < p + nv)                                         # (B, L)
        text_idx = torch.where(j < p, j, j - nv + 1).clamp(0, t - 1)             # (B, L)
        vis_idx = (j - p).clamp(0, nv - 1)                                       # (B, L)
        vis = visual.embeds.to(text_embeds.dtype).gather(1, vis_idx[..., None].expand(-1, -1, h))
        txt = text_embeds.gather(1, text_idx[..., None].expand(-1, -1, h))
        embeds = torch.where(is_vis[..., None], vis, txt)                        # (B, L, H)
        levels = torch.where(is_vis, visual.token_levels[vis_idx], 0)            # (B, L)
        mask = torch.where(is_vis, torch.ones_like(text_idx), mask.long().gather(1, text_idx))
        if labels is not None and labels.shape[1] == t:
            labels = torch.where(is_vis, IGNORE_INDEX, labels.gather(1, text_idx))
        return embeds, levels, mask, labels

    def _lm_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy in float32, averaged over each sample's labelled positions
        and then over the samples: a one-word VQA answer weighs as much as a long caption
        (averaging per token gave captions and boxes almost all the gradient).

        Box-coordinate labels get Gaussian soft targets over the grid tokens when
        ``config.grid_label_sigma`` > 0 (see RsLvlmConfig.grid_token_start).
        """
        shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()      # (N, V)
        shift_labels = labels[:, 1:].reshape(-1).to(logits.device)               # (N,)
        valid = shift_labels != IGNORE_INDEX
        if not bool(valid.any()):
            return shift_logits.sum() * 0.0
        sigma, g0 = self.config.grid_label_sigma, self.config.grid_token_start
        losses = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="none")  # (N,)
        is_grid = valid & (shift_labels >= (g0 or 0)) & (shift_labels <= (g0 or 0) + GRID_MAX)
        if sigma and g0 is not None and bool(is_grid.any()):
            log_probs = F.log_softmax(shift_logits[is_grid], dim=-1)[:, g0:g0 + GRID_MAX + 1]   # (M, 101)
            centre = (shift_labels[is_grid] - g0).float()[:, None]                               # (M, 1)
            grid = torch.arange(GRID_MAX + 1, device=logits.device, dtype=torch.float32)[None]    # (1, 101)
            weights = torch.exp(-0.5 * ((grid - centre) / sigma) ** 2)
            weights = weights / weights.sum(dim=-1, keepdim=True)
            losses = losses.masked_scatter(is_grid, -(weights * log_probs).sum(dim=-1))
        b = labels.shape[0]
        losses, valid = losses.view(b, -1) * valid.view(b, -1), valid.view(b, -1).float()
        per_sample = losses.sum(dim=1) / valid.sum(dim=1).clamp(min=1)
        has = valid.sum(dim=1) > 0
        return per_sample[has].mean()
