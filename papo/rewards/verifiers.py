r"""Typed verifiers: answers that sympy should never see, compared in-process in microseconds.

Each takes the extracted ``\boxed{}`` content (None: no usable box), the gold answer and the sample's ``meta``,
and returns whether the prediction is right. ``math`` answers are not here: they go to mathruler through the
sandboxed pool (papo.rewards.pool), exactly as PAPO grades them.

Why typed: mathruler is wrong for these shapes (option text vs letter, ``C, A`` vs ``A, C``, anagram-prone words
under math-verify; data-rewards-eval.md section 3.5), and skipping sympy keeps them fast and safe.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

Verifier = Callable[[str | None, str, Mapping[str, Any]], bool]

_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|textit|mathrm|mathbf|mathit|mbox|operatorname)\s*\{")
_INNER_TEXT = re.compile(r"\\(?:text|textbf|textrm|textit|mathrm|mathbf|mathit|mbox)\s*\{([^{}]*)\}")
_INT = re.compile(r"([+-]?)(\d{1,3}(?:,\d{3})+|\d+)(?:\.0*)?")
_DEGREES = re.compile(r"(?:\^\s*\{?\s*\\circ\s*\}?|°|\\degree)$")
_LETTER_ALONE = re.compile(r"\(?([A-Za-z])\)?[.:)]?")
_LETTER_THEN_TEXT = re.compile(r"(?:\(([A-Za-z])\)|([A-Za-z])[.:)])\s*\S.*", re.DOTALL)
_MULTI_SPLIT = re.compile(r"[\s,;/]+")
_MULTI_AND = re.compile(r"\band\b|\\?&", re.IGNORECASE)
_NON_WORD = re.compile(r"[\W_]+")
_MAX_UNWRAP = 8  # nesting a real answer uses; bounds the loop on adversarial {{{{…}}}}
_MAX_INT_DIGITS = 1000  # below Python's int-from-str limit (4300)
_warned: set[str] = set()


def _closing(s: str, open_at: int) -> int:
    """Index of the brace closing the one at ``open_at``, or -1."""
    depth = 0
    for i in range(open_at, len(s)):
        if s[i] == "{":
            depth += 1
        elif s[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def unwrap(s: str) -> str:
    r"""Peel ``$…$``, ``\text{…}``-style wrappers and outer braces that enclose the whole answer."""
    s = s.strip()
    for _ in range(_MAX_UNWRAP):
        t = s
        if len(t) >= 2 and t[0] == "$" and t[-1] == "$":
            t = t.strip("$").strip()
        m = _WRAPPER.match(t)
        if m and _closing(t, m.end() - 1) == len(t) - 1:
            t = t[m.end() : -1].strip()
        elif t[:1] == "{" and _closing(t, 0) == len(t) - 1:
            t = t[1:-1].strip()
        if t == s:
            break
        s = t
    return s


def _warn_once(key: str, msg: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


# ---- int -------------------------------------------------------------------------------------------------
def parse_int(s: str | None) -> int | None:
    r"""An integer written plainly: ``3``, `` +3 ``, ``-3``, ``\text{3}``, ``3.0``, ``1,000``, ``1{,}000``, ``95^\circ``.

    Anything else (``3.5``, ``three``, ``3 apples``, ``3/1``) is not an integer answer.
    """
    if s is None:
        return None
    s = unwrap(s).replace("{,}", ",").replace("\\,", ",").replace("\u2212", "-")
    s = _DEGREES.sub("", s).strip()  # angle answers ("95") are ints; a degree sign is not a different answer
    s = re.sub(r"^([+-])\s+", r"\1", s)
    m = _INT.fullmatch(s)
    if m is None or len(m.group(2)) > _MAX_INT_DIGITS:
        return None
    return int(m.group(1) + m.group(2).replace(",", ""))


def verify_int(pred: str | None, gold: str, meta: Mapping[str, Any] | None = None) -> bool:
    want = parse_int(gold)
    if want is None:
        _warn_once("int", "gold %r of an int sample is not an integer; comparing strings exactly", gold)
        return verify_exact(pred, gold)
    got = parse_int(pred)
    return got is not None and got == want


# ---- choice / multi_choice ------------------------------------------------------------------------------
def _letters_of(meta: Mapping[str, Any] | None) -> dict[str, str]:
    """Option letter -> option text, from ``meta["choices"]`` (a list in letter order, or a letter -> text map)."""
    choices = (meta or {}).get("choices")
    if isinstance(choices, Mapping):
        return {str(k).strip().upper(): str(v) for k, v in choices.items()}
    if isinstance(choices, (list, tuple)):
        return {chr(ord("A") + i): str(v) for i, v in enumerate(choices[:26])}
    return {}


def _option_key(s: str) -> str:
    s = _INNER_TEXT.sub(r"\1", unwrap(s)).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return re.sub(r"\s+", "", s).rstrip(".").lower()


def parse_choice(s: str | None, meta: Mapping[str, Any] | None = None) -> str | None:
    r"""The option letter in ``C``, ``(C)``, ``C.``, ``C. 120``, ``(C) 120``, ``\text{C}``, ``c``; else, when
    ``meta["choices"]`` is given, the letter of the option whose text the answer is."""
    if s is None:
        return None
    t = _INNER_TEXT.sub(r"\1", unwrap(s)).strip()
    m = _LETTER_ALONE.fullmatch(t)
    if m:
        return m.group(1).upper()
    m = _LETTER_THEN_TEXT.fullmatch(t)
    if m:
        return (m.group(1) or m.group(2)).upper()  # the letter wins over whatever text follows it
    options = _letters_of(meta)
    if options:
        key = _option_key(t)
        hits = [letter for letter, text in options.items() if _option_key(text) == key]
        if len(hits) == 1:
            return hits[0]
    return None


def verify_choice(pred: str | None, gold: str, meta: Mapping[str, Any] | None = None) -> bool:
    want = parse_choice(gold, meta)
    if want is None:
        _warn_once("choice", "gold %r of a choice sample is not an option letter; comparing strings exactly", gold)
        return verify_exact(pred, gold)
    return parse_choice(pred, meta) == want


def parse_letter_set(s: str | None) -> frozenset[str] | None:
    """Letters of ``A, C``, ``C,A``, ``AC``, ``A and C``, ``(A) (C)``, ``a; c``; None if anything else is there."""
    if s is None:
        return None
    t = _MULTI_AND.sub(",", _INNER_TEXT.sub(r"\1", unwrap(s)))
    letters: set[str] = set()
    for token in _MULTI_SPLIT.split(t):
        token = token.strip("().[]{}")
        if not token:
            continue
        if re.fullmatch(r"[A-Z]+", token):  # upper case only: "AC" is two letters, "ac" or "none" is a word
            letters.update(token)
        elif re.fullmatch(r"[a-z]", token):
            letters.add(token.upper())
        else:
            return None
    return frozenset(letters) or None


def verify_multi_choice(pred: str | None, gold: str, meta: Mapping[str, Any] | None = None) -> bool:
    want = parse_letter_set(gold)
    if want is None:
        _warn_once("multi", "gold %r of a multi_choice sample is not a letter set; comparing strings exactly", gold)
        return verify_exact(pred, gold)
    return parse_letter_set(pred) == want


# ---- word / exact ---------------------------------------------------------------------------------------
def normalize_word(s: str) -> str:
    r"""Lower case, ``\text{}`` and punctuation removed, whitespace collapsed: ``\text{Blue.}`` -> ``blue``."""
    s = _INNER_TEXT.sub(r"\1", unwrap(s))
    return " ".join(_NON_WORD.sub(" ", s.lower()).split())


def verify_word(pred: str | None, gold: str, meta: Mapping[str, Any] | None = None) -> bool:
    if pred is None:
        return False
    got = normalize_word(pred)
    vocabulary = (meta or {}).get("vocabulary")
    if vocabulary and got not in {normalize_word(str(w)) for w in vocabulary}:
        return False  # a closed answer set: hedges ("red or blue") and synonyms are wrong
    return bool(got) and got == normalize_word(gold)


def verify_exact(pred: str | None, gold: str, meta: Mapping[str, Any] | None = None) -> bool:
    return pred is not None and pred.strip() == gold.strip()


TYPED_VERIFIERS: dict[str, Verifier] = {
    "int": verify_int,
    "choice": verify_choice,
    "multi_choice": verify_multi_choice,
    "word": verify_word,
    "exact": verify_exact,
}
