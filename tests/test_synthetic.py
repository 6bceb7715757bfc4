import hashlib
import json
from collections import Counter, defaultdict

import numpy as np
import pytest

from papo.data.images import MAX_PIXELS, MIN_PIXELS
from papo.data.sample import IMAGE_PLACEHOLDER, PAPO_FORMAT_SUFFIX
from papo.data.synthetic import FAMILIES, SyntheticDataset, dataset_from_spec, make_sample, make_scene
from papo.data.synthetic.common import COLOURS
from papo.errors import UserError

TASKS = list(FAMILIES)


def _digest(sample):
    return hashlib.sha1(np.asarray(sample.images[0]).tobytes()).hexdigest()


def test_at_least_six_families_with_the_required_kinds():
    assert len(FAMILIES) >= 6
    assert {"count", "count_subtract", "closest", "bar_chart", "triangle", "maze"} <= set(FAMILIES)


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_per_seed_and_index(task):
    a, b = make_sample(task, "train", 3, 17), make_sample(task, "train", 3, 17)
    assert (a.id, a.prompt, a.answer, a.meta) == (b.id, b.prompt, b.answer, b.meta)
    assert _digest(a) == _digest(b)
    others = [make_sample(task, "train", 4, 17), make_sample(task, "train", 3, 18), make_sample(task, "val", 3, 17)]
    assert all(_digest(o) != _digest(a) for o in others)


@pytest.mark.parametrize("task", TASKS)
def test_sample_format(task):
    s = make_sample(task, "val", 0, 5)
    assert s.prompt.startswith(IMAGE_PLACEHOLDER) and s.prompt.count(IMAGE_PLACEHOLDER) == 1
    assert PAPO_FORMAT_SUFFIX not in s.prompt and PAPO_FORMAT_SUFFIX in s.formatted_prompt()
    w, h = s.images[0].size
    assert w % 28 == 0 and h % 28 == 0 and MIN_PIXELS <= w * h <= MAX_PIXELS
    assert s.answer in FAMILIES[task].answers and s.answer_type in ("int", "word", "choice", "exact")
    sol = s.meta["solution"]
    assert sol.startswith("<think>seen: ") and sol.endswith(f"</think> \\boxed{{{s.answer}}}")
    for key, value in s.meta["facts"].items():  # the trace states every ground-truth fact in key=value form
        assert f"{key}={value}" in sol


@pytest.mark.parametrize("task", TASKS)
def test_answers_are_balanced(task):
    counts = Counter(make_scene(task, "train", 0, i).answer for i in range(2000))
    k = len(FAMILIES[task].answers)
    assert set(counts) == set(FAMILIES[task].answers)
    expected = 2000 / k
    assert min(counts.values()) > 0.6 * expected and max(counts.values()) < 1.4 * expected, counts


@pytest.mark.parametrize("task", TASKS)
def test_vision_gate_text_only_predictor_is_near_chance(task):
    """Most frequent answer per question string, fitted on 2,000 train samples, scored on 2,000 val samples."""
    by_question = defaultdict(Counter)
    for i in range(2000):
        sc = make_scene(task, "train", 0, i)
        by_question[sc.question][sc.answer] += 1
    prior = {q: c.most_common(1)[0][0] for q, c in by_question.items()}
    val = [make_scene(task, "val", 0, i) for i in range(2000)]
    accuracy = np.mean([prior.get(sc.question) == sc.answer for sc in val])
    chance = 1 / len(FAMILIES[task].answers)
    assert accuracy <= 1.5 * chance, (accuracy, chance)
    assert len(by_question) < 100  # the question text is shared by many images


def test_splits_are_disjoint_by_content():
    digests = {split: {_digest(s) for s in SyntheticDataset("all", split=split, n=140)} for split in ("train", "val", "test")}
    assert not digests["train"] & digests["val"] and not digests["train"] & digests["test"] and not digests["val"] & digests["test"]
    assert len(digests["train"]) == 140


def test_dataset_cycles_tasks_and_supports_slicing():
    ds = SyntheticDataset("count+maze", split="test", n=5, seed=2)
    assert [s.task for s in ds] == ["count", "maze", "count", "maze", "count"]
    assert [s.id for s in ds[1:3]] == [ds[1].id, ds[2].id]
    assert ds[-1].id == ds[4].id
    with pytest.raises(IndexError):
        ds[5]


