"""The answer grammar: which detections a question's words describe, and what their evidence says.

Why: the language model points at detections (``engine.model.references``), and what it gets
wrong is mostly *which* one (measured on the shipped model, seed 1000: a referring expression
such as "the small red building" picked the right detection 0.60 of the time, while the
detector's colour head is right for 0.99 of the objects it finds) and *how many* (a plural
request listed fewer boxes than the detector holds of the class in 9 of 63 answers).  The
decoder already constrains references by class; this module extends the same grammar to every
word of the description the detector has a head for -- colour, size word, largest / smallest --
and, where the question asks for an attribute of the object pointed at (its colour, its place,
its side of another object, how many there are, whether there are more of one class than of
another), to the answer word that evidence gives.  The model still decides
everything the grammar leaves open: which of several fitting detections, whether to point at
all, when a listing of a singular request stops, every word of every other answer.

A :class:`Description` is what a question says of one object ("the largest ship" ->
ship, largest); :class:`AnswerGrammar` holds the descriptions of one question and, once bound to
a batch's detections, gives for each row the detections its next reference should prefer, the
rows whose listing must go on, and the answer words the evidence rules out.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from engine.grounding import PLACE_WORDS, position_word
from .references import REFERENCE_RE, phrase_class, reference_offsets

__all__ = ["Vocabulary", "Description", "describe", "asked_attribute", "AnswerGrammar", "SIDE_WORDS",
           "HEIGHT_WORDS", "COUNT_WORDS", "YES_NO_WORDS", "GRAMMARS"]

GRAMMARS: tuple[str, ...] = ("classes", "descriptions", "evidence")
"""How much of the question the decoder holds answers to, each level adding to the one before:
``classes`` a reference has the class its phrase (or the question) names, one box per object, a
listing keeps its class; ``descriptions`` it also fits the colour / size / largest-smallest words
and a plural request lists every sure detection of its class; ``evidence`` (the default) a
colour / place / side answer also says what the detection pointed at shows, a counting or
comparison answer what the count tokens pointed at carry."""

SIDE_WORDS: tuple[str, ...] = ("left", "right")
"""Answers to "Is the X left or right of the Y?"."""
HEIGHT_WORDS: tuple[str, ...] = ("above", "below")
"""Answers to "Is the X above or below the Y?"."""
COUNT_WORDS: tuple[str, ...] = tuple(str(n) for n in range(10))
"""Answers to "How many X are there?" (counts are capped at 9, as the count tokens are)."""
YES_NO_WORDS: tuple[str, ...] = ("yes", "no")
"""Answers to "Are there more X than Y?" / "Are there fewer X than Y?"."""
_EXTREMES = ("largest", "smallest")


@dataclass(frozen=True)
class Vocabulary:
    """The detector's names (from the checkpoint's config): what a description can say."""

    classes: tuple[str, ...]
    colours: tuple[str, ...] = ()
    sizes: tuple[str, ...] = ()

    @classmethod
    def of(cls, config) -> "Vocabulary":
        return cls(tuple(getattr(config, "object_classes", ()) or ()),
                   tuple(getattr(config, "colour_names", ()) or ()),
                   tuple(getattr(config, "size_names", ()) or ()))


@dataclass(frozen=True)
class Description:
    """One object (or, ``plural``, every object of a class) as a question describes it."""

    cls: int
    colour: int | None = None
    size: int | None = None
    extreme: str | None = None          # "largest" | "smallest"
    plural: bool = False

    def class_only(self) -> "Description":
        return Description(self.cls, plural=self.plural)


def _alternation(names: tuple[str, ...]) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


def describe(text: str, vocab: Vocabulary) -> list[Description]:
    """The objects ``text`` describes, in the order it names them: each class name with the
    colour / size / largest-smallest words right before it ("Is the small red building left of
    the largest ship?" -> [building (small, red), ship (largest)]); a plural or "all" / "every"
    makes it a request for every object of the class."""
    if not text or not vocab.classes:
        return []
    low = text.lower()
    modifiers = [w for w in vocab.colours + vocab.sizes + _EXTREMES if w]
    mod = rf"(?:(?:{_alternation(tuple(modifiers))})\s+)*" if modifiers else ""
    pattern = re.compile(rf"\b(all\s+|every\s+)?((?:{mod}))({_alternation(vocab.classes)})(s?)\b")
    out = []
    for m in pattern.finditer(low):
        words = m.group(2).split()
        colour = next((vocab.colours.index(w) for w in words if w in vocab.colours), None)
        size = next((vocab.sizes.index(w) for w in words if w in vocab.sizes), None)
        extreme = next((w for w in words if w in _EXTREMES), None)
        out.append(Description(vocab.classes.index(m.group(3)), colour, size, extreme,
                               plural=bool(m.group(1) or m.group(4))))
    return out


def asked_attribute(question: str) -> str | None:
    """What a VQA question asks of the objects it describes: "colour", "side" (left or right of
    another), "height" (above or below another), "place" (where in the image), "count", "more" /
    "fewer" (whether the first class outnumbers / is outnumbered by the second), or None."""
    low = (question or "").lower()
    if re.match(r"\s*(how many|count the|what is the number of)\b", low):
        return "count"
    compared = re.match(r"\s*are there (more|fewer)\b", low)
    if compared:
        return compared.group(1)
    if re.search(r"\bcolou?r\b", low):
        return "colour"
    if "left or right of" in low:
        return "side"
    if "above or below" in low:
        return "height"
    if re.match(r"\s*(where is the|in which part of the image)\b", low):
        return "place"
    return None


@lru_cache(maxsize=8)
def _answer_word_ids(tokenizer, colours: tuple[str, ...]) -> dict[str, list[int]]:
    """The token ids of every answer word the evidence can rule out, spelt alone and after a
    space (one tokenizer per loaded model: worked out once, not per ask)."""
    out: dict[str, list[int]] = {}
    for w in set(colours) | set(PLACE_WORDS) | set(SIDE_WORDS) | set(HEIGHT_WORDS) | set(COUNT_WORDS) | set(YES_NO_WORDS):
        ids = set()
        for spelling in (w, " " + w):
            got = tokenizer(spelling, add_special_tokens=False)["input_ids"]
            if len(got) == 1:
                ids.add(int(got[0]))
        out[w] = sorted(ids)
    return out


@dataclass
class _Bound:
    """One batch's detections: (B, K) each, boxes (B, K, 4) normalised."""

    boxes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor
    colours: torch.Tensor | None
    sizes: torch.Tensor | None
    counts: torch.Tensor | None         # (B, n_classes): what each class's count token carries


@dataclass
class AnswerGrammar:
    """The grammar of one question's answers (one question per batch, as the pipeline asks).

    ``first_class_from_question``: an answer that opens on a reference (a VQA answer pointing at
    its evidence) has no phrase to take the class from, so the question's descriptions apply in
    order; ``level``: one of :data:`GRAMMARS`; ``attribute``: what the question asks of its
    objects (:func:`asked_attribute`), read off the evidence at level ``evidence``."""

    question: str
    vocab: Vocabulary
    tokenizer: object
    object_token_start: int
    first_class_from_question: bool = False
    attribute: str | None = None
    level: str = "evidence"
    min_listed_score: float = 0.3       # a plural listing goes on while detections this sure are left
    descriptions: list[Description] = field(init=False)
    _bound: _Bound | None = field(init=False, default=None)
    _word_ids: dict[str, list[int]] = field(init=False, default_factory=dict)   # word -> its token ids

    def __post_init__(self) -> None:
        if self.level not in GRAMMARS:
            raise ValueError(f"grammar {self.level!r}: expected one of {', '.join(GRAMMARS)}")
        self.descriptions = describe(self.question, self.vocab)
        if self.level == "classes":
            self.descriptions = [Description(d.cls) for d in self.descriptions]
        self._word_ids = _answer_word_ids(self.tokenizer, self.vocab.colours)

    def bind(self, boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor,
             colours: torch.Tensor | None = None, sizes: torch.Tensor | None = None,
             counts: torch.Tensor | None = None) -> None:
        """The batch's detections, once known (after the prefill): boxes, scores, classes,
        colour and size-word indices, and the count of each class its count token carries
        (engine.model.object_vision.class_counts)."""
        def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.cpu()

        self._bound = _Bound(boxes.float().cpu(), scores.float().cpu(), classes.cpu(), cpu(colours), cpu(sizes),
                             cpu(counts))

    # -- references ---------------------------------------------------------------------------
    def _references(self, tokens: list[int], offset: int = 0, count: int | None = None) -> list[int]:
        """The items ``tokens`` point at, in order: detections by default, or the ``count`` items
        from ``offset`` on (the count tokens after the K detections), read as every caller reads
        a reference range (:func:`reference_offsets`)."""
        k = self._bound.scores.shape[1]
        rel, ok = reference_offsets(torch.tensor(tokens, dtype=torch.long), self.object_token_start + offset,
                                    k if count is None else count)
        return rel[ok].tolist()

    def _current(self, tokens: list[int]) -> Description | None:
        """The description the next reference answers to, when it opens a group (the class of
        the phrase written since the last reference, or the question's next description)."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True) if tokens else ""
        cls = phrase_class(text, self.vocab.classes)
        refs = len(REFERENCE_RE.findall(text))
        nxt = self.descriptions[refs] if refs < len(self.descriptions) else None
        if cls is not None:
            if nxt is not None and nxt.cls == cls:
                return nxt
            return next((d for d in self.descriptions if d.cls == cls), Description(cls))
        return nxt if self.first_class_from_question else None

    def _fitting(self, row: int, desc: Description, referable: int) -> torch.Tensor:
        """(R,) detections (then count tokens, always of their class) that fit ``desc``."""
        b = self._bound
        k = b.scores.shape[1]
        n_count = referable - k
        classes = torch.cat([b.classes[row], torch.arange(n_count, dtype=b.classes.dtype)])
        ok = classes == desc.cls
        det = torch.arange(referable) < k
        if desc.colour is not None and b.colours is not None:
            ok = ok & det & torch.cat([b.colours[row] == desc.colour, torch.zeros(n_count, dtype=torch.bool)])
        if desc.size is not None and b.sizes is not None:
            ok = ok & det & torch.cat([b.sizes[row] == desc.size, torch.zeros(n_count, dtype=torch.bool)])
        if desc.extreme is not None:
            sure = ok[:k] & (b.scores[row] >= self.min_listed_score)
            if bool(sure.any()):
                area = (b.boxes[row, :, 2] - b.boxes[row, :, 0]) * (b.boxes[row, :, 3] - b.boxes[row, :, 1])
                area = area.masked_fill(~sure, float("-inf") if desc.extreme == "largest" else float("inf"))
                pick = int(area.argmax() if desc.extreme == "largest" else area.argmin())
                ok = torch.zeros(referable, dtype=torch.bool)
                ok[pick] = True
        return ok

    def preferred(self, row: int, tokens: list[int], referable: int) -> list[torch.Tensor]:
        """Masks (R,) in order of preference for a reference that opens a group: the detections
        fitting the whole description, then those of its class; empty when nothing applies."""
        if self._bound is None:
            return []
        desc = self._current(tokens)
        if desc is None:
            return []
        masks = [self._fitting(row, desc, referable)]
        if desc != desc.class_only():
            masks.append(self._fitting(row, desc.class_only(), referable))
        return masks

    def must_list_more(self, row: int, tokens: list[int]) -> bool:
        """A request for every object of a class ("airplanes", "all ships") goes on listing
        while detections of the class scoring ``min_listed_score`` or more are left: the answer
        then agrees with the count the model gives for the class (its count token counts those)."""
        if self._bound is None or not tokens:
            return False
        last = self._references(tokens[-1:])
        if not last:
            return False
        b = self._bound
        cls = int(b.classes[row, last[0]])
        if not any(d.plural and d.cls == cls for d in self.descriptions):
            return False
        left = (b.classes[row] == cls) & (b.scores[row] >= self.min_listed_score)
        left[self._references(tokens)] = False
        return bool(left.any())

    # -- answer words ---------------------------------------------------------------------------
    def evidence_word(self, row: int, tokens: list[int]) -> tuple[tuple[str, ...], str] | None:
        """(the words that answer the question, the one the evidence pointed at so far gives),
        or None when the question asks no attribute or the evidence is not written yet."""
        if self.level != "evidence" or self.attribute is None or self._bound is None:
            return None
        b = self._bound
        if self.attribute in ("count", "more", "fewer"):
            return self._count_word(row, tokens)
        refs = self._references(tokens)
        if not refs:
            return None
        first = refs[0]
        if self.attribute == "colour":
            if b.colours is None or not self.vocab.colours:
                return None
            return self.vocab.colours, self.vocab.colours[int(b.colours[row, first])]
        cx = (b.boxes[row, :, 0] + b.boxes[row, :, 2]) / 2
        cy = (b.boxes[row, :, 1] + b.boxes[row, :, 3]) / 2
        if self.attribute == "place":
            return PLACE_WORDS, position_word(float(cx[first]), float(cy[first]), 1.0, decided=True)
        if len(refs) < 2:
            return None
        second = refs[1]
        if self.attribute == "side":
            return SIDE_WORDS, "left" if float(cx[first]) < float(cx[second]) else "right"
        if self.attribute == "height":
            return HEIGHT_WORDS, "above" if float(cy[first]) < float(cy[second]) else "below"
        return None

    def _count_word(self, row: int, tokens: list[int]) -> tuple[tuple[str, ...], str] | None:
        """A counting answer points at the count token of its class first (``<obj K+c> 3``):
        the number is the count that token carries; a comparison points at the count tokens of
        both classes (``<obj K+a> and <obj K+b> yes``): the answer is what their counts say."""
        b = self._bound
        if b.counts is None:
            return None
        counted = self._references(tokens, offset=b.scores.shape[1], count=b.counts.shape[1])
        if self.attribute == "count":
            if not counted:
                return None
            return COUNT_WORDS, COUNT_WORDS[min(int(b.counts[row, counted[0]]), len(COUNT_WORDS) - 1)]
        if len(counted) < 2:
            return None
        first, second = int(b.counts[row, counted[0]]), int(b.counts[row, counted[1]])
        holds = first > second if self.attribute == "more" else first < second
        return YES_NO_WORDS, "yes" if holds else "no"

    def banned_words(self, row: int, tokens: list[int]) -> list[int]:
        """Token ids of the answer words the evidence rules out."""
        got = self.evidence_word(row, tokens)
        if got is None:
            return []
        words, word = got
        return [i for w in words if w != word for i in self._word_ids.get(w, [])]
