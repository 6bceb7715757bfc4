"""experiments/reproduce.py: per-run collection, the mean ± std tables, sizing runs from a probe, and stopping."""

import importlib.util
import json
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "reproduce.py"


def _load():
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _metrics(run, step_times, kl=0.0):
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i + 1, "reward": 0.5, "kl_prcp": kl, "entropy": 0.1, "masked_entropy": 1.0, "hacking_warning": "", "step_s": t}) + "\n"
        for i, t in enumerate(step_times)))


def _run(root, name, acc, gap, kl):
    run = root / name
    _metrics(run, [1.0] * 12, kl)
    (run / "eval").mkdir()
    bench = {"k": 8, "avg_at_k": acc, "per_task": {"count": acc, "clock": 1.0},
             "masked": {"0.6": {"avg_at_k": acc - gap, "perception_gap": gap}},
             "errors": {"perception_share_of_errors": 0.5,
                        "shares": {"correct": acc, "perception": 0.2, "reasoning": 0.1, "lucky_guess": 0.0, "format": 0.0}}}
    (run / "eval" / "summary.json").write_text(json.dumps({"benchmarks": {"synthetic-all": bench}}))
    return run


def test_report_gives_mean_and_std_over_seeds(tmp_path):
    reproduce = _load()
    rows = [reproduce.collect(_run(tmp_path, f"papo_g-x-s{i}", acc, 0.1, 0.2), "PAPO-G", "papo_g", [], i)
            for i, acc in enumerate([0.30, 0.40])]
    rows.append(reproduce.collect(_run(tmp_path, "grpo-y-s0", 0.25, 0.05, 0.0), "GRPO", "grpo", [], 0))
    md, js = tmp_path / "docs" / "RESULTS.md", tmp_path / "docs" / "results" / "reproduction.json"
    md.parent.mkdir()
    md.write_text("# Results\n\nwritten by hand, kept\n")
    reproduce.report(rows, md, js, tmp_path)
    text = md.read_text()
    assert "written by hand, kept" in text
    # std of 30 and 40 is 7.07; masked accuracy = accuracy - gap; GRPO comes first (the plan's order)
    assert text.index("| GRPO |") < text.index("| PAPO-G |")
    assert "| PAPO-G | 2 | 12 | 35.0 ± 7.1 | 25.0 ± 7.1 | 10.0 ± 0.0 | 0.200 ± 0.000 | 0.100 ± 0.000 | 1.000 ± 0.000 | 0/2 |" in text
    assert "| GRPO | 1 | 12 | 25.0 | 20.0 | 5.0 | 0.000 | 0.100 | 1.000 | 0/1 |" in text
    assert "| PAPO-G | 35.0 ± 7.1 | 0.0 ± 0.0 | 20.0 ± 0.0 | 10.0 ± 0.0 | 0.0 ± 0.0 | 50.0 ± 0.0 |" in text  # error classes
    assert "| PAPO-G | 100.0 ± 0.0 | 35.0 ± 7.1 |" in text  # per task family: clock, count
    saved = json.loads(js.read_text())["runs"][0]
    assert saved["heldout_avg_at_8"] == 0.30 and saved["perception_gap"] == 0.1 and saved["seed"] == 0
    assert saved["first_kl_prcp"] == saved["max_kl_prcp"] == 0.2 and "final_filter_rounds" not in saved  # not logged
    reproduce.report(rows, md, js, tmp_path)  # re-running replaces the generated part only
    assert md.read_text().count("| method |") == 3
    assert (md.parent / "results" / "main.png").is_file()
    # another section (runs of another length, say) goes between its own markers and joins the JSON
    longer = [reproduce.collect(_run(tmp_path, "grpo-long-s0", 0.5, 0.1, 0.0), "GRPO", "grpo", [], 0)]
    reproduce.report(longer, md, js, tmp_path, section="long")
    reproduce.report(longer, md, js, tmp_path, section="long")
    assert md.read_text().count("| method |") == 6 and "written by hand, kept" in md.read_text()
    assert [r["section"] for r in json.loads(js.read_text())["runs"]] == ["table"] * 3 + ["long"]