def test_spec_parsing_and_knobs():
    ds = dataset_from_spec("synthetic:maze?split=val&n=3&seed=7&size=224&grid=8")
    s = ds[0]
    assert (ds.split, len(ds), ds.seed, s.images[0].size) == ("val", 3, 7, (224, 224))
    assert len(make_scene("maze", "val", 7, 0, grid=8).layout["walls"]) == 8
    assert len(dataset_from_spec("synthetic:all")) == 1000
    for bad, match in [("synthetic:mazes", "unknown synthetic task"), ("synthetic:maze?n=x", "must be an integer"),
                       ("synthetic:maze?size=100", "multiple of 28"), ("synthetic:count?grid=8", "unknown knob"),
                       ("synthetic:maze?split=dev", "unknown split")]:
        with pytest.raises(ValueError, match=match):
            dataset_from_spec(bad)


def test_difficulty_knobs_change_content():
    easy = [len(make_scene("bar_chart", "train", 0, i, min_bars=3, max_bars=3).layout["values"]) for i in range(20)]
    hard = [len(make_scene("bar_chart", "train", 0, i, min_bars=6, max_bars=6).layout["values"]) for i in range(20)]
    assert set(easy) == {3} and set(hard) == {6}
    few = max(len(make_scene("count", "train", 0, i, max_distractors=2).layout["objects"]) for i in range(50))
    assert few <= 5 + 2


# ----------------------------------------------------------- the pixels agree with the answer


def _components(mask: np.ndarray) -> int:
    """Number of 4-connected True regions (BFS on a small mask)."""
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        seen[start] = True
        while stack:
            r, c = stack.pop()
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
    return count


def test_count_subtract_pixels_show_the_removed_objects():
    for i in range(6):
        s = make_sample("count_subtract", "test", 0, i, size=224)
        colour = s.prompt.split("Remove all ")[1].split()[0]
        pixels = np.asarray(s.images[0]).astype(int)
        mask = (np.abs(pixels - np.array(COLOURS[colour])).sum(-1) < 10)
        assert _components(mask) == s.meta["facts"][f"{colour} objects"]


