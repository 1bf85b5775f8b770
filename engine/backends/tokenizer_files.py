"""Tokenizers of LLaVA-family checkpoints, loaded without the sentencepiece package.

Vicuna / LLaVA / GeoChat folders often ship only ``tokenizer.model`` (a sentencepiece protobuf)
and ``tokenizer_config.json``; transformers needs the ``sentencepiece`` package to read it, which
the engine does not depend on.  A Llama sentencepiece model is a BPE over its pieces, so the same
tokenizer can be rebuilt with the ``tokenizers`` library from the pieces read with protobuf
(:func:`tokenizer_from_sentencepiece`).  ``python -m engine convert`` saves the result as
``tokenizer.json``, which is what the engine then loads.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from engine.errors import BAD_CHECKPOINT, EngineError

log = logging.getLogger("engine.backends.tokenizer")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")
IMAGE_TOKEN = "<image>"


def _token_text(value, default: str) -> str:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return str(value.get("content", default))
    return str(value) if value else default


def tokenizer_from_sentencepiece(model_file: Path, tokenizer_config: dict | None = None):
    """A Llama tokenizer rebuilt from a sentencepiece BPE ``tokenizer.model`` (protobuf only)."""
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import import_protobuf
    from transformers.tokenization_utils_base import generate_merges

    cfg = tokenizer_config or {}
    proto_module = import_protobuf()
    proto = proto_module.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    if proto.trainer_spec.model_type != 2:  # 1 unigram, 2 BPE (Llama, Vicuna), 3 word, 4 char
        raise EngineError(BAD_CHECKPOINT, f"{model_file} is not a BPE sentencepiece model (type "
                                          f"{proto.trainer_spec.model_type}); install the sentencepiece package")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    merges = generate_merges(vocab)
    tok = LlamaTokenizer(vocab=vocab, merges=merges, legacy=bool(cfg.get("legacy", True)),
                         add_bos_token=bool(cfg.get("add_bos_token", True)),
                         add_eos_token=bool(cfg.get("add_eos_token", False)),
                         unk_token=_token_text(cfg.get("unk_token"), "<unk>"),
                         bos_token=_token_text(cfg.get("bos_token"), "<s>"),
                         eos_token=_token_text(cfg.get("eos_token"), "</s>"))
    pad = cfg.get("pad_token")
    if pad:
        tok.pad_token = _token_text(pad, "<unk>")
    return tok


def has_tokenizer(model_dir: Path) -> bool:
    return (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer.model").is_file()


def load_tokenizer(model_dir: Path):
    """The folder's tokenizer: tokenizer.json via transformers, else tokenizer.model rebuilt."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not has_tokenizer(model_dir):
        raise EngineError(BAD_CHECKPOINT, f"{model_dir} has no tokenizer (tokenizer.json or tokenizer.model)")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()   # quiet about config.json model types it does not know (geochat)
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:  # typically: sentencepiece missing for a tokenizer.model-only folder
        spm = model_dir / "tokenizer.model"
        if not spm.is_file():
            raise EngineError(BAD_CHECKPOINT, f"the tokenizer in {model_dir} is unreadable: {exc}") from None
        log.info("rebuilding the tokenizer from %s without sentencepiece (%s)", spm, exc)
    finally:
        hf_logging.set_verbosity(verbosity)
    cfg_path = model_dir / "tokenizer_config.json"
    try:
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    except ValueError:
        cfg = {}
    try:
        return tokenizer_from_sentencepiece(spm, cfg)
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError(BAD_CHECKPOINT, f"{spm} is unreadable: {exc}") from None