def test_a_dapo_run_reports_its_filter_rounds_and_agreeing_groups(tmp_path):
    reproduce = _load()
    run = tmp_path / "dapo-f-s0"
    run.mkdir()
    rows = [{"step": i + 1, "reward": 0.6, "kl_prcp": 0.01 * (i + 1), "filter_rounds": 4 if i < 10 else 16,
             "groups_all_correct": 0.5, "groups_all_wrong": 0.2 if i < 10 else 0.4, "hacking_warning": ""} for i in range(20)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    row = reproduce.collect(run, "DAPO", "dapo", [], 0)
    assert (row["first_filter_rounds"], row["final_filter_rounds"]) == (4, 16)
    assert (row["first_groups_all_wrong"], row["final_groups_all_wrong"]) == (0.2, 0.4)
    assert row["first_kl_prcp"] == 0.01 and row["max_kl_prcp"] == 0.2 and "final_accuracy_before_filter" not in row


def test_figures_show_the_pre_filter_accuracy_only_for_runs_that_log_it():
    reproduce = _load()
    keys = next(k for name, *_, k in reproduce.FIGURES if name == "main")
    grpo = [{"step": 1, "reward": 0.7, "kl_prcp": 0.01}]
    dapo = [{"step": 1, "reward": 0.6, "kl_prcp": 0.01, "accuracy_before_filter": 0.8}]
    assert reproduce.logged_keys(keys, [grpo]) == ("reward", "kl_prcp")
    assert reproduce.logged_keys(keys, [grpo, dapo]) == ("reward", "accuracy_before_filter", "kl_prcp")


def test_every_planned_run_has_a_valid_config_under_the_regimes_settings():
    """Each entry of each plan loads with the settings scripts/regime_run.sh gives every run (its own overrides
    last), and every method with a baseline has that baseline in its plan."""
    from papo.config.schema import load_config

    reproduce = _load()
    regime = ["rollout.n=5", "rollout.max_new_tokens=160", "rollout.top_p=0.99", "trainer.rollout_batch_size=64",
              "trainer.mini_batch_size=32", "trainer.log_kl_prcp=true", "optim.lr=2e-5", "model.compile_layers=false",
              "algorithm.filter_fallback=kept"]
    for name, plan in reproduce.PLANS.items():
        methods = {m for m, _, _ in plan}
        for method, preset, overrides in plan:
            load_config(preset, overrides=[*regime, *overrides, "trainer.seed=0"])
            base = reproduce.baseline(method)
            assert base is None or base in methods or name == "ablations", (name, method)  # ablations: main's PAPO-G
    assert load_config("noisy_rollout", overrides=[*regime, "rollout.n=6"]).rollout.n == 6


def test_blocks_of_one_seed_from_separate_calls_are_reported_together(tmp_path):
    """Each call (a block) pairs its runs with its own start and baseline; combined, the pair table lists each
    block's seed and the mean over blocks, and a seed run in two blocks is refused."""
    reproduce = _load()

    def change(x):
        return {"before": 0.5, "after": 0.5 + x, "change": x, "se": 0.01, "n": 300}

    def block(seed, grpo, papo, name=""):
        runs = [{"method": "start (no RL)", "run": "start", "seed": 0, "steps": 0, "heldout_avg_at_4": 0.7, "eval_k": 4,
                 "section": "sc"},
                {"method": "GRPO", "run": f"grpo-x-s{seed}", "seed": seed, "steps": 150, "heldout_avg_at_4": 0.7 + grpo, "eval_k": 4,
                 "change_vs_start": change(grpo), "section": "sc"},
                {"method": "PAPO-G", "run": f"papo_g-y-s{seed}", "seed": seed, "steps": 150, "heldout_avg_at_4": 0.7 + papo, "eval_k": 4,
                 "change_vs_start": change(papo), "change_vs_baseline": {**change(papo - grpo), "baseline": "GRPO"},
                 "section": "sc"}]
        path = tmp_path / f"block{seed}{name}.json"
        path.write_text(json.dumps({"runs": runs}))
        return path

    files = [block(0, 0.05, 0.07), block(1, 0.06, 0.05)]
    rows = reproduce.combine_blocks(files, "sc")
    assert [r["seed"] for r in rows if r["method"] == "start (no RL)"] == [0, 1]
    md, js = tmp_path / "RESULTS.md", tmp_path / "reproduction.json"
    reproduce.report(rows, md, js, tmp_path / "runs", "sc")
    text = md.read_text()
    assert "| PAPO-G | GRPO | +2.0 ± 1.0 | -1.0 ± 1.0 | +0.5 ± 1.5 |" in text  # mean over blocks ± its standard error
    with pytest.raises(SystemExit, match="GRPO seed 0 is also in"):
        reproduce.combine_blocks([files[0], block(0, 0.0, 0.0, "again")], "sc")


def test_the_hacking_monitor_is_replayed_over_the_logged_metrics(tmp_path):
    reproduce = _load()
    run = tmp_path / "papo_g-z-s0"
    calm = {"kl_prcp": 1.8, "clipfrac_high": 0.0, "entropy": 0.13, "masked_entropy": 2.3, "reward": 0.4, "hacking_warning": ""}
    rows = [calm] * 10 + [{**calm, "kl_prcp": 9.0, "entropy": 0.2, "masked_entropy": 13.0}] * 15
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, **r}) + "\n" for i, r in enumerate(rows)))
    row = reproduce.collect(run, "PAPO-G with-grad masked branch", "papo_g", [], 0)
    assert row["hacking_warnings"] > 0 and row["first_hacking_warning_step"] == 20  # after two windows of 10


