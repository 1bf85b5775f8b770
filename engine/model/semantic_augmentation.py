"""Semantic Augmentation Module (SAM): retrieval from the RS knowledge base, fused per level.

Why retrieval: a compact model cannot memorise what every remote-sensing class looks like and
means; the knowledge base holds short written definitions (embedded once by a sentence encoder
into a 384-d space).  For each level, a query made from that level's visual tokens and the user's
question picks the top-k entries of that level, and their embeddings are fused into the level's
tokens.  The retrieved entries are also returned, so the engine can show *why* it answered.

Why gated cross-attention with a zero-initialised tanh gate (as in Flamingo): at initialisation
the module is exactly the identity, so adding it to a pretrained backbone (the LLaVA path)
changes nothing until training opens the gate.

The query of a level is ``normalise(question + Linear([pooled level tokens ; question]))`` with
the linear map starting at zero: an untrained module retrieves what the question is about, and
training (the retrieval loss, and the LM loss through the attention bias) adds what is seen.

Retrieval is exact inner-product search over the level's entries (what faiss ``IndexFlatIP``
computes); inference may pass the faiss index instead as ``retriever``.  The attention bias is
the log-softmax of the retrieval scores, so the language-model loss also trains the query.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import LEVEL_NAMES, RsLvlmConfig, knowledge_level_id

__all__ = ["SemanticAugmentation", "GatedCrossAttention", "SamOutput", "Retriever"]

Retriever = Callable[[np.ndarray, int, str], tuple[np.ndarray, np.ndarray]]
"""``retriever(queries (B, 384) float32, k, level_name) -> (scores (B, k), ids (B, k))``; ids are
row indices of the knowledge embeddings (``-1`` = no entry), restricted to that level's entries."""


class SamOutput(NamedTuple):
    levels: tuple[torch.Tensor, ...]                              # enriched (B, N_l, Dv) per level
    retrieved: dict[str, tuple[torch.Tensor, torch.Tensor]]       # name -> (scores (B,k), ids (B,k))
    retrieval_loss: torch.Tensor | None                           # scalar, when targets were given


