"""papo.rewards: PAPO's math reward, typed verifiers, the registry, and grading untrusted output safely."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from papo.rewards import (
    REWARDS,
    STATS,
    GraderConfig,
    RewardSpecError,
    configure,
    current_config,
    extract_answer,
    format_ok,
    get_reward,
    grade,
    grade_math_many,
    math_only,
    normalize_response,
    papo_math,
    score_responses,
    warm_up,
)
from papo.rewards.guard import screen
from papo.rewards.pool import SympyPool
from papo.rewards.text import OFFICIAL_FORMAT, OFFICIAL_WHITESPACE, mathruler_answer
from papo.rewards.verifiers import verify_choice, verify_exact, verify_int, verify_multi_choice, verify_word

ROOT = Path(__file__).resolve().parents[1]
THINK = "<think>reasoning</think> "


@pytest.fixture(scope="module", autouse=True)
def _workers():
    warm_up()  # so the first math case is not billed a worker start-up
    yield


def boxed(answer: str) -> str:
    return THINK + "\\boxed{" + answer + "}"


def run_python(code: str) -> subprocess.CompletedProcess:
    """A fresh interpreter: nothing patched by an earlier test, nothing imported by conftest."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)


# ---- data-rewards-eval.md section 3.5, "mr" column: mathruler's measured behaviour through our math path ----
MR_TABLE = [
    (boxed("C"), "C", True), (boxed("c"), "C", True), (boxed("(C)"), "C", True), (boxed("\\text{C}"), "C", True),
    (boxed("C. 120"), "C", False), (boxed("120"), "C", False), (boxed("(B) 12"), "B", False),
    (boxed("A,C"), "A, C", True), (boxed("C, A"), "A, C", False), (boxed("AC"), "A, C", False),
    (boxed("138^\\circ"), "138", True), (boxed("138"), "138^\\circ", True), (boxed("138°"), "138", False),
    (boxed("35"), "$$35^{\\circ}$$", False), (boxed("35^\\circ"), "$$35^{\\circ}$$", False),
    (boxed("35^{\\circ}"), "$$35^{\\circ}$$", True),
    (boxed("50\\%"), "50", True), (boxed("50"), "50\\%", True), (boxed("0.5"), "50\\%", False),
    (boxed("20\\%"), "0.2", False), (boxed("12 cm"), "12", True), (boxed("12\\text{ cm}"), "12", True),
    (boxed("\\sqrt{21}"), "√21", False), (boxed("√21"), "\\sqrt{21}", False),
    (boxed("2\\sqrt{3}"), "\\sqrt{12}", True), (boxed("\\frac{1}{2}"), "0.5", True),
    (boxed("0.5"), "\\frac{1}{2}", True), (boxed("5"), "5.0", True), (boxed("1,000"), "1000", True),
    (boxed("x=5"), "5", True),
    (boxed("1.33"), "\\frac{4}{3}", False), (boxed("3.14"), "\\pi", False), (boxed("1.414"), "\\sqrt{2}", False),
    (THINK + "The answer is 7", "7", False),
    (THINK + "\\boxed{7} or rather \\boxed{8}", "8", True), (THINK + "\\boxed{7} or rather \\boxed{8}", "7", False),
    (boxed("Yes"), "yes", True), (boxed("four"), "4", False),
    (boxed("felt"), "left", False), (boxed("act"), "cat", False), (boxed("sey"), "yes", False),
    (boxed("on"), "no", True), (THINK + "no box at all", "None", True),
]


@pytest.mark.parametrize("response,gold,expected", MR_TABLE)
def test_mathruler_table(response, gold, expected):
    assert grade(response, gold, "math") is expected
    assert math_only(response, gold, "int")["accuracy"] == float(expected)  # math_only ignores the type


def test_table_is_mathrulers_own_behaviour_and_guard_changes_nothing():
    from mathruler.grader import extract_boxed_content, grade_answer

    ours = grade_math_many([(extract_boxed_content(r), g) for r, g, _ in MR_TABLE])
    assert ours == [bool(grade_answer(extract_boxed_content(r), g)) for r, g, _ in MR_TABLE]  # unguarded, in-process
    refused = STATS["refused"]  # (the table's unicode √ rows are refused: sympy cannot tokenise them either)
    legit = ["\\frac{3}{4}", "0.75", "x^2+2x+1", "(x+1)^2", "\\sqrt{8}", "2\\sqrt{2}", "(1, 2)", "(2, 1)",
             "[0, 1)", "\\pi/2", "1.5\\pi", "3x", "x3", "\\frac{\\sqrt{3}}{2}", "2^{10}", "10!", "e^2", "-1/2"]
    pairs = [(a, b) for a in legit for b in legit[::3]]
    assert grade_math_many(pairs) == [bool(grade_answer(a, b)) for a, b in pairs]
    assert STATS["refused"] == refused  # plain math never trips the guard


