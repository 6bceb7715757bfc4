r"""Response parsing shared by every verifier: PAPO's whitespace normalisation, format check and last-box extraction.

The official reward (EasyR1 ``examples/reward_function/math.py``) uses ``re.sub(r"\s*(<|>|/)\s*", r"\1", text)``
and ``re.fullmatch(r"<think>.*</think>.*\\boxed\{.*\}.*", text, re.DOTALL)``. Both backtrack on adversarial
output: the first is quadratic in a whitespace run (40k spaces: 11 s), the second cubic in repeated tags
(2k ``</think>\boxed{``: 13 s) [measured, Python 3.11]. The functions below compute the same results in linear
time (tests/test_rewards.py checks them against the regexes on random strings), so a 1 MB response costs
milliseconds and nothing needs truncating except the box content, which is capped before any grader sees it.
"""

from __future__ import annotations

import re

OFFICIAL_WHITESPACE = r"\s*(<|>|/)\s*"
OFFICIAL_FORMAT = r"<think>.*</think>.*\\boxed\{.*\}.*"
MAX_ANSWER_CHARS = 2048  # a longer \boxed{} is graded as no answer: no real answer is this long

BOX = "\\boxed{"
_WS_AFTER_DELIM = re.compile(r"([<>/])\s+")  # starts with a character class: the engine skips to candidates
_BOXED_NONE = re.compile(r"\\boxed\{\s*None\s*\}")


def normalize_response(text: str) -> str:
    """Drop whitespace next to ``<``, ``>`` and ``/`` ("to handle qwen2.5vl-32b format"), as the official code does.

    The official substitution removes exactly the whitespace runs adjacent to one of those characters; runs after
    one are found directly, runs before one by running the same pattern over the reversed string.
    """
    text = _WS_AFTER_DELIM.sub(r"\1", text)
    return _WS_AFTER_DELIM.sub(r"\1", text[::-1])[::-1]


def format_ok(text: str) -> bool:
    """``re.fullmatch(OFFICIAL_FORMAT, text, re.DOTALL)`` without backtracking (``text`` already normalised).

    ``.*`` matches anything, so the full match exists iff the text starts with ``<think>`` and ``</think>``,
    ``\boxed{`` and ``}`` occur in that order after it; the earliest occurrence of each is the best choice.
    """
    if not text.startswith("<think>"):
        return False
    end = text.find("</think>", len("<think>"))
    if end < 0:
        return False
    box = text.find(BOX, end + len("</think>"))
    return box >= 0 and text.find("}", box + len(BOX)) >= 0


def extract_answer(text: str, max_chars: int = MAX_ANSWER_CHARS) -> str | None:
    r"""Content of the last ``\boxed{...}`` by mathruler's ``extract_boxed_content``, or None.

    None when there is no box, the last box is never closed, or its content is longer than ``max_chars``. Only
    the text from the last ``\boxed{`` on, up to ``max_chars`` further, is searched, so the brace scan (a Python
    loop inside mathruler) is bounded whatever the response length.
    """
    from mathruler.grader import extract_boxed_content

    start = text.rfind(BOX)
    if start < 0:
        return None
    window = text[start : start + len(BOX) + max_chars + 1]
    content = extract_boxed_content(window)
    if content == "None" and not _BOXED_NONE.match(window):
        return None  # mathruler's "not found" marker, not a boxed "None"
    return content


def mathruler_answer(answer: str | None) -> str:
    """What PAPO passes to ``grade_answer``: mathruler's literal ``"None"`` when no box was found."""
    return "None" if answer is None else answer
