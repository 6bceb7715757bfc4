"""The embedded default dataset: procedurally generated, vision-dependent tasks (PIL + numpy, no downloads).

Every sample is a pure function of (task, split, seed, index): splits use disjoint random streams, answers
are balanced over each family's answer space, the question text is shared by many images, and each sample
carries a short reasoning trace (``meta["solution"]``) for supervised warm-start plus the scene's ground-truth
facts (``meta["facts"]``).

    from papo.data.synthetic import SyntheticDataset
    ds = SyntheticDataset("all", split="train", n=1000)      # a lazy Sequence[Sample]
    ds = dataset_from_spec("synthetic:count+maze?split=val&n=200&grid=8")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl

from papo.data.sample import IMAGE_PLACEHOLDER, Sample
from papo.data.synthetic.charts import BarChart, Clock, TriangleAngle
from papo.data.synthetic.common import SPLITS, Scene, check_size, rng_for
from papo.data.synthetic.maze import Maze
from papo.data.synthetic.scenes import Closest, Count, CountSubtract, Family
from papo.errors import UserError

FAMILIES: dict[str, Family] = {f.name: f for f in (Count(), CountSubtract(), Closest(), BarChart(), TriangleAngle(), Maze(), Clock())}
DEFAULT_SIZE = 448
SPEC_PREFIX = "synthetic:"


def resolve_tasks(tasks: str | Sequence[str]) -> list[str]:
    names = list(FAMILIES) if tasks == "all" else ([tasks] if isinstance(tasks, str) else list(tasks))
    names = [t for name in names for t in str(name).split("+")]
    unknown = [t for t in names if t not in FAMILIES]
    if unknown or not names:
        raise UserError(f"unknown synthetic task {unknown or tasks!r}; choose from all, {', '.join(FAMILIES)}")
    return names


def make_scene(task: str, split: str, seed: int, index: int, **knobs: int) -> Scene:
    """The content of one sample, without drawing it. The ``shortcut`` knob acts on the train split only."""
    if split != "train":
        knobs = {k: v for k, v in knobs.items() if k != "shortcut"}
    return FAMILIES[task].scene(rng_for(task, split, seed, index, stream=0), **knobs)


def make_sample(task: str, split: str = "train", seed: int = 0, index: int = 0, size: int = DEFAULT_SIZE, **knobs: int) -> Sample:
    family = FAMILIES[task]
    scene = make_scene(task, split, seed, index, **knobs)
    image = family.render(scene, check_size(size), rng_for(task, split, seed, index, stream=1))
    meta: dict[str, Any] = {"solution": scene.solution, "facts": scene.facts, "split": split, "seed": seed, "index": index}
    if scene.vocabulary:
        meta["vocabulary"] = list(scene.vocabulary)
    if scene.cued is not None:
        meta["cued_answer"] = scene.cued
    if scene.answer_facts:
        meta["answer_facts"] = list(scene.answer_facts)
    return Sample(
        id=f"{task}-{split}-s{seed}-{index:06d}",
        prompt=IMAGE_PLACEHOLDER + scene.question,
        answer=scene.answer,
        images=[image],
        answer_type=scene.answer_type,
        task=task,
        meta=meta,
    )


class SyntheticDataset(Sequence):
    """``n`` samples cycling over ``tasks`` (sample i is task i % len(tasks)), generated on access."""

    def __init__(self, tasks: str | Sequence[str] = "all", split: str = "train", n: int = 1000, seed: int = 0,
                 size: int = DEFAULT_SIZE, **knobs: int) -> None:
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        if n < 1:
            raise UserError(f"n must be >= 1, got {n}")
        self.tasks, self.split, self.n, self.seed, self.size = resolve_tasks(tasks), split, n, seed, check_size(size)
        unused = set(knobs) - {k for t in self.tasks for k in FAMILIES[t].knobs}
        if unused:
            known = {t: FAMILIES[t].knobs for t in self.tasks}
            raise UserError(f"unknown knob(s) {sorted(unused)} for tasks {self.tasks}; knobs: {known}")
        self.knobs = {t: {k: v for k, v in knobs.items() if k in FAMILIES[t].knobs} for t in self.tasks}
        for t in self.tasks:
            try:
                FAMILIES[t].check_knobs(self.knobs[t])
            except ValueError as e:
                raise UserError(str(e)) from None

    def __len__(self) -> int:
        return self.n

    def locate(self, i: int) -> tuple[str, int]:
        """(task, per-task index) of sample i."""
        return self.tasks[i % len(self.tasks)], i // len(self.tasks)

    def scene(self, i: int) -> Scene:
        task, j = self.locate(i)
        return make_scene(task, self.split, self.seed, j, **self.knobs[task])

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        task, j = self.locate(i % self.n)
        return make_sample(task, self.split, self.seed, j, self.size, **self.knobs[task])

    def __repr__(self) -> str:
        return f"SyntheticDataset(tasks={'+'.join(self.tasks)}, split={self.split}, n={self.n}, seed={self.seed}, size={self.size})"


def dataset_from_spec(spec: str, **defaults: Any) -> SyntheticDataset:
    """``synthetic:TASKS[?split=..&n=..&seed=..&size=..&KNOB=..]`` with TASKS = all or names joined by '+'."""
    if not spec.startswith(SPEC_PREFIX):
        raise UserError(f"not a synthetic spec: {spec!r}")
    tasks, _, query = spec[len(SPEC_PREFIX):].partition("?")
    options: dict[str, Any] = dict(defaults)
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        options[key] = value if key in ("split",) else _int(spec, key, value)
    return SyntheticDataset(tasks or "all", **options)


def _int(spec: str, key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{spec}: option {key}={value!r} must be an integer") from None


__all__ = ["DEFAULT_SIZE", "FAMILIES", "Family", "Scene", "SyntheticDataset", "dataset_from_spec", "make_sample", "make_scene", "resolve_tasks"]