def test_steps_are_sized_from_the_slowest_probe_run(tmp_path, monkeypatch):
    reproduce = _load()
    times = {"GRPO": [9.0, 1.0, 1.0], "DAPO": [9.0, 2.0, 2.0]}  # the first step (graph capture) is left out

    def fake_train(method, preset, overrides, seed, steps, args):
        run = reproduce.run_dir(method, preset, overrides, seed, Path(args.out))
        _metrics(run, times[method][:steps])
        return run

    monkeypatch.setattr(reproduce, "train", fake_train)
    monkeypatch.setattr(reproduce.time, "time", lambda: 1000.0)  # the probe takes no wall time here
    args = type("Args", (), {"out": str(tmp_path), "jobs": 2, "probe_steps": 3, "budget_s": 500.0, "eval_reserve_s": 100.0})
    jobs = [("GRPO", "grpo", [], 0), ("DAPO", "dapo", [], 0)]
    plan = reproduce.size_steps(jobs, args, t0=1000.0)
    # 2.0 s a step (DAPO's); (500 s budget - 100 s for evaluation) / (2.0 s * 1.1 margin) = 181.8
    assert plan["step_s"] == 2.0 and plan["steps"] == 181
    args.jobs = 1  # two waves of runs: each gets half the time
    assert reproduce.size_steps(jobs, args, t0=1000.0)["steps"] < 100