class GatedCrossAttention(nn.Module):
    """Visual tokens attend to knowledge tokens; output gated by tanh(alpha), alpha = 0 at init."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int, ffn_mult: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim, eps=eps)
        self.norm_kv = nn.LayerNorm(kv_dim, eps=eps)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(kv_dim, dim)
        self.v_proj = nn.Linear(kv_dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.norm_ffn = nn.LayerNorm(dim, eps=eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))
        self.ffn_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, n, D) visual tokens; kv (B, m, Dk) knowledge tokens; bias (B, m) added to the
        attention logits (-inf masks a key).  Returns (B, n, D)."""
        b, n, d = x.shape
        m, h = kv.shape[1], self.num_heads
        q = self.q_proj(self.norm_q(x)).view(b, n, h, d // h).transpose(1, 2)       # (B, h, n, hd)
        kv = self.norm_kv(kv.to(x.dtype))
        k = self.k_proj(kv).view(b, m, h, d // h).transpose(1, 2)                   # (B, h, m, hd)
        v = self.v_proj(kv).view(b, m, h, d // h).transpose(1, 2)
        mask = None if bias is None else bias.to(q.dtype)[:, None, None, :]          # (B, 1, 1, m)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)               # (B, h, n, hd)
        attn = attn.transpose(1, 2).reshape(b, n, d)
        x = x + torch.tanh(self.attn_gate).to(x.dtype) * self.o_proj(attn)
        return x + torch.tanh(self.ffn_gate).to(x.dtype) * self.ffn(self.norm_ffn(x))


class SemanticAugmentation(nn.Module):
    """Per-level retrieval of knowledge entries and gated fusion into the level's tokens."""

    def __init__(
        self, config: RsLvlmConfig, knowledge_embeddings: torch.Tensor, knowledge_levels: torch.Tensor
    ) -> None:
        super().__init__()
        self.config = config
        dv, dk = config.vision_hidden_size, config.knowledge_dim
        self.top_k = config.retrieval_top_k
        # The knowledge base is data, not weights: it ships as knowledge/embeddings.npy next to the
        # checkpoint (non-persistent buffers never enter model.safetensors).
        self.register_buffer("knowledge_embeddings", torch.empty(0, dk), persistent=False)  # (N, Dk)
        self.register_buffer("knowledge_levels", torch.empty(0, dtype=torch.long), persistent=False)  # (N,)
        self.set_knowledge(knowledge_embeddings, knowledge_levels)

        self.query_norm = nn.ModuleList(nn.LayerNorm(dv, eps=config.vision_layer_norm_eps) for _ in LEVEL_NAMES)
        self.query_proj = nn.ModuleList(nn.Linear(dv + dk, dk) for _ in LEVEL_NAMES)
        self.fusion = nn.ModuleList(
            GatedCrossAttention(dv, dk, config.sam_num_heads, config.sam_ffn_mult, config.vision_layer_norm_eps)
            for _ in LEVEL_NAMES
        )
        init_scale = torch.tensor([math.log(1.0 / config.retrieval_temperature)])
        if config.learnable_temperature:
            self.logit_scale = nn.Parameter(init_scale)
        else:
            self.register_buffer("logit_scale", init_scale, persistent=False)
        self.init_identity()

    def set_knowledge(self, embeddings: torch.Tensor, levels: torch.Tensor) -> None:
        """Replace the knowledge buffers (e.g. after the user extended the knowledge base)."""
        embeddings = torch.as_tensor(embeddings, dtype=torch.float32)
        levels = torch.as_tensor(levels, dtype=torch.long)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.config.knowledge_dim:
            raise ValueError(
                f"knowledge embeddings must be (N, {self.config.knowledge_dim}), got {tuple(embeddings.shape)}")
        if levels.shape != (embeddings.shape[0],):
            raise ValueError(f"knowledge levels must be ({embeddings.shape[0]},), got {tuple(levels.shape)}")
        device = self.knowledge_embeddings.device
        if device.type == "meta" or embeddings.device.type == "meta":
            device = embeddings.device   # built on the meta device: keep real data where given
        self.knowledge_embeddings = embeddings.to(device)
        self.knowledge_levels = levels.to(device)

    def candidates(self, level: int) -> torch.Tensor:
        """(N,) bool: the entries of knowledge level ``level`` (0 object, 1 region, 2 scene)."""
        return self.knowledge_levels == level

    def queries(self, tokens: torch.Tensor, index: int, question_embeds: torch.Tensor | None) -> torch.Tensor:
        """(B, Dk) unit-norm float32 query for level ``index`` (0 object, 1 region, 2 scene):
        normalise(question + Linear([LN(mean of the level's tokens) ; question]))."""
        pooled = self.query_norm[index](tokens.mean(dim=1))                       # (B, Dv)
        if question_embeds is None:
            question_embeds = pooled.new_zeros(pooled.shape[0], self.config.knowledge_dim)
        question_embeds = question_embeds.to(pooled.dtype)
        q = self.query_proj[index](torch.cat([pooled, question_embeds], dim=-1)) + question_embeds
        return F.normalize(q.float(), dim=-1)                                      # (B, Dk)

    @torch.no_grad()
    def init_identity(self) -> None:
        """Start as the identity with question-only retrieval: gates closed, query projections 0.

        With the projections at zero the query is the question's own sentence embedding, so even
        an untrained module retrieves the entries the question is about (what a text search of
        the knowledge base returns); training then mixes in the level's visual evidence."""
        for fusion in self.fusion:
            fusion.attn_gate.zero_()
            fusion.ffn_gate.zero_()
        for proj in self.query_proj:
            proj.weight.zero_()
            proj.bias.zero_()

    def forward(
        self,
        levels: tuple[torch.Tensor, ...],
        question_embeds: torch.Tensor | None = None,
        retrieval_targets: dict[str | int, torch.Tensor] | None = None,
        retriever: Retriever | None = None,
    ) -> SamOutput:
        """levels: (object, region, scene) tokens, each (B, N_l, Dv); question_embeds (B, Dk);
        retrieval_targets: level name or knowledge level id -> (B, N) multi-hot over all entries."""
        targets = {LEVEL_NAMES[knowledge_level_id(k)]: v for k, v in (retrieval_targets or {}).items()}
        scale = self.logit_scale.float().clamp(max=math.log(100.0)).exp()
        knowledge = self.knowledge_embeddings                                      # (N, Dk) float32
        enriched, retrieved, losses = [], {}, []
        for index, (name, tokens) in enumerate(zip(LEVEL_NAMES, levels)):
            b = tokens.shape[0]
            cand = self.candidates(index)                                          # (N,)
            n_cand = int(cand.sum())
            k = min(self.top_k, n_cand)
            if k == 0:
                enriched.append(tokens)
                empty = tokens.new_zeros(b, 0, dtype=torch.float32)
                retrieved[name] = (empty, empty.long())
                continue
            q = self.queries(tokens, index, question_embeds)                       # (B, Dk)
            # Every entry is scored only where that is the job: the training loss, or the exact
            # top-k when no index is given.  With an index (inference) the search is done once,
            # by faiss, and only its k hits are scored here (in the model's precision).
            all_scores = q @ knowledge.T if (name in targets or retriever is None) else None   # (B, N)
            if name in targets:
                losses.append(self._contrastive_loss(all_scores * scale, cand, targets[name]))
            if retriever is None:
                scores, ids = all_scores.masked_fill(~cand, float("-inf")).topk(k, dim=-1)   # (B, k)
                valid = torch.ones_like(ids, dtype=torch.bool)
            else:
                _, ids_np = retriever(q.detach().cpu().numpy().astype(np.float32), k, name)
                ids = torch.as_tensor(np.asarray(ids_np), dtype=torch.long, device=q.device).reshape(b, -1)
                valid = ids >= 0
                ids = ids.clamp(min=0)
                hits = torch.einsum("bd,bkd->bk", q, knowledge[ids])                    # (B, k)
                scores = hits.masked_fill(~valid, float("-inf"))
            # attention bias: log-softmax of the scores over the k entries, + log k (uniform -> 0)
            bias = torch.log_softmax(scores * scale, dim=-1) + math.log(ids.shape[1])    # (B, k)
            bias = torch.where(valid.any(dim=1, keepdim=True), bias, torch.zeros_like(bias))  # no hit: uniform
            kv = knowledge[ids]                                                    # (B, k, Dk)
            if question_embeds is not None:
                kv = torch.cat([kv, question_embeds.float()[:, None, :]], dim=1)   # (B, k+1, Dk)
                bias = torch.cat([bias, bias.new_zeros(b, 1)], dim=1)
            enriched.append(self.fusion[index](tokens, kv, bias))
            retrieved[name] = (scores.detach().masked_fill(~valid, float("nan")), ids.masked_fill(~valid, -1))
        loss = torch.stack(losses).mean() if losses else None
        return SamOutput(tuple(enriched), retrieved, loss)

    @staticmethod
    def _contrastive_loss(logits: torch.Tensor, cand: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Multi-positive InfoNCE over the level's entries: -log(sum of softmax mass on positives).

        logits (B, N) scaled scores; cand (N,) bool; target (B, N) multi-hot.  Rows without a
        positive among the candidates are ignored."""
        target = target.to(logits.device).bool() & cand
        has_pos = target.any(dim=-1)
        if not bool(has_pos.any()):
            return logits.sum() * 0.0                      # keeps the graph; contributes nothing
        logits = logits.masked_fill(~cand, float("-inf"))
        logits, target = logits[has_pos], target[has_pos]
        pos = torch.logsumexp(logits.masked_fill(~target, float("-inf")), dim=-1)
        return (torch.logsumexp(logits, dim=-1) - pos).mean()