def test_plain_integer_shortcut_matches_mathruler():
    from mathruler.grader import grade_answer

    rng = random.Random(0)
    ints = ["0", "-0", "7", "007", "-7", "12", "120", "999999999999999", "None"]
    ints += [str(rng.randint(-10**6, 10**6)) for _ in range(20)]
    pairs = [(a, b) for a in ints for b in ints[:-1][::2]]
    assert grade_math_many(pairs) == [bool(grade_answer(a, b)) for a, b in pairs]


# ---- format, whitespace normalisation, extraction ----------------------------------------------------------
@pytest.mark.parametrize("response,ok", [
    ("<think>a</think>\\boxed{1}", True),
    ("<think>\nmulti\nline\n</think>\nso\n\\boxed{\n1\n}\ndone", True),
    ("< think >a< / think > \\boxed{1}", True),  # spaces around < > / are normalised away
    ("Sure. <think>a</think>\\boxed{1}", False),  # leading text
    ("\n <think>a</think>\\boxed{1}", True),  # whitespace before "<" goes too, so this is not leading text
    ("<think>a</think> the answer is 1", False),  # no box
    ("</think><think>a\\boxed{1}", False),  # </think> before <think>
    ("<think>a\\boxed{1}</think>", False),  # box only inside the thinking
    ("<think>a</think>\\boxed{1", False),  # never closed
    ("<think></think>\\boxed{}", True),
])
def test_format(response, ok):
    text = normalize_response(response)
    assert format_ok(text) is ok
    assert bool(re.fullmatch(OFFICIAL_FORMAT, text, re.DOTALL)) is ok


def test_linear_parsers_equal_the_official_regexes():
    from mathruler.grader import extract_boxed_content

    rng = random.Random(1)
    pieces = ["<think>", "</think>", "\\boxed{", "}", "{", " ", "\n", "\t", "<", ">", "/", "x", "1", "None", " / "]
    for _ in range(3000):
        s = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        text = normalize_response(s)
        assert text == re.sub(OFFICIAL_WHITESPACE, r"\1", s), repr(s)
        assert format_ok(text) == bool(re.fullmatch(OFFICIAL_FORMAT, text, re.DOTALL)), repr(s)
        assert mathruler_answer(extract_answer(text)) == extract_boxed_content(text), repr(s)


def test_extraction_caps_the_box():
    assert extract_answer("\\boxed{" + "1" * 5000 + "}") is None  # longer than MAX_ANSWER_CHARS: no answer
    assert extract_answer("\\boxed{None}") == "None"
    assert extract_answer("\\boxed{a} \\boxed{ b }") == "b"


# ---- typed verifiers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred,ok", [
    ("3", True), (" 3 ", True), ("+3", True), ("\\text{3}", True), ("3.0", True), ("$3$", True), ("{3}", True),
    ("3^\\circ", True), ("3.5", False), ("three", False), ("3 apples", False), ("-3", False), ("33", False),
    (None, False), ("", False), ("3/1", False),
])
def test_int(pred, ok):
    assert verify_int(pred, "3") is ok


def test_int_signs_and_separators():
    assert verify_int("1,000", "1000") and verify_int("1{,}000", "1000") and verify_int("- 5", "-5")
    assert not verify_int("1,00", "100") and verify_int("12,345,678", "12345678")
    assert not verify_int("1" + "0" * 5000, "1")  # huge integers are refused, not converted


CHOICES = {"choices": ["60", "90", "120", "\\frac{1}{2}"]}


