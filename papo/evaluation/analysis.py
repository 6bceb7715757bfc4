"""Perception vs reasoning errors, classified exactly instead of by an LLM judge (the paper's Figure 1).

Every synthetic scene knows its ground truth (``Sample.meta["facts"]``, e.g. ``{"objects": 9, "red objects":
4}``) and its reasoning traces state what was perceived in a fixed form (``<think>seen: objects=9, red
objects=4. 9-4=5.</think>``). A response's stated facts are parsed and compared with the scene's:

  correct      right answer, every stated fact right
  lucky_guess  right answer, some fact missing or wrong
  perception   wrong answer, some fact missing or wrong (the model misread the image)
  reasoning    wrong answer, every fact right (it read the image and then erred)
  format       no parseable ``seen:`` facts or no ``\\boxed{}`` answer

"Every fact" means those the answer follows from (``meta["answer_facts"]``) where a scene names fewer than
all: a clock's answer is its hour hand, and a misread minute hand beside it is neither a perception error
nor a lucky guess.

The paper's headline number is ``perception`` as a share of all wrong answers (67% for GRPO, by its judge).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

CLASSES = ("correct", "lucky_guess", "perception", "reasoning", "format")
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_SEEN = re.compile(r"seen:\s*(.*?)\.(?:\s|$)", re.DOTALL)


def stated_facts(response: str) -> dict[str, str] | None:
    """The ``seen: k=v, k=v.`` facts of a response's ``<think>`` block (the whole text if it has none);
    None when there is no such clause or a part of it is not ``k=v``."""
    think = _THINK.search(response)
    match = _SEEN.search(think.group(1) if think else response)
    if not match:
        return None
    facts = {}
    for part in match.group(1).split(","):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            return None
        facts[_norm(key)] = _norm(value)
    return facts


def _norm(text: Any) -> str:
    return " ".join(str(text).lower().split())


def classify(response: str, facts: Mapping[str, Any], correct: bool, formatted: bool,
             answer_facts: Iterable[str] = ()) -> str:
    """One response's class (see the module doc); ``facts`` is the scene's ground truth, ``answer_facts`` the
    keys of it the answer follows from (empty: all)."""
    stated = stated_facts(response)
    if not formatted or stated is None:
        return "format"
    judged = {k: facts[k] for k in answer_facts} if answer_facts else facts
    facts_right = all(stated.get(_norm(k)) == _norm(v) for k, v in judged.items())
    if correct:
        return "correct" if facts_right else "lucky_guess"
    return "reasoning" if facts_right else "perception"


def breakdown(classes: Iterable[str], correct: Iterable[bool]) -> dict[str, Any]:
    """Counts and shares of each class, and perception errors as a share of wrong answers (``correct``: each
    response's answer, in the same order). A ``format`` response may still box the right answer (its trace
    unreadable), so wrong answers are counted from the answers, not from the classes."""
    classes, correct = list(classes), list(correct)
    if len(classes) != len(correct):
        raise ValueError(f"{len(classes)} classes for {len(correct)} answers")
    counts = Counter(classes)
    total = len(classes)
    wrong = correct.count(False)
    return {"responses": total, "wrong_answers": wrong, "counts": {c: counts[c] for c in CLASSES},
            "shares": {c: counts[c] / total if total else 0.0 for c in CLASSES},
            "perception_share_of_errors": counts["perception"] / wrong if wrong else 0.0,
            "reasoning_share_of_errors": counts["reasoning"] / wrong if wrong else 0.0}