def test_a_call_of_fixed_steps_measures_the_pace_that_sizes_its_extension(tmp_path):
    reproduce = _load()
    a, b = tmp_path / "a", tmp_path / "b"
    _metrics(a, [9.0, 1.0, 1.0, 30.0, 5.0, 6.0, 5.0])  # two steps from an earlier call, then four in this one
    _metrics(b, [9.0, 1.0, 40.0, 7.0, 7.0, 7.0])  # its first step in a call compiles: left out
    pace = reproduce.measured_pace([a, b], [3, 2], wall_s=99.0, waves=1)
    # the slowest run's median; start-up: 99 s less the 21 s of b's steps after its first
    assert pace == {"step_s": 7.0, "startup_s": 78.0}
    args = type("Args", (), {"budget_s": 500.0, "eval_reserve_s": 120.0, "jobs": 2, "steps": 100})
    # (500 s - 120 s for evaluation - 78 s start-up) / (7 s * 1.1 margin) = 39.2 more steps
    assert reproduce.extend_plan({"steps": 6, **pace}, 2, args)["steps"] == 45
    assert reproduce.measured_pace([a], [7], wall_s=5.0, waves=1) == {}  # nothing trained here
    # runs a stop signal cut short of the plan's 200 steps, at 72 and 86: extended from the fewer, to one step count
    plan = {"steps": 200, **pace}
    assert reproduce.extend_plan(plan, 2, args, trained=[72, 86]) == {**plan, "steps": 111, "extended_from": 72,
                                                                      "budget_s": 500.0}
    args.budget_s = 100.0  # room for no step: the runs behind still catch up with the one ahead
    assert reproduce.extend_plan(plan, 2, args, trained=[72, 86])["steps"] == 86


def test_the_pace_is_that_of_the_last_steps_when_steps_grow(tmp_path):
    reproduce = _load()
    run = tmp_path / "dapo"
    _metrics(run, [9.0] + [5.0] * 20 + [15.0] * reproduce.PACE_WINDOW)  # DAPO's filter regenerating more each step
    assert reproduce.measured_pace([run], [0], wall_s=400.0, waves=1) == {"step_s": 15.0, "startup_s": 150.0}


def test_a_budget_ends_slow_runs_where_the_evaluation_reserve_begins(tmp_path, monkeypatch, capsys):
    reproduce = _load()
    commands = []
    monkeypatch.setattr(reproduce, "_call", lambda cmd, log, args: commands.append(cmd) or 0)
    monkeypatch.setattr(reproduce.time, "time", lambda: 1000.0)
    args = type("Args", (), {"out": str(tmp_path), "device": "cpu", "model": None, "set": [], "train_deadline": 1380.0})
    reproduce.train("DAPO", "dapo", [], 0, 50, args)
    args.train_deadline = None  # --steps without --budget-s: no time limit, also none a resumed run kept
    reproduce.train("DAPO", "dapo", [], 1, 50, args)
    assert [c[c.index("--set", len(c) - 2) + 1] for c in commands] == ["trainer.max_time_s=380.0", "trainer.max_time_s=0"]
    assert not reproduce.finished  # both exited 0 without logging a step (a limit before step 1): not evaluated
    args.train_deadline = 1030.0  # 30 s left: less than a load and a step, so the run is not started
    reproduce.train("DAPO", "dapo", [], 2, 50, args)
    assert len(commands) == 2 and "not started" in capsys.readouterr().out

    reproduce = _load()  # the whole call: a run the limit ended short is evaluated at its last step
    evaluated = []

    def fake_train(method, preset, overrides, seed, steps, args):
        run = reproduce.run_dir(method, preset, overrides, seed, Path(args.out))
        _metrics(run, [1.0] * (steps if seed == 0 else 3))
        reproduce.finished.add(run)
        return run

    monkeypatch.setattr(reproduce, "train", fake_train)
    monkeypatch.setattr(reproduce, "evaluate", lambda model, ev, log, args, steps=None: evaluated.append(steps))
    monkeypatch.setattr(reproduce.sys, "argv", ["reproduce.py", "--methods", "DAPO", "--seeds", "2", "--steps", "5",
                                                "--device", "cpu", "--out", str(tmp_path / "runs"),
                                                "--results", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "R.md")])
    reproduce.main()
    assert sorted(evaluated, key=str) == [3, 5, None]  # the start has no step count
    assert "1 of 2 runs ended at steps 3–3 of 5" in capsys.readouterr().out


