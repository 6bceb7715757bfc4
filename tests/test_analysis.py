"""Perception vs reasoning errors from the scenes' ground truth, on hand-written responses."""

import json

import pytest

from papo.cli import main
from papo.data.synthetic import FAMILIES, make_sample
from papo.evaluation.analysis import breakdown, classify, stated_facts

FACTS = {"objects": 9, "red objects": 4}


def test_stated_facts_are_parsed_from_the_think_block():
    text = "<think>seen: objects=9, Red  Objects=4. 9-4=5.</think> \\boxed{5}"
    assert stated_facts(text) == {"objects": "9", "red objects": "4"}
    assert stated_facts("<think>seen: closest to the star=green square. The answer is green.</think>") == {
        "closest to the star": "green square"}
    assert stated_facts("<think>I count nine.</think> \\boxed{5}") is None
    assert stated_facts("<think>seen: objects 9.</think>") is None  # not k=v


def test_every_family_s_own_solution_is_correct_with_its_facts():
    for task in FAMILIES:
        s = make_sample(task, "test", 0, 3, size=224)
        assert classify(s.meta["solution"], s.meta["facts"], correct=True, formatted=True) == "correct", task


def test_the_five_classes():
    right = "<think>seen: objects=9, red objects=4. 9-4=5.</think> \\boxed{5}"
    misread = "<think>seen: objects=8, red objects=4. 8-4=4.</think> \\boxed{4}"
    miscalc = "<think>seen: objects=9, red objects=4. 9-4=6.</think> \\boxed{6}"
    lucky = "<think>seen: objects=10, red objects=5. 10-5=5.</think> \\boxed{5}"
    missing = "<think>seen: objects=9. 9-4=5.</think> \\boxed{5}"  # a fact not stated is not a fact read
    assert classify(right, FACTS, True, True) == "correct"
    assert classify(misread, FACTS, False, True) == "perception"
    assert classify(miscalc, FACTS, False, True) == "reasoning"
    assert classify(lucky, FACTS, True, True) == "lucky_guess"
    assert classify(missing, FACTS, True, True) == "lucky_guess"
    assert classify("no think, no box", FACTS, False, False) == "format"
    b = breakdown(["correct", "perception", "perception", "reasoning", "format"], [True, False, False, False, False])
    assert b["counts"]["perception"] == 2 and b["responses"] == 5
    assert b["perception_share_of_errors"] == 2 / 4  # of the 4 wrong answers
    assert breakdown([], [])["perception_share_of_errors"] == 0.0


def test_a_garbled_trace_before_a_right_answer_is_not_a_wrong_answer():
    garbled = "<think>se=2, C=10, minute hand=20. The answer is 5.</think> \\boxed{5}"
    assert classify(garbled, FACTS, True, True) == "format"  # its facts cannot be read
    b = breakdown(["format", "perception", "reasoning", "correct"], [True, False, False, True])
    assert b["shares"]["format"] == 0.25
    assert b["perception_share_of_errors"] == 1 / 2  # of the 2 wrong answers; the format response was right
    with pytest.raises(ValueError, match="3 classes for 2 answers"):
        breakdown(["format", "correct", "correct"], [True, True])


def test_a_clock_is_judged_by_its_hour_hand_alone():
    s = make_sample("clock", "test", 0, 3, size=224)
    hour, minute = s.meta["facts"]["hour hand"], s.meta["facts"]["minute hand"]
    assert s.meta["answer_facts"] == ["hour hand"] and "answer_facts" not in make_sample("count", "test", 0, 3).meta
    trace = "<think>seen: hour hand={}, minute hand={}. The hour is {}.</think> \\boxed{{{}}}"
    wrong_minute = trace.format(hour, (minute + 5) % 60, hour, hour)
    wrong_hour = trace.format(hour % 12 + 1, minute, hour, hour)
    facts, judged = s.meta["facts"], s.meta["answer_facts"]
    assert classify(wrong_minute, facts, True, True, judged) == "correct"
    assert classify(wrong_minute, facts, True, True) == "lucky_guess"  # judged by every fact, as before
    assert classify(wrong_minute, facts, False, True, judged) == "reasoning"  # read the hour, answered another
    assert classify(wrong_hour, facts, True, True, judged) == "lucky_guess"
    assert classify(wrong_hour, facts, False, True, judged) == "perception"


def test_papo_eval_reports_the_breakdown_for_synthetic_data(tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--data", "synthetic:count+bar_chart?split=test&n=6&size=224", "--k", "2",
                 "--max-new-tokens", "40", "--out", str(out)]) == 0
    bench = json.loads((out / "summary.json").read_text())["benchmarks"]["synthetic-count-bar_chart"]
    errors = bench["errors"]
    assert errors["responses"] == 12 and sum(errors["counts"].values()) == 12
    # right answers are correct or lucky guesses, and nothing else
    assert errors["counts"]["correct"] + errors["counts"]["lucky_guess"] == round(bench["avg_at_k"] * 12)
    record = json.loads((out / "samples" / "synthetic-count-bar_chart.jsonl").read_text().splitlines()[0])
    assert len(record["errors"]) == 2
