"""Reward functions, their registry, user-supplied reward files, and the batch entry point the trainer calls."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from papo.errors import UserError
from papo.rewards.pool import grade_math_many
from papo.rewards.text import extract_answer, format_ok, mathruler_answer, normalize_response
from papo.rewards.verifiers import TYPED_VERIFIERS

# papo.data.sample.ANSWER_TYPES, repeated so importing rewards does not import the data stack (tests check equality)
ANSWER_TYPES = ("math", "int", "choice", "multi_choice", "word", "exact")
FORMAT_WEIGHT = 0.1  # official format_weight: overall = 0.9 * accuracy + 0.1 * format

RewardFunction = Callable[..., Mapping[str, Any]]


class RewardSpecError(UserError):
    """A reward name or ``path/to/file.py:function`` spec that cannot be used."""


def _score(
    responses: Sequence[str],
    answers: Sequence[str],
    answer_types: Sequence[str],
    metas: Sequence[Mapping[str, Any] | None],
    typed: bool,
    format_weight: float,
) -> list[dict[str, Any]]:
    """Shared body of the built-in rewards: typed answers inline, all math answers in one pool round."""
    rows: list[list[Any]] = []  # [accuracy | None, format, answer]
    math_pairs: list[tuple[str, str]] = []
    math_rows: list[int] = []
    for i, (response, gold, kind, meta) in enumerate(zip(responses, answers, answer_types, metas)):
        if not isinstance(response, str) or not isinstance(gold, str):
            raise TypeError(f"response and answer must be str, got {type(response).__name__} and {type(gold).__name__}")
        if typed and kind not in ANSWER_TYPES:  # math_only grades everything with mathruler, whatever the type
            raise UserError(f"unknown answer_type {kind!r}; choose from {', '.join(ANSWER_TYPES)}")
        text = normalize_response(response)
        pred = extract_answer(text)
        fmt = 1.0 if format_ok(text) else 0.0
        if typed and kind != "math":
            acc: float | None = 1.0 if TYPED_VERIFIERS[kind](pred, gold, meta or {}) else 0.0
        else:
            acc = None
            math_pairs.append((mathruler_answer(pred), gold))
            math_rows.append(i)
        rows.append([acc, fmt, pred])
    for i, ok in zip(math_rows, grade_math_many(math_pairs)):
        rows[i][0] = 1.0 if ok else 0.0
    return [
        {"overall": (1 - format_weight) * acc + format_weight * fmt, "accuracy": acc, "format": fmt,
         "answer": pred if pred is not None else ""}
        for acc, fmt, pred in rows
    ]


def papo_math(
    response: str, answer: str, answer_type: str = "math", meta: Mapping[str, Any] | None = None,
    *, format_weight: float = FORMAT_WEIGHT,
) -> dict[str, Any]:
    """PAPO's reward (0.9 accuracy + 0.1 format) with the answer graded by its type's verifier; math by mathruler.

    Returns ``overall``, ``accuracy``, ``format`` (floats) and ``answer`` (the last ``\\boxed{}`` content, "" if none).
    """
    return _score([response], [answer], [answer_type], [meta], True, format_weight)[0]


def math_only(
    response: str, answer: str, answer_type: str = "math", meta: Mapping[str, Any] | None = None,
    *, format_weight: float = FORMAT_WEIGHT,
) -> dict[str, Any]:
    """The official reward exactly: every answer, whatever its type, graded by mathruler (as PAPO-Eval scores)."""
    return _score([response], [answer], [answer_type], [meta], False, format_weight)[0]


def _batched(typed: bool) -> Callable[..., list[dict[str, Any]]]:
    def batch(responses: Sequence[str], answers: Sequence[str], answer_types: Sequence[str],
              metas: Sequence[Mapping[str, Any] | None], format_weight: float = FORMAT_WEIGHT) -> list[dict[str, Any]]:
        return _score(responses, answers, answer_types, metas, typed, format_weight)

    return batch


# score_responses uses .batch when a reward has one: one pool round for the whole batch instead of one per response
papo_math.batch = _batched(True)  # type: ignore[attr-defined]
math_only.batch = _batched(False)  # type: ignore[attr-defined]

REWARDS: dict[str, RewardFunction] = {"papo_math": papo_math, "math_only": math_only}


def register_reward(name: str, fn: RewardFunction) -> None:
    if not callable(fn):
        raise RewardSpecError(f"reward {name!r} is not callable")
    REWARDS[name] = fn


def load_reward(spec: str) -> RewardFunction:
    """Import ``function`` from ``path/to/file.py`` given as ``"path/to/file.py:function"``.

    This executes that file: call it only with a spec the user typed (a CLI flag or config), never with text
    taken from a dataset.
    """
    path_text, sep, name = spec.rpartition(":")
    if not sep or not path_text or not name:
        raise RewardSpecError(f"reward spec {spec!r} is not 'path/to/file.py:function'")
    path = Path(path_text).expanduser()
    if path.suffix != ".py":
        raise RewardSpecError(f"reward spec {spec!r}: {path} is not a .py file")
    if not path.is_file():
        raise RewardSpecError(f"reward spec {spec!r}: no such file {path}")
    module_name = "papo_user_reward_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise RewardSpecError(f"reward spec {spec!r}: cannot import {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, name):
        defined = sorted(k for k, v in vars(module).items() if inspect.isfunction(v) and v.__module__ == module_name)
        raise RewardSpecError(f"reward spec {spec!r}: {path} defines no {name!r} (functions there: {defined})")
    fn = getattr(module, name)
    if not callable(fn):
        raise RewardSpecError(f"reward spec {spec!r}: {name} is a {type(fn).__name__}, not a function")
    return fn


def get_reward(spec: str | RewardFunction) -> RewardFunction:
    """A registered name (``papo_math``, ``math_only``, ...), a ``file.py:function`` spec, or a callable."""
    if callable(spec):
        return spec
    if spec in REWARDS:
        return REWARDS[spec]
    if ":" in spec:
        return load_reward(spec)
    raise RewardSpecError(f"unknown reward {spec!r}; choose from {', '.join(REWARDS)} or give 'path/to/file.py:function'")


def score_responses(
    responses: Sequence[str],
    answers: Sequence[str],
    answer_types: Sequence[str] | None = None,
    metas: Sequence[Mapping[str, Any] | None] | None = None,
    reward: str | RewardFunction = "papo_math",
    **reward_kwargs: Any,
) -> list[dict[str, Any]]:
    """One reward dict per response (``overall`` at least); ``answer_types`` default to math, ``metas`` to {}.

    Built-in rewards grade the whole batch at once (math answers spread over the worker pool); a user function
    is called once per response with ``(response, answer, answer_type, meta, **reward_kwargs)``.
    """
    n = len(responses)
    answer_types = list(answer_types) if answer_types is not None else ["math"] * n
    metas = list(metas) if metas is not None else [None] * n
    if not len(answers) == len(answer_types) == len(metas) == n:
        raise ValueError(f"lengths differ: {n} responses, {len(answers)} answers, "
                         f"{len(answer_types)} answer_types, {len(metas)} metas")
    fn = get_reward(reward)
    batch = getattr(fn, "batch", None)
    if batch is not None:
        return batch(list(responses), list(answers), answer_types, metas, **reward_kwargs)
    out = []
    for response, answer, kind, meta in zip(responses, answers, answer_types, metas):
        result = fn(response, answer, kind, meta or {}, **reward_kwargs)
        if not isinstance(result, Mapping) or "overall" not in result:
            raise RewardSpecError(f"reward {getattr(fn, '__name__', fn)!r} returned {result!r}; it must return a "
                                  "dict with at least 'overall'")
        out.append(dict(result))
    return out


def grade(response: str, answer: str, answer_type: str = "math", meta: Mapping[str, Any] | None = None) -> bool:
    """Is the last ``\\boxed{}`` of ``response`` right? (papo_math's accuracy, for evaluation code.)"""
    return papo_math(response, answer, answer_type, meta)["accuracy"] == 1.0