def test_evaluation_reads_the_chosen_held_out_data_and_response_cap(tmp_path, monkeypatch):
    reproduce = _load()
    calls = []
    monkeypatch.setattr(reproduce, "_call", lambda cmd, log, args: calls.append(cmd))
    model = tmp_path / "run" / "final"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    args = type("Args", (), {"eval_data": "synthetic:count+closest?split=test&explain=1&n={n}", "eval_n": 30,
                             "eval_k": 4, "eval_max_new_tokens": 160, "mask_ratio": 0.6, "device": "cpu"})
    reproduce.evaluate(model, tmp_path / "ev", tmp_path / "ev.log", args)
    cmd = calls[0]
    assert cmd[cmd.index("--data") + 1] == "synthetic:count+closest?split=test&explain=1&n=30"
    assert cmd[cmd.index("--max-new-tokens") + 1] == "160"
    defaults = type("Args", (), {"eval_data": reproduce.TEST, "eval_n": 140, "eval_k": 8, "eval_max_new_tokens": 48,
                                 "mask_ratio": 0.6, "device": "cpu"})
    reproduce.evaluate(model, tmp_path / "ev2", tmp_path / "ev2.log", defaults)
    assert calls[1][calls[1].index("--data") + 1] == "synthetic:all?split=test&size=224&n=140"


def test_extending_runs_sizes_more_steps_and_keeps_the_earlier_evaluation(tmp_path, monkeypatch):
    reproduce = _load()
    plan = {"steps": 17, "step_s": 9.0, "startup_s": 50.0, "jobs": 2, "runs": 2, "probe_steps": 6, "budget_s": 455.0}
    args = type("Args", (), {"budget_s": 500.0, "eval_reserve_s": 120.0, "jobs": 2, "steps": 100})
    # (500 s - 120 s for evaluation - 50 s start-up) / (9 s * 1.1 margin) = 33.3 more steps
    assert reproduce.extend_plan(plan, 2, args) == {**plan, "steps": 50, "extended_from": 17, "budget_s": 500.0}
    args.budget_s = None
    assert reproduce.extend_plan(plan, 2, args)["steps"] == 100  # or to --steps
    args.budget_s = 500.0
    with pytest.raises(SystemExit, match="--extend --steps"):
        reproduce.extend_plan({"steps": 17}, 2, args)

    calls = []
    monkeypatch.setattr(reproduce, "_call", lambda cmd, log, args: calls.append(cmd))
    run = _run(tmp_path, "grpo-x-s0", 0.30, 0.1, 0.0)
    (run / "final").mkdir()
    (run / "final" / "config.json").write_text("{}")
    (run / "eval" / "trained_steps.txt").write_text("17\n")
    ev_args = type("Args", (), {"eval_data": reproduce.TEST, "eval_n": 30, "eval_k": 8, "eval_max_new_tokens": 48,
                                "mask_ratio": 0.6, "device": "cpu"})
    reproduce.evaluate(run / "final", run / "eval", tmp_path / "log", ev_args, steps=17)
    assert not calls  # evaluated at this step count already
    reproduce.evaluate(run / "final", run / "eval", tmp_path / "log", ev_args, steps=50)
    assert len(calls) == 1 and (run / "eval-step17" / "summary.json").is_file() and not (run / "eval").exists()
    # the new evaluation (written here by hand) and the earlier one make a held-out curve
    _run(tmp_path, "grpo-x-s0-later", 0.42, 0.1, 0.0)
    (tmp_path / "grpo-x-s0-later" / "eval").rename(run / "eval")
    (run / "eval" / "trained_steps.txt").write_text("50\n")
    row = reproduce.collect(run, "GRPO", "grpo", [], 0)
    assert row["heldout_by_steps"] == {17: 0.30, 50: 0.42} and row["heldout_avg_at_8"] == 0.42


