"""Keep untrusted model output from reaching Python's ``eval`` through mathruler and sympy.

Audit of mathruler 0.1.0 ``grader.py``: the one code-evaluating call is ``_sympy_parse``. ``are_equal_under_sympy``
hands it ``f"({gold})-({pred})"`` (both after ``_normalize``), and it calls ``sympy_parser.parse_expr``, which
tokenises the text and ``eval``s it; ``sympy.simplify`` of the result then sympifies it, and if the result is a
``str`` that means a *second* ``parse_expr`` on attacker text with no filter at all. mathruler's only filter,
``should_allow_eval`` (at most 2 distinct letters besides ``sqrt``/``frac``, no ``^{``/``^(``/long exponents),
is a hang heuristic, not a security boundary:

- the letter count uses ``str.isalpha``, but Unicode roman numerals (``ⅰⅴⅹⅼⅽⅾⅿ``, category Nl) are not alpha and
  Python's compiler NFKC-folds them to ``ivxlcdm`` in identifiers: ``\\boxed{().__ⅽⅼass__}`` reaches ``eval``;
- ``\\boxed{{{…}}1/2)==''or'\\137\\137…'or-(''}`` (an octal-escaped string; ~300 nested braces make pylatexenc hit
  RecursionError, which ``_normalize`` swallows, so the backslashes survive) evaluates to that string, which
  ``simplify`` then parses and runs: arbitrary code, in under 1 KB, against any non-integer gold (the test
  suite runs it once, unguarded, to prove it);
- ``**`` is never checked, so ``\\boxed{9**9**9**9}`` hangs sympy (no result after 8 s [measured]).

The fix, installed in the grading worker processes (in the calling process only in the explicit inline mode): ``_sympy_parse`` only sees
text made of plain math (ASCII letters/digits, ``+-*/^().,!`` and spaces; no attribute access, no keywords, no
sympy/builtin name outside a short list of maths functions, no exponent chains or multi-digit exponents) and
must return a sympy object; and ``parse_expr`` itself refuses dunders, quotes, backslashes and non-ASCII. A
refused expression raises inside mathruler's own ``try``, so the answer is simply "not equal under sympy": every
string-level comparison mathruler makes is unchanged.
"""

from __future__ import annotations

import builtins
import functools
import keyword
import re
from collections.abc import Callable
from typing import Any

MAX_EXPR_CHARS = 1024  # the whole "(gold)-(pred)" text; longer answers are still compared as strings
MAX_NESTING = 50  # sympy's parser is quadratic in bracket depth: 1000 nested () took 1.7 s [measured]

# names a maths answer can legitimately use; everything else in sympy's or the builtins' namespace is refused
SAFE_NAMES = frozenset(["sqrt", "cbrt", "root", "pi", "E", "I", "oo", "zoo", "nan", "exp", "log", "ln", "sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan", "acot", "asec", "acsc", "sinh", "cosh", "tanh", "coth", "asinh", "acosh", "atanh", "abs", "Abs", "max", "min", "floor", "ceiling", "frac", "factorial", "binomial", "gcd", "lcm", "re", "im", "sign", "conjugate"])

_ALLOWED = re.compile(r"[A-Za-z0-9\s+\-*/^().,!]*")
_ATTRIBUTE = re.compile(r"\.\s*[A-Za-z_]")
_IDENT = re.compile(r"[A-Za-z][A-Za-z0-9]*")
_POW_CHAIN = re.compile(r"\*\*\s*[+-]?\s*[A-Za-z0-9.]+\s*\*\*")  # a**b**c is a tower: 9**9**9 never finishes
_POW_BIG = re.compile(r"\*\*\s*[+-]?\s*(?:\(|\d{2,})")  # same bound mathruler puts on ^, applied to **
_FACTORIAL = re.compile(r"(?:\)|\d{3,}|!)\s*!")


class UnsafeExpression(ValueError):
    """Raised instead of evaluating text that is not plain math."""


@functools.lru_cache(maxsize=1)
def _namespace() -> frozenset[str]:
    # what parse_expr resolves bare names against (``from sympy import *`` plus builtins), plus every builtin
    import sympy

    return frozenset(sympy.__all__) | frozenset(vars(builtins))