@pytest.mark.parametrize("pred,meta,ok", [
    ("C", {}, True), ("(C)", {}, True), ("C.", {}, True), ("C. 120", {}, True), ("(C) 120", {}, True),
    ("\\text{C}", {}, True), ("c", {}, True), ("B", {}, False), ("120", {}, False), ("A circle", {}, False),
    ("120", CHOICES, True), ("\\text{120}", CHOICES, True), ("90", CHOICES, False), ("D", CHOICES, False),
    ("\\dfrac{1}{2}", CHOICES, False), (None, CHOICES, False),
])
def test_choice(pred, meta, ok):
    assert verify_choice(pred, "C", meta) is ok


def test_choice_text_maps_to_letter():
    assert verify_choice("\\dfrac{1}{2}", "D", CHOICES) and verify_choice("(D)", "D", CHOICES)
    assert verify_choice("Paris", "B", {"choices": {"A": "London", "B": "Paris"}})


@pytest.mark.parametrize("pred,ok", [
    ("A, C", True), ("C,A", True), ("AC", True), ("A and C", True), ("(A), (C)", True), ("a; c", True),
    ("\\text{A}, \\text{C}", True), ("C A", True), ("A", False), ("A, B, C", False), ("ac", False),
    ("none", False), (None, False),
])
def test_multi_choice(pred, ok):
    assert verify_multi_choice(pred, "A, C") is ok


@pytest.mark.parametrize("pred,ok", [
    ("blue", True), ("Blue", True), ("\\text{blue}", True), ("BLUE.", True), (" blue ", True),
    ("red", False), ("navy", False), ("blue or red", False), ("", False), (None, False),
])
def test_word(pred, ok):
    assert verify_word(pred, "blue", {"vocabulary": ["red", "green", "blue"]}) is ok


def test_word_vocabulary_and_exact():
    assert verify_word("teal", "teal") and not verify_word("teal", "teal", {"vocabulary": ["red", "blue"]})
    assert verify_word("left", "left") and not verify_word("felt", "left")  # no anagram matching
    assert verify_exact(" x+1 ", "x+1") and not verify_exact("x + 1", "x+1") and not verify_exact(None, "x")


# ---- reward values and dispatch ----------------------------------------------------------------------------
@pytest.mark.parametrize("response,gold,kind,overall", [
    (boxed("3"), "3", "int", 1.0),
    ("\\boxed{3}", "3", "int", 0.9),  # right answer, no <think>
    (boxed("4"), "3", "int", 0.1),  # well formed, wrong
    ("the answer is 4", "3", "int", 0.0),
    (boxed("blue"), "blue", "word", 1.0), (boxed("C"), "C", "choice", 1.0), (boxed("C,A"), "A, C", "multi_choice", 1.0),
    (boxed("\\frac{1}{2}"), "0.5", "math", 1.0), ("\\boxed{2}", "0.5", "math", 0.0),
])
def test_reward_values(response, gold, kind, overall):
    r = papo_math(response, gold, kind)
    assert r["overall"] == pytest.approx(overall) and set(r) == {"overall", "accuracy", "format", "answer"}
    assert r["overall"] == pytest.approx(0.9 * r["accuracy"] + 0.1 * r["format"])


def test_typed_dispatch_differs_from_math_only():
    assert papo_math(boxed("C, A"), "A, C", "multi_choice")["accuracy"] == 1.0
    assert math_only(boxed("C, A"), "A, C", "multi_choice")["accuracy"] == 0.0
    assert papo_math(boxed("95^\\circ"), "95", "int", format_weight=0.5)["overall"] == 1.0
    assert papo_math(boxed("4"), "3", "int", format_weight=0.5)["overall"] == 0.5
    with pytest.raises(ValueError, match="unknown answer_type"):
        papo_math(boxed("3"), "3", "integer")


def test_score_responses_batch():
    responses = [boxed("3"), boxed("blue"), boxed("\\frac{2}{4}"), boxed("0.5"), "nothing"]
    answers = ["3", "blue", "\\frac{1}{2}", "\\frac{1}{2}", "3"]
    kinds = ["int", "word", "math", "math", "int"]
    metas = [None, {"vocabulary": ["red", "blue"]}, None, None, {}]
    got = [r["overall"] for r in score_responses(responses, answers, kinds, metas)]
    assert got == pytest.approx([1.0, 1.0, 0.1, 1.0, 0.0])  # unreduced 2/4 is wrong under mathruler
    assert [r["overall"] for r in score_responses(responses[:1], answers[:1])] == [1.0]  # types default to math
    with pytest.raises(ValueError, match="lengths differ"):
        score_responses(responses, answers[:2])


