"""A weighted, resumable stream of training samples mixed from several data sets in their
published formats (the data half of fine-tuning on a user's own labelled imagery).

Why: fine-tuning mixes sources (say DIOR-RSVG referring twice as often as a scene folder, plus a
GeoChat instruction file), must be reproducible, and must resume after an interruption at the
very sample where it stopped.  Every sample's position is a pure function of ``(seed, index)``:
source ``i`` is drawn with probability proportional to its weight, and each source is walked
through a fresh permutation per epoch, so no item repeats before its source is exhausted and
``samples(start=k)`` continues a run that stopped after ``k`` samples.

Items come from the evaluator's readers (:mod:`engine.data.benchmark_formats`) and are turned
into training :class:`~engine.data.instructions.Sample` objects with the **same questions the
evaluator asks** the backend family (:data:`engine.lab.dataset_eval.PROMPTS`), so a before/after
comparison measures what was trained.  (LLaVA / GeoChat instruction JSON is read for training by
:func:`engine.data.real_datasets.load_llava_json`; it is not one of this stream's formats yet.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from engine.grounding import format_grounded

from .benchmark_formats import BenchItem, read_benchmark
from .instructions import Sample
from .real_datasets import canonical_object_name, canonical_scene_name, load_image

__all__ = ["Source", "parse_sources", "item_sample", "MixedStream"]


@dataclass
class Source:
    """One data set of the mix: ``FORMAT:PATH``, its relative weight and split."""

    spec: str
    weight: float = 1.0
    split: str | None = "train"


def parse_sources(entries: Sequence[str | dict]) -> list[Source]:
    """Config ``data`` entries -> sources: ``"dior-rsvg:/data/DIOR"`` or ``{"dataset": ...,
    "weight": 2, "split": "train"}``; weights must be positive."""
    sources = []
    for entry in entries:
        if isinstance(entry, str):
            source = Source(entry)
        else:
            source = Source(str(entry["dataset"]), float(entry.get("weight", 1.0)), entry.get("split", "train"))
        if not source.weight > 0:
            raise ValueError(f"weight of {source.spec} must be positive, got {source.weight}")
        sources.append(source)
    if not sources:
        raise ValueError("the data mix needs at least one source")
    return sources


def item_sample(item: BenchItem, classes: Sequence[str], image: np.ndarray, rng: np.random.Generator,
                family: str = "rs_lvlm") -> Sample:
    """A benchmark item as a training sample: the evaluator's question for the backend ``family``
    and the reference as answer (boxes written on the integer grid, a caption drawn from the refs)."""
    from engine.lab.dataset_eval import request_for

    task, question = request_for(family, item, classes)
    objects: list[str] = []
    if item.task == "ground":
        groups: dict[str, list] = {}
        for box in item.boxes:
            label = canonical_object_name(box.label) or box.label or "object"
            groups.setdefault(label, []).append(box)
        answer = format_grounded(list(groups.items()))
        objects = [k for k in groups if canonical_object_name(k)]
    elif item.task == "caption":
        answer = item.references[int(rng.integers(len(item.references)))]
    else:
        answer = item.references[0]
    scene = canonical_scene_name(answer) if item.task == "classify" else None
    return Sample(image, task, question, answer, item.qtype,
                  {"scene": [scene] if scene else [], "object": objects, "region": []},
                  boxes=list(item.boxes), meta={"source": str(item.image), "key": item.key})


class MixedStream:
    """Samples ``start, start + 1, ...`` of the weighted mix (deterministic in ``seed``)."""

    def __init__(self, sources: Sequence[Source], seed: int = 0, image_size: int = 128,
                 family: str = "rs_lvlm") -> None:
        self.sources = list(sources)
        self.seed, self.image_size, self.family = seed, image_size, family
        self._sets = []
        for source in self.sources:
            bench = read_benchmark(source.spec, source.split)
            self._sets.append((bench.items, bench.classes))
        weights = np.array([s.weight for s in self.sources], dtype=np.float64)
        self._cdf = np.cumsum(weights / weights.sum())

    def __len__(self) -> int:
        return sum(len(items) for items, _ in self._sets)

    def source_order(self, count: int) -> np.ndarray:
        """Which source each of the first ``count`` samples comes from (a longer order starts with
        the shorter one: the uniforms are drawn in sequence)."""
        u = np.random.default_rng([self.seed, 0]).random(count)
        return np.minimum(np.searchsorted(self._cdf, u, side="right"), len(self.sources) - 1)

    def positions(self, start: int, count: int) -> list[tuple[int, int]]:
        """(source, item) of samples ``start .. start + count - 1``: each source's next item in the
        permutation of its current epoch."""
        order = self.source_order(start + count)
        seen = np.bincount(order[:start], minlength=len(self.sources))
        perms: dict[tuple[int, int], np.ndarray] = {}
        out = []
        for s in order[start:]:
            s = int(s)
            n = len(self._sets[s][0])
            epoch, pos = divmod(int(seen[s]), n)
            if (s, epoch) not in perms:
                perms[(s, epoch)] = np.random.default_rng([self.seed, 1, s, epoch]).permutation(n)
            out.append((s, int(perms[(s, epoch)][pos])))
            seen[s] += 1
        return out

    def samples(self, start: int = 0, count: int | None = None, chunk: int = 1024) -> Iterator[Sample]:
        """Yield samples from ``start`` on (endless when ``count`` is None)."""
        index = start
        while count is None or index < start + count:
            step = chunk if count is None else min(chunk, start + count - index)
            for offset, (s, i) in enumerate(self.positions(index, step)):
                items, classes = self._sets[s]
                rng = np.random.default_rng([self.seed, 2, index + offset])
                image = load_image(items[i].image, self.image_size)[0]
                yield item_sample(items[i], classes, image, rng, self.family)
            index += step