def test_a_second_call_extends_the_runs_and_evaluates_them_again(tmp_path, monkeypatch):
    reproduce = _load()
    trained = {}

    def fake_train(method, preset, overrides, seed, steps, args):
        run = reproduce.run_dir(method, preset, overrides, seed, Path(args.out))
        trained[run.name] = steps
        _metrics(run, [1.0] * steps)
        (run / "config.yaml").write_text(f"preset: {preset}\ntrainer: {{seed: {seed}}}\nalgorithm: {{}}\n")
        (run / "method.txt").write_text(method + "\n")
        (run / "final").mkdir(exist_ok=True)
        (run / "final" / "config.json").write_text("{}")
        reproduce.finished.add(run)
        return run

    def fake_eval(cmd, log, args):  # a held-out accuracy that grows with the steps trained
        ev = Path(cmd[cmd.index("--out") + 1])
        model = Path(cmd[cmd.index("--model") + 1])
        steps = len(reproduce.read_metrics(model.parent / "metrics.jsonl")) if model.name == "final" else 0
        ev.mkdir(parents=True, exist_ok=True)
        bench = {"k": 4, "avg_at_k": (30 + steps) / 100, "masked": {}}
        (ev / "summary.json").write_text(json.dumps({"benchmarks": {"clock": bench}}))

    monkeypatch.setattr(reproduce, "train", fake_train)
    monkeypatch.setattr(reproduce, "_call", fake_eval)
    out, results = tmp_path / "runs", tmp_path / "reproduction.json"
    argv = ["reproduce.py", "--methods", "GRPO", "--seeds", "1", "--jobs", "1", "--device", "cpu", "--out", str(out),
            "--results", str(results), "--markdown", str(tmp_path / "RESULTS.md")]
    monkeypatch.setattr(reproduce.sys, "argv", [*argv, "--steps", "3"])
    reproduce.main()
    monkeypatch.setattr(reproduce.sys, "argv", [*argv, "--extend", "--steps", "8"])
    reproduce.main()
    run = next(r for r in json.loads(results.read_text())["runs"] if r["method"] == "GRPO")
    assert run["steps"] == 8 and run["heldout_by_steps"] == {"3": 0.33, "8": 0.38}
    # each call's measured pace (1 s a step here, no wall time left for start-up) is kept for a later --budget-s
    assert json.loads((out / "plan.json").read_text()) == {"steps": 8, "extended_from": 3, "step_s": 1.0,
                                                           "startup_s": 0.0}
    monkeypatch.setattr(reproduce.sys, "argv", [*argv, "--extend", "--steps", "9"])
    (out / "plan.json").unlink()
    with pytest.raises(SystemExit, match="run without --extend first"):
        reproduce.main()


def test_a_stop_signal_reaches_the_runs_and_ends_the_call_without_evaluating(tmp_path, monkeypatch):
    reproduce = _load()
    child = ("import signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"  # a papo train that saves and exits
             "print('ready', flush=True)\n"
             "time.sleep(60)\n")
    args = type("Args", (), {"threads": 1, "jobs": 1})
    log = tmp_path / "child.log"
    with ThreadPoolExecutor(1) as pool:
        status = pool.submit(reproduce._call, [sys.executable, "-c", child], log, args)
        while "ready" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.05)
        reproduce._on_stop(signal.SIGTERM, None)
        assert status.result(timeout=30) == 143
    assert reproduce._call([sys.executable, "-c", "pass"], log, args) is None  # nothing starts once stopping

    reproduce = _load()  # a fresh module: the whole call, stopped while its runs train
    evaluated = []

    def fake_train(method, preset, overrides, seed, steps, args):
        run = reproduce.run_dir(method, preset, overrides, seed, Path(args.out))
        _metrics(run, [1.0] * 2)
        reproduce._on_stop(signal.SIGTERM, None)
        return run

    monkeypatch.setattr(reproduce, "train", fake_train)
    monkeypatch.setattr(reproduce, "evaluate", lambda *a, **k: evaluated.append(a))
    monkeypatch.setattr(reproduce.sys, "argv", ["reproduce.py", "--methods", "GRPO", "--seeds", "1", "--steps", "5",
                                                "--device", "cpu", "--out", str(tmp_path / "runs")])
    with pytest.raises(SystemExit) as stop:
        reproduce.main()
    assert stop.value.code == 128 + signal.SIGTERM and not evaluated