# ---- registry and user reward files ------------------------------------------------------------------------
def test_registry_and_user_file(tmp_path):
    assert {"papo_math", "math_only"} <= set(REWARDS) and get_reward("papo_math") is papo_math
    path = tmp_path / "my_reward.py"
    path.write_text("def score(response, answer, answer_type='math', meta=None, bonus=0.0):\n"
                    "    return {'overall': float(answer in response) + bonus, 'length': float(len(response))}\n"
                    "NOT_A_FUNCTION = 3\n"
                    "def broken(response, answer, answer_type='math', meta=None):\n    return 1.0\n")
    out = score_responses(["x 42", "x"], ["42", "42"], reward=f"{path}:score", bonus=0.5)
    assert out == [{"overall": 1.5, "length": 4.0}, {"overall": 0.5, "length": 1.0}]
    for spec, message in [(f"{tmp_path}/missing.py:score", "no such file"), (f"{path}:nope", "defines no 'nope'"),
                          (f"{path}:NOT_A_FUNCTION", "not a function"), (f"{tmp_path}/x.txt:f", "not a .py file"),
                          ("no_such_reward", "unknown reward"), (f"{path}:", "not 'path/to/file.py:function'")]:
        with pytest.raises(RewardSpecError, match=message):
            get_reward(spec)
    with pytest.raises(RewardSpecError, match="at least 'overall'"):
        score_responses(["x"], ["x"], reward=f"{path}:broken")


def test_configure_rejects_bad_settings():
    before = current_config()
    for bad in ({"mode": "threads"}, {"workers": 0}, {"timeout": 0}):
        with pytest.raises(ValueError):
            configure(**bad)
    assert current_config() == before


