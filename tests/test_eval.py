import itertools
import json
from math import comb

import pytest

from papo.cli import main
from papo.evaluation.pass_at_k import pass_at_k
from papo.rewards import grade
from papo.rollout.sampler import Sampler


@pytest.mark.parametrize("n,c,k", [(8, 0, 1), (8, 3, 1), (8, 3, 2), (8, 3, 8), (5, 5, 3), (6, 2, 4), (4, 1, 4)])
def test_pass_at_k_matches_brute_force(n, c, k):
    outcomes = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
    assert abs(pass_at_k(n, c, k) - brute) < 1e-12
    assert abs(pass_at_k(n, c, k) - (1 - comb(n - c, k) / comb(n, k))) < 1e-12


def test_pass_at_k_bad_inputs():
    with pytest.raises(ValueError, match="at least k"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(3, 4, 1)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_papo_score_hand_computed(tmp_path, capsys):
    # question a (label 12): 3 of 4 right; question b (label C): 1 of 4 right; question c (label 1/2): 0 of 4.
    rows = []
    for i, p in enumerate(["<think>x</think> \\boxed{12}", "< think >x< / think >\\boxed{12}", "\\boxed{12} \\boxed{13}",
                           "\\boxed{12.0}"]):
        rows.append({"idx": i, "id": "a", "prompt": "q1", "predict": p, "label": "12"})
    for i, p in enumerate(["\\boxed{C}", "\\boxed{A}", "C", "\\boxed{B}"]):
        rows.append({"idx": i, "id": "b", "prompt": "q2", "predict": p, "label": "C"})
    for i, p in enumerate(["no box", "\\boxed{1/3}", "\\boxed{}", "\\boxed{0.4}"]):
        rows.append({"idx": i, "id": "c", "prompt": "q3", "predict": p, "label": "\\frac{1}{2}"})
    _write(tmp_path / "pred.jsonl", rows)
    assert main(["score", "--predictions", str(tmp_path / "pred.jsonl"), "--out", str(tmp_path / "o")]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    # "\\boxed{12} \\boxed{13}": the last box (13) is graded -> wrong; 12.0 == 12 -> right
    assert summary["k"] == 4 and summary["n"] == 3
    assert abs(summary["avg_at_k"] - (3 / 4 + 1 / 4 + 0) / 3) < 1e-12
    assert abs(summary["pass_at_k"] - (1 + 1 + 0) / 3) < 1e-12
    assert main(["score", "--predictions", str(tmp_path / "pred.jsonl"), "--k", "2", "--out", str(tmp_path / "o2")]) == 0
    s2 = json.loads((tmp_path / "o2" / "summary.json").read_text())
    assert abs(s2["pass_at_k"] - (pass_at_k(4, 3, 2) + pass_at_k(4, 1, 2)) / 3) < 1e-12
    assert "avg@4" in capsys.readouterr().out


def test_papo_score_bad_input_names_the_line(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('{"id": 1, "prompt": "q", "predict": "x", "label": "1"}\n{"id": 2, "prompt": "q"}\n')
    assert main(["score", "--predictions", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "line 2: missing key(s) predict, label" in capsys.readouterr().err
    _write(tmp_path / "q.jsonl", [{"id": 1, "prompt": "q", "predict": "x", "label": "1"}])
    assert main(["score", "--predictions", str(tmp_path / "q.jsonl"), "--k", "8", "--out", str(tmp_path / "o")]) == 2


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaldata")
    assert main(["data", "generate", "--task", "bar_chart+count", "--n", "6", "--split", "test", "--size", "224",
                 "--format", "papo-eval", "--out", str(d / "bench")]) == 0
    return d / "bench" / "data.json"


def test_papo_eval_end_to_end_with_perception_gap(eval_data, tmp_path):
    out = tmp_path / "run"
    assert main(["eval", "--data", str(eval_data), "--k", "2", "--max-new-tokens", "48", "--mask-ratio", "1.0",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    bench = summary["benchmarks"]["bench"]
    assert (bench["k"], bench["n"]) == (2, 6) and summary["average"] == bench["avg_at_k"]
    assert set(bench["per_task"]) == {"bar_chart", "count"}
    blank = bench["masked"]["1"]
    assert abs(blank["perception_gap"] - (bench["avg_at_k"] - blank["avg_at_k"])) < 1e-12
    assert bench["avg_at_k"] > blank["avg_at_k"]  # the warm-started model reads bar charts; blank images defeat it
    records = [json.loads(line) for line in (out / "samples" / "bench.jsonl").read_text().splitlines()]
    assert len(records) == 6
    for r in records:  # stored correctness is the grader's verdict on the stored responses
        assert r["correct"] == [float(grade(resp, r["answer"], r["answer_type"])) for resp in r["responses"]]
    assert (out / "samples" / "bench.masked-1.jsonl").is_file()


def test_papo_eval_resumes_without_redoing_finished_samples(eval_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["eval", "--data", str(eval_data), "--k", "2", "--max-new-tokens", "32", "--batch-size", "4", "--out", str(out)]
    assert main(args) == 0
    path = out / "samples" / "bench.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])  # killed while writing line 3
    generated = []
    original = Sampler.generate

    def counting(self, batch, params, n=1, **kwargs):
        generated.append(batch.size * n)
        return original(self, batch, params, n, **kwargs)

    monkeypatch.setattr(Sampler, "generate", counting)
    assert main(args) == 0
    assert sum(generated) == 4 * 2  # only the 4 unfinished questions, k=2 each
    ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]
    assert len(ids) == 6 and len(set(ids)) == 6
    with pytest.raises(ValueError, match="k=2"):
        from papo.evaluation.run import _read_done
        _read_done(path, 8)


def test_papo_eval_column_mapping_on_jsonl(tmp_path, eval_data):
    records = json.loads(eval_data.read_text())
    rows = [{"q": r["messages"][0]["content"], "gold": r["messages"][1]["content"], "pics": [str(eval_data.parent / p) for p in r["images"]],
             "id": r["id"], "answer_type": r["answer_type"]} for r in records[:2]]
    _write(tmp_path / "custom.jsonl", rows)
    assert main(["eval", "--data", str(tmp_path / "custom.jsonl"), "--prompt-key", "q", "--answer-key", "gold",
                 "--image-key", "pics", "--k", "1", "--max-new-tokens", "32", "--out", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["benchmarks"]["custom"]["n"] == 2


def test_paired_change_hand_computed():
    """Per-sample differences 0.5, 0, 0.5, 1: mean 0.5, sample sd sqrt(1/6), standard error sqrt(1/6) / 2."""
    from papo.rollout.graded import paired_change

    before = {"avg_at_k": 0.25, "accuracies": [0.0, 0.5, 0.5, 0.0]}
    after = {"avg_at_k": 0.75, "accuracies": [0.5, 0.5, 1.0, 1.0]}
    change = paired_change(before, after)
    assert change == {"before": 0.25, "after": 0.75, "change": 0.5, "se": pytest.approx((1 / 6) ** 0.5 / 2), "n": 4}
    assert paired_change({"avg_at_k": 0.2}, after) is None  # a summary written before per-sample accuracies were kept
    assert paired_change(before, {"avg_at_k": 0.5, "accuracies": [1.0]}) is None


def test_papo_eval_reports_visual_dependency_and_draws_shaded_responses(eval_data, tmp_path):
    out = tmp_path / "dep"
    assert main(["eval", "--data", str(eval_data), "--k", "1", "--max-new-tokens", "24", "--dependency",
                 "--dependency-pictures", "2", "--out", str(out)]) == 0
    dep = json.loads((out / "summary.json").read_text())["benchmarks"]["bench"]["visual_dependency"]
    assert dep["mean"] > 0 and 0 <= dep["share_high"] <= 1 and dep["threshold"] == 0.1 and dep["tokens"] > 0
    assert len(dep["pictures"]) == 2
    from PIL import Image

    with Image.open(dep["pictures"][0]) as im:
        assert im.width > 224 and im.height >= 224


def test_visual_dependency_is_zero_without_a_mask_and_summarised_by_hand():
    from model_fixtures import tiny_policy

    from papo.data.masking import MaskingConfig
    from papo.data.synthetic import make_sample
    from papo.evaluation.dependency import dependency_summary, response_dependencies

    policy = tiny_policy()
    samples = [make_sample("count", "test", 0, i, size=112) for i in range(2)]
    texts = ["seen: 3 circles. answer: 3", ""]
    same = response_dependencies(policy, samples, texts, MaskingConfig(ratio=0.0))
    assert same[1] == ([], []) and len(same[0][0]) > 0 and max(same[0][1]) < 1e-6  # the masked image is the image
    blank = response_dependencies(policy, samples, texts, MaskingConfig(strategy="full"))
    assert len(blank[0][1]) == len(same[0][1]) and sum(blank[0][1]) > 0 and "".join(blank[0][0]) == texts[0]
    # tokens 0.05, 0.2, 0.1 and 0.0: mean 0.0875; at or above 0.1: two of four
    assert dependency_summary([[0.05, 0.2], [0.1, 0.0]], 0.1) == {"mean": 0.0875, "share_high": 0.5, "threshold": 0.1, "tokens": 4}


def test_cued_shares_count_answers_that_follow_the_question_text():
    from papo.evaluation.run import cued_shares

    records = [{"answer": "3", "cued_answer": "6", "extracted": ["6", "3", None, "6"]},
               {"answer": "red", "cued_answer": "Red", "extracted": ["red", "blue", "red", "red"]}]
    # 2 + 3 of 8 responses give the text's answer (case-blind; an unparsed answer counts as not following it);
    # 1 of 2 questions really has it
    assert cued_shares(records) == {"answers": 5 / 8, "truth": 0.5}