def test_bar_chart_bar_heights_match_values():
    s = make_sample("bar_chart", "test", 0, 0)
    values = s.meta["facts"]
    colour = np.array(COLOURS[make_scene("bar_chart", "test", 0, 0).layout["colour"]])
    pixels = np.asarray(s.images[0]).astype(int)
    bar = np.abs(pixels - colour).sum(-1) < 10
    cols = np.nonzero(bar.any(0))[0]
    runs = np.split(cols, np.nonzero(np.diff(cols) > 1)[0] + 1)  # one run of columns per bar
    unit = 35.0  # (390 - 40) / 10 px on the 448 design grid
    heights = [round(bar[:, run[len(run) // 2]].sum() / unit) for run in runs]
    assert heights == list(values.values())


def test_maze_start_and_goal_cells_are_coloured():
    sc = make_scene("maze", "test", 0, 3)
    s = make_sample("maze", "test", 0, 3)
    n, cell, origin = len(sc.layout["walls"]), 380 / len(sc.layout["walls"]), 48
    for (r, c), rgb in ((sc.layout["start"], (40, 170, 60)), (sc.layout["goal"], (220, 40, 40))):
        centre = (int(origin + (c + 0.5) * cell), int(origin + (r + 0.5) * cell))
        assert s.images[0].getpixel(centre) == rgb
    assert n == 6


CUED = {"bar_chart", "clock"}  # one question text for every image unless cue=1 names the colour


def _cue(task):
    return {"cue": 1} if task in CUED else {}


@pytest.mark.parametrize("task", ["count", "count_subtract", "closest", "bar_chart", "clock"])
def test_shortcut_knob_makes_the_question_predict_train_answers_but_not_held_out_ones(task):
    """The vision gate's text-only predictor, fitted on train samples with shortcut=70: about 70% plus chance's
    share of the rest on train, chance on val (val and test ignore the knob and stay flat)."""
    by_question = defaultdict(Counter)
    train = [make_scene(task, "train", 0, i, shortcut=70, **_cue(task)) for i in range(2000)]
    for sc in train:
        by_question[sc.question][sc.answer] += 1
    prior = {q: c.most_common(1)[0][0] for q, c in by_question.items()}
    chance = 1 / len(FAMILIES[task].answers)
    on_train = np.mean([prior[sc.question] == sc.answer for sc in train])
    assert abs(on_train - (0.7 + 0.3 * chance)) < 0.05, on_train
    val = [make_scene(task, "val", 0, i, shortcut=70, **_cue(task)) for i in range(2000)]
    assert [sc.answer for sc in val[:50]] == [make_scene(task, "val", 0, i, **_cue(task)).answer for i in range(50)]
    assert np.mean([prior.get(sc.question) == sc.answer for sc in val]) <= 1.5 * chance
    # the scene still shows its answer: the facts (what the image holds) agree with it
    assert all(str(sc.answer) in sc.reasoning for sc in train[:200])


@pytest.mark.parametrize("task", ["count", "count_subtract", "closest", "bar_chart", "clock"])
def test_explain_knob_writes_the_reasoning_out_after_the_same_facts(task):
    from papo.evaluation.analysis import stated_facts

    for i in range(20):
        terse, long = make_scene(task, "train", 0, i), make_scene(task, "train", 0, i, explain=1)
        assert (terse.question, terse.answer, terse.facts) == (long.question, long.answer, long.facts)
        facts = terse.reasoning.split(".")[0]
        assert long.reasoning.startswith(facts + ".") and long.reasoning.endswith(f"The answer is {terse.answer}.")
        assert len(long.reasoning) > 2 * len(terse.reasoning)  # most of the trace is now reasoning
        assert stated_facts(long.solution) == stated_facts(terse.solution)  # error analysis reads the same facts


@pytest.mark.parametrize("task,pinned", [("bar_chart", "12cbfc550ca826239fad6dd4c44f4b120840790e"),
                                         ("clock", "d7aee8e6d644385d74ebe79f777ace2a0a73f685")])
def test_cue_shortcut_and_explain_knobs_at_zero_leave_samples_as_they_were(task, pinned):
    """Scenes and a rendered image as generated before these families had the knobs (the embedded default's
    data and every result measured on it stay valid)."""
    digest = hashlib.sha1()
    for i in range(30):
        sc = make_scene(task, "train", 0, i)
        digest.update(json.dumps([sc.question, sc.answer, sc.reasoning, sc.layout], sort_keys=True).encode())
    digest.update(np.asarray(make_sample(task, "test", 1, 5, size=224).images[0]).tobytes())
    assert digest.hexdigest() == pinned


@pytest.mark.parametrize("task", sorted(CUED))
def test_cue_names_the_colour_the_image_is_drawn_in(task):
    for i in range(6):
        s = make_sample(task, "test", 0, i, size=224, cue=1)
        colour = make_scene(task, "test", 0, i, cue=1).layout["colour"]
        assert f" {colour} " in s.prompt
        pixels = np.asarray(s.images[0]).astype(int)
        assert (np.abs(pixels - np.array(COLOURS[colour])).sum(-1) < 10).sum() > 200  # rim or bars in that colour


def test_shortcut_without_cue_is_refused_where_the_question_never_varies():
    with pytest.raises(UserError, match="shortcut needs cue=1"):
        dataset_from_spec("synthetic:count+clock?shortcut=60")
    assert len(dataset_from_spec("synthetic:count+clock?shortcut=60&cue=1&n=4")) == 4


@pytest.mark.parametrize("task", ["count", "count_subtract", "closest", "bar_chart", "clock"])
def test_every_split_names_the_answer_its_question_text_suggests(task):
    """``cued``: what shortcut=100 makes every train answer, recorded on the held-out splits too (where the knob
    does not act) so that an evaluation can count answers that follow the text; None where the text never varies."""
    for i in range(30):
        train = make_scene(task, "train", 0, i, shortcut=100, **_cue(task))
        assert train.answer == train.cued
        test = make_sample(task, "test", 0, i, size=224, shortcut=100, **_cue(task))
        assert test.meta["cued_answer"] == make_scene(task, "test", 0, i, **_cue(task)).cued
    held_out = [make_scene(task, "test", 0, i, **_cue(task)) for i in range(300)]
    assert np.mean([sc.answer == sc.cued for sc in held_out]) < 0.35  # right only by chance there
    if task in CUED:
        assert make_scene(task, "test", 0, 0).cued is None and "cued_answer" not in make_sample(task, "test", 0, 0, size=224).meta