def test_light_imports_and_answer_types():
    from papo.data.sample import ANSWER_TYPES as DATA_TYPES
    from papo.rewards import ANSWER_TYPES

    assert ANSWER_TYPES == DATA_TYPES
    r = run_python("import sys, papo.rewards as R; R.papo_math('\\\\boxed{3}', '3', 'int');"
                   "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


# ---- safety ------------------------------------------------------------------------------------------------
def rce_payload(target: Path) -> str:
    r"""A boxed answer that makes unguarded mathruler 0.1.0 create ``target`` (see papo/rewards/guard.py):
    deep braces make pylatexenc raise, so the octal escapes survive; the expression evaluates to a string that
    sympy.simplify() parses again, unfiltered."""
    code = f"open({str(target)!r}, 'w').close()"
    return "{" * 300 + "}" * 300 + "1/2)==''or'" + "".join("\\%03o" % ord(c) for c in code) + "'or-(''"


def test_code_execution_payload_is_real_but_blocked(tmp_path):
    control = tmp_path / "control"
    r = run_python(f"from mathruler.grader import grade_answer; grade_answer({rce_payload(control)!r}, '0.5')")
    assert r.returncode == 0 and control.exists(), "payload no longer executes under plain mathruler: " + r.stderr

    target = tmp_path / "pwned"
    payload = rce_payload(target)
    assert extract_answer(boxed(payload)) == payload  # within every length cap: only the guard stands in the way
    refused = STATS["refused"]
    assert papo_math(boxed(payload), "0.5")["accuracy"] == 0.0
    assert math_only(boxed(payload), "\\frac{1}{2}", "choice")["accuracy"] == 0.0
    assert not grade(boxed("().__ⅽⅼass__"), "0.5")  # roman numerals dodge mathruler's letter count
    assert not target.exists() and STATS["refused"] >= refused + 3

    inline = run_python("import papo.rewards as R; R.configure(mode='inline');"
                        f"print(R.papo_math({boxed(payload)!r}, '0.5')['accuracy'], R.STATS['refused'])")
    assert inline.stdout.split() == ["0.0", "1"] and not target.exists(), inline.stderr


@pytest.mark.parametrize("expr", [
    "__import__('os').system('touch x')", "(1/2)-(().__ⅽⅼass__)", "(1/2)-(1/2)==''or'\\137'or-('')",
    "(1)-(lambda: 1)", "(1)-(x.real)", "(1)-([1][0])", "(1)-(eval(chr(49)))", "(1)-(S(1))", "(1)-(x_1)",
    "(1)-(9**9**9**9)", "(1)-(2**(99))", "(1)-(2^99)", "(1)-(1000!)", "(1)-(getattr)", "(1)-(var(x))",
])
def test_guard_refuses(expr):
    assert screen(expr) is not None


@pytest.mark.parametrize("expr", ["(1/2)-(0.5)", "(sqrt(12))-(2sqrt(3))", "((x+1)^2)-(x^2+2x+1)", "(pi/2)-(1.5pi)",
                                  "(10!)-(3628800)", "(e^2)-(x)"])
def test_guard_allows_plain_math(expr):
    assert screen(expr) is None


PATHOLOGICAL = {
    "1MB text": "<think>" + "a " * 500_000 + "</think>\\boxed{3}",
    "1MB whitespace": " " * 1_000_000 + "x",
    "repeated tags": "<think>" + "</think>\\boxed{" * 70_000,
    "tower": "\\boxed{9^{9^{9^{9}}}}",
    "star tower": "\\boxed{9**9**9**9}",
    "nested braces": "\\boxed{" + "{" * 100_000 + "}" * 100_000 + "}",
    "100k boxes": "\\boxed{" * 100_000,
    "nested frac": "\\boxed{" + "\\frac{1}{" * 200 + "2" + "}" * 200 + "}",
    "deep frac": "\\boxed{" + "\\frac{1}{" * 10_000 + "2" + "}" * 10_000 + "}",
    "huge int": "\\boxed{1" + "0" * 100_000 + "}",
    "long int": "\\boxed{1" + "0" * 2000 + "}",
    "factorial": "\\boxed{100000!}",
    "brackets": "\\boxed{" + "(" * 1000 + ")" * 1000 + "}",
}


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
@pytest.mark.parametrize("gold,kind", [("0.5", "math"), ("1", "math"), ("1", "int")])
def test_pathological_inputs_are_bounded(name, gold, kind):
    start = time.perf_counter()
    r = papo_math(PATHOLOGICAL[name], gold, kind)
    assert time.perf_counter() - start < 2.0 and r["overall"] in (0.0, 0.1)


def test_timeout_and_memory_limit_replace_the_worker():
    pool = SympyPool(GraderConfig(workers=1, timeout=0.5, memory_mb=256))
    try:
        start = time.perf_counter()
        assert pool.run([("sleep", [30]), ("grade", ["\\frac{1}{2}", "0.5"])]) == [(False, "timeout"), (True, [True, 0])]
        assert time.perf_counter() - start < 2.0 + 1.0 and pool.stats["restarts"] == 1  # + one worker start-up
        assert pool.run([("alloc", [2048]), ("alloc", [16])]) == [(False, "memory"), (True, 16 << 20)]
        next(iter(pool._all)).proc.kill()  # a worker that dies while idle costs a retry, not a wrong answer
        assert pool.run([("grade", ["\\frac{1}{2}", "0.5"])]) == [(True, [True, 0])]
    finally:
        pool.close()


MIXED = [(boxed(a), g, k) for a, g, k in [("3", "3", "int"), ("4", "3", "int"), ("blue", "blue", "word"),
                                          ("\\frac{1}{2}", "0.5", "math"), ("\\frac{2}{4}", "0.5", "math"),
                                          ("2\\sqrt{3}", "\\sqrt{12}", "math"), ("1.33", "\\frac{4}{3}", "math")]] * 6


def _score_mixed() -> list[float]:
    return [r["overall"] for r in score_responses(*zip(*MIXED))]


def test_grading_from_threads():
    expected = [papo_math(*case)["overall"] for case in MIXED]
    with cf.ThreadPoolExecutor(8) as ex:
        assert list(ex.map(lambda case: papo_math(*case)["overall"], MIXED)) == expected
        assert all(f.result() == expected for f in [ex.submit(_score_mixed) for _ in range(4)])


def test_grading_from_processes():
    expected = _score_mixed()
    fork = multiprocessing.get_context("fork")  # the child inherits a live pool and must start its own
    with cf.ProcessPoolExecutor(2, mp_context=fork) as ex:
        assert [f.result(timeout=60) for f in [ex.submit(_score_mixed) for _ in range(2)]] == [expected] * 2
    with fork.Pool(1) as daemonic:  # multiprocessing.Pool workers are daemonic: no multiprocessing children
        assert daemonic.apply(_score_mixed) == expected