def test_no_eval_leaves_the_evaluation_to_the_next_call(tmp_path, monkeypatch):
    reproduce = _load()
    evaluated = []

    def fake_train(method, preset, overrides, seed, steps, args):
        run = reproduce.run_dir(method, preset, overrides, seed, Path(args.out))
        _metrics(run, [1.0] * steps)
        reproduce.finished.add(run)
        return run

    monkeypatch.setattr(reproduce, "train", fake_train)
    monkeypatch.setattr(reproduce, "evaluate",
                        lambda model, ev, log, args, steps=None: evaluated.append((ev.parent.name, steps)))
    argv = ["reproduce.py", "--methods", "GRPO", "--seeds", "1", "--device", "cpu", "--out", str(tmp_path / "runs"),
            "--results", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "R.md")]
    monkeypatch.setattr(reproduce.sys, "argv", [*argv, "--steps", "3", "--no-eval"])
    reproduce.main()
    assert not evaluated and not (tmp_path / "r.json").exists()
    monkeypatch.setattr(reproduce.sys, "argv", [*argv, "--extend", "--steps", "5"])
    reproduce.main()
    assert sorted(evaluated) == [(reproduce.run_dir("GRPO", "grpo", [], 0, tmp_path).name, 5), ("start", None)]


def _samples(ev, correct_by_id):
    (ev / "samples").mkdir(parents=True, exist_ok=True)
    rows = [{"id": i, "correct": c} for i, c in correct_by_id.items()]
    (ev / "samples" / "clock.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the masked copy of the same questions is not part of the held-out accuracy
    (ev / "samples" / "clock.masked-0.6.jsonl").write_text(json.dumps({"id": "q0", "correct": [0, 0]}) + "\n")


def test_seed_pairs_are_paired_over_the_same_questions(tmp_path):
    reproduce = _load()
    start = tmp_path / "start" / "eval"
    _samples(start, {"q0": [0, 0], "q1": [1, 0], "q2": [0, 0]})
    runs = {("GRPO", 0): {"q0": [1, 0], "q1": [1, 0], "q2": [0, 0]},   # per question +0.5, 0, 0
            ("PAPO-G", 0): {"q0": [1, 1], "q1": [1, 1], "q2": [0, 0]},  # +1, +0.5, 0
            ("GRPO", 1): {"q0": [0, 0], "q1": [1, 0], "q2": [0, 0]},
            ("PAPO-G", 1): {"q0": [0, 0], "q1": [1, 1], "q2": [1, 0]}}  # +0, +0.5, +0.5
    rows = [{"method": reproduce.START_METHOD, "seed": 0, "run": "start", "eval_k": 2, "heldout_avg_at_2": 1 / 6}]
    for (method, seed), correct in runs.items():
        name = f"{method}-s{seed}"
        _samples(tmp_path / name / "eval", correct)
        rows.append({"method": method, "seed": seed, "run": name, "eval_k": 2, "heldout_avg_at_2": 0.3})
    reproduce.add_pairs(rows, tmp_path)
    by = {(r["method"], r["seed"]): r for r in rows}
    # GRPO seed 0 - start: differences (0.5, 0, 0): mean 1/6, sd sqrt(1/12), se sqrt(1/12)/sqrt(3) = 1/6
    assert by[("GRPO", 0)]["change_vs_start"]["change"] == pytest.approx(1 / 6)
    assert by[("GRPO", 0)]["change_vs_start"]["se"] == pytest.approx(1 / 6)
    # PAPO-G seed 0 - GRPO seed 0: (0.5, 0.5, 0): mean 1/3, se 1/6; seed 1: (0, 0.5, 0.5)
    pair = by[("PAPO-G", 0)]["change_vs_baseline"]
    assert pair["baseline"] == "GRPO" and pair["change"] == pytest.approx(1 / 3) and pair["se"] == pytest.approx(1 / 6)
    assert "change_vs_baseline" not in by[("GRPO", 1)] and "change_vs_start" not in rows[0]
    lines = "\n".join(reproduce.pair_table({m: [r for r in rows if r["method"] == m] for m in ("GRPO", "PAPO-G")}))
    assert "| PAPO-G | GRPO | +33.3 ± 16.7 | +33.3 ± 16.7 | +33.3 ± 0.0 |" in lines
    assert "| GRPO | the start | +16.7 ± 16.7 | +0.0 ± 0.0 | +8.3 ± 8.3 |" in lines
    assert reproduce.baseline("PAPO-G mask 0.8") == "PAPO-G" and reproduce.baseline("GRPO") is None


def test_answers_that_follow_the_question_text_get_their_own_table(tmp_path):
    reproduce = _load()
    rows = []
    for i, share in enumerate([0.30, 0.20]):
        run = _run(tmp_path, f"grpo-c-s{i}", 0.3, 0.1, 0.0)
        summary = json.loads((run / "eval" / "summary.json").read_text())
        summary["benchmarks"]["synthetic-all"]["cued"] = {"answers": share, "truth": 0.08}
        del summary["benchmarks"]["synthetic-all"]["per_task"]  # one family: no split by family
        (run / "eval" / "summary.json").write_text(json.dumps(summary))
        rows.append(reproduce.collect(run, "GRPO", "grpo", [], i))
    assert rows[0]["cued_answer_share"] == 0.30 and rows[0]["cued_truth_share"] == 0.08
    text = reproduce.tables(rows)
    assert "8.0% of the questions really have it" in text and "| GRPO | 25.0 ± 7.1 |" in text
    assert "per task family" not in text


def test_each_run_gets_a_line_against_its_own_blocks_start(tmp_path):
    reproduce = _load()
    # two blocks (combined calls), each with its own start: masked-image accuracy = accuracy - gap
    starts = [{**reproduce.collect(_run(tmp_path, f"start{s}", acc, 0.2, 0.0), reproduce.START_METHOD, "", [], 0), "seed": s}
              for s, acc in ((0, 0.5), (1, 0.6))]
    grpo = reproduce.collect(_run(tmp_path, "grpo-s0", 0.6, 0.2, 0.0), "GRPO", "grpo", [], 0)    # masked 0.4 vs 0.3
    papo = reproduce.collect(_run(tmp_path, "papo-s1", 0.6, 0.3, 0.25), "PAPO-G", "papo_g", [], 1)  # 0.3 vs 0.4
    grpo["change_vs_start"] = {"change": 0.05, "se": 0.02}
    lines = reproduce.run_table({"GRPO": [grpo], "PAPO-G": [papo]}, starts)
    assert "| GRPO, seed 0 | +5.0 ± 2.0 | +10.0 | 0.50 → 0.50 | 0.000 → 0.000 → 0.000 | 1.000 | 0.0% | – |" in lines
    assert "| PAPO-G, seed 1 | – | -10.0 | 0.50 → 0.50 | 0.250 → 0.250 → 0.250 | 1.000 | 0.0% | – |" in lines
    # one call: its single start is every seed's; without one the masked change is unknown
    assert "| PAPO-G, seed 1 | – | +0.0 |" in "\n".join(reproduce.run_table({"PAPO-G": [papo]}, starts[:1]))
    assert "| PAPO-G, seed 1 | – | – |" in "\n".join(reproduce.run_table({"PAPO-G": [papo]}, []))
    text = reproduce.tables([*starts, grpo, papo])
    assert "Each run" in text and "| start (no RL), seed" not in text
