"""The project's tokenizer: byte-level BPE trained with ``tokenizers``, saved as tokenizer.json.

Why byte-level BPE: any text a user types (accents, units, digits) encodes without ``<unk>``,
and decoding is an exact inverse of encoding (up to the lower-case normaliser), which the box
text of the grounding format relies on.  Why lower-case: the embedded model learns from a small
synthetic corpus, so "Airport" and "airport" should be the same tokens.

Vocabulary layout (fixed ids, the config's token ids depend on them)::

    0 <pad>  1 <s>  2 </s>  3 <unk>  4 <image>        special (skipped when decoding)
    BPE merges learned from the corpus
    <0> ... <100>  {  }  |                            grounding grid (GeoChat convention)
    [grounding] [refer] [identify] [caption] [vqa] [classify]   task tokens
    <obj0> ... <obj63>                                object references (engine.model.references)

The grounding and task tokens are ordinary added tokens (never split, never lower-cased, kept
when decoding with ``skip_special_tokens=True``), so ``"storage tank {<10><20><30><40>|0}"``
decodes back to exactly itself.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from engine.grounding import GRID_MAX

__all__ = ["build_tokenizer", "load_tokenizer", "save_tokenizer", "SPECIAL_TOKENS", "GROUNDING_TOKENS", "TASK_TOKENS",
           "OBJECT_TOKENS"]

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
GROUNDING_TOKENS = tuple(f"<{i}>" for i in range(GRID_MAX + 1)) + ("{", "}", "|")
TASK_TOKENS = ("[grounding]", "[refer]", "[identify]", "[caption]", "[vqa]", "[classify]")
OBJECT_TOKENS = tuple(f"<obj{i}>" for i in range(64))
"""Reference tokens: ``<obj k>`` points at object token k (appended last, so the ids of the
earlier layout are unchanged)."""
_SPECIAL_KWARGS = dict(pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=4096,
        **_SPECIAL_KWARGS,
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def build_tokenizer(texts: Iterable[str], vocab_size: int = 3000) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts``; ``vocab_size`` is the total size including the
    special, grounding and task tokens (use ``len(tokenizer)`` as the model's vocab size)."""
    n_added = len(GROUNDING_TOKENS) + len(TASK_TOKENS) + len(OBJECT_TOKENS)
    bpe_size = vocab_size - n_added
    min_size = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if bpe_size < min_size:
        raise ValueError(f"vocab_size must be at least {min_size + n_added}")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size,
        min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t in GROUNDING_TOKENS + TASK_TOKENS + OBJECT_TOKENS])
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return _wrap(tok)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> None:
    """Write tokenizer.json (+ tokenizer_config.json) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerFast:
    """Load ``model_dir/tokenizer.json`` (no network, no tokenizer_config needed)."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {model_dir}")
    return _wrap(Tokenizer.from_file(str(path)))
