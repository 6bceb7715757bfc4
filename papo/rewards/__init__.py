r"""Rewards and answer verifiers: PAPO's math reward, typed verifiers, and sandboxed grading of untrusted output.

A reward function has the signature

    fn(response: str, answer: str, answer_type: str = "math", meta: dict | None = None, **kwargs) -> dict[str, float]

and returns at least ``overall`` (the scalar the trainer writes at the last response token); every other numeric
key is a metric. The built-in ones return ``overall``, ``accuracy``, ``format`` and ``answer`` (the extracted
string, not a metric):

    from papo.rewards import score_responses, papo_math
    papo_math("<think>...</think> \\boxed{3}", "3", "int")        # {'overall': 1.0, 'accuracy': 1.0, 'format': 1.0, ...}
    score_responses(responses, answers, answer_types, metas, reward="papo_math")   # what the trainer calls
    score_responses(..., reward="my_rewards.py:score")                             # a user's function

- ``papo_math``: the official reward (EasyR1 ``math.py``): whitespace around ``<>/`` dropped, format = the
  response fully matches ``<think>.*</think>.*\boxed{.*}.*``, accuracy from the last ``\boxed{}``, overall =
  0.9 accuracy + 0.1 format; the answer is graded by the sample's ``answer_type`` (``math``: mathruler, as PAPO;
  ``int``/``choice``/``multi_choice``/``word``/``exact``: papo.rewards.verifiers, no sympy).
- ``math_only``: the same with mathruler for every answer, as PAPO-Eval scores benchmarks.

mathruler evaluates text through sympy's ``parse_expr`` (Python ``eval``); model output can run code through it
(papo.rewards.guard has the audit). Math answers are therefore graded in worker processes (papo.rewards.pool)
that refuse non-math text, are killed after ``timeout`` seconds and cap their memory; typed answers never reach
sympy. Nothing here imports torch or transformers; mathruler and sympy are imported on first use.
"""

from papo.rewards.functions import (
    ANSWER_TYPES,
    FORMAT_WEIGHT,
    REWARDS,
    RewardFunction,
    RewardSpecError,
    get_reward,
    grade,
    load_reward,
    math_only,
    papo_math,
    register_reward,
    score_responses,
)
from papo.rewards.pool import (
    STATS,
    GraderConfig,
    configure,
    current_config,
    get_pool,
    grade_math_many,
    shutdown,
    warm_up,
)
from papo.rewards.text import MAX_ANSWER_CHARS, extract_answer, format_ok, normalize_response
from papo.rewards.verifiers import (
    TYPED_VERIFIERS,
    parse_choice,
    parse_int,
    parse_letter_set,
    verify_choice,
    verify_exact,
    verify_int,
    verify_multi_choice,
    verify_word,
)

__all__ = [
    "ANSWER_TYPES", "FORMAT_WEIGHT", "MAX_ANSWER_CHARS", "REWARDS", "STATS", "TYPED_VERIFIERS",
    "GraderConfig", "RewardFunction", "RewardSpecError",
    "configure", "current_config", "extract_answer", "format_ok", "get_pool", "get_reward", "grade", "grade_math_many",
    "load_reward", "math_only", "normalize_response", "papo_math", "parse_choice", "parse_int", "parse_letter_set",
    "register_reward", "score_responses", "shutdown", "verify_choice", "verify_exact", "verify_int",
    "verify_multi_choice", "verify_word", "warm_up",
]