def screen(expr: str) -> str | None:
    """Why ``expr`` must not be evaluated, or None when it is plain math."""
    if len(expr) > MAX_EXPR_CHARS:
        return "too long"
    if not expr.isascii():
        return "non-ASCII character"  # identifiers are NFKC-folded by the compiler; letters counted above are not
    if not _ALLOWED.fullmatch(expr):
        bad = next(c for c in expr if not _ALLOWED.fullmatch(c))
        return f"character {bad!r}"
    if _ATTRIBUTE.search(expr):
        return "attribute access"
    depth = deepest = 0
    for ch in expr:
        if ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
    if deepest > MAX_NESTING:
        return "nested too deep"
    names = _namespace()
    for ident in _IDENT.findall(expr):
        if keyword.iskeyword(ident) or keyword.issoftkeyword(ident):
            return f"keyword {ident!r}"
        if ident in names and ident not in SAFE_NAMES:
            return f"name {ident!r}"
        # sympy's split_symbols turns an unknown name into its letters and looks each one up again
        for ch in ident:
            if ch in names and ch not in SAFE_NAMES:
                return f"name {ch!r}"
    py = expr.replace("^", "**")  # what _sympy_parse actually evaluates
    if _POW_CHAIN.search(py) or _POW_BIG.search(py):
        return "exponent too large"
    if _FACTORIAL.search(py):
        return "factorial too large"
    return None


def screen_parse_expr_input(text: str) -> str | None:
    """Second line of defence on every ``parse_expr`` call in a worker, including sympy's own internal ones."""
    if not isinstance(text, str):
        return None
    if not text.isascii():
        return "non-ASCII character"
    for bad in ("__", "'", '"', "\\", "lambda", "import", "eval", "exec", "open"):
        if bad in text:
            return f"contains {bad!r}"
    return None


class _Counter:
    refused = 0


REFUSALS = _Counter()  # how many expressions this process refused (the worker reports it per job)


def _guard_sympy_parse(original: Callable[[str], Any]) -> Callable[[str], Any]:
    import sympy

    def guarded(expr: str) -> Any:
        reason = screen(expr)
        if reason is not None:
            REFUSALS.refused += 1
            raise UnsafeExpression(reason)
        result = original(expr)
        if not isinstance(result, sympy.Basic):
            # a str result would be re-parsed by simplify(); tuples, bools and types are never a maths answer
            REFUSALS.refused += 1
            raise UnsafeExpression(f"parsed to {type(result).__name__}, not a sympy expression")
        return result

    guarded._papo_guard = True  # type: ignore[attr-defined]
    return guarded


def _guard_parse_expr(original: Callable[..., Any]) -> Callable[..., Any]:
    def guarded(s: Any, *args: Any, **kwargs: Any) -> Any:
        reason = screen_parse_expr_input(s)
        if reason is not None:
            REFUSALS.refused += 1
            raise UnsafeExpression(reason)
        return original(s, *args, **kwargs)

    guarded._papo_guard = True  # type: ignore[attr-defined]
    return guarded


def install_sympy_guard(parse_expr_too: bool = True) -> None:
    """Patch mathruler (and, by default, sympy's ``parse_expr``) in *this* process. Idempotent.

    Worker processes call it at start-up. ``parse_expr_too=False`` leaves sympy itself alone, for the inline
    fallback, where the trainer's own sympy use must not change; the first layer alone closes every path above.
    """
    import sympy
    from mathruler import grader
    from sympy.parsing import sympy_parser

    if not callable(getattr(grader, "_sympy_parse", None)):
        # fail closed: a mathruler that no longer routes sympy through _sympy_parse must be re-audited
        raise RuntimeError("mathruler.grader._sympy_parse not found; this mathruler version has not been audited")
    if not getattr(grader._sympy_parse, "_papo_guard", False):
        grader._sympy_parse = _guard_sympy_parse(grader._sympy_parse)
    if parse_expr_too and not getattr(sympy_parser.parse_expr, "_papo_guard", False):
        guarded = _guard_parse_expr(sympy_parser.parse_expr)
        sympy_parser.parse_expr = guarded  # sympify() imports it from here at call time
        if hasattr(sympy, "parse_expr"):
            sympy.parse_expr = guarded
