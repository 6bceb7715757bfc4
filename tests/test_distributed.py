"""The distributed context: identity at world size 1, real collectives under a process group (2 CPU processes,
gloo), and a non-main rank that trains without writing a file."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from model_fixtures import SMALL, small_cfg
from safetensors.torch import load_file

from papo.cli import main
from papo.training.distributed import DistContext
from papo.training.loop import run_train


def test_a_single_process_reduces_to_itself():
    ctx = DistContext.current()
    assert (ctx.rank, ctx.world_size, ctx.is_main) == (0, 1, True)
    assert ctx.sum(2.0, 3.0) == [2.0, 3.0] and ctx.mean(4.0) == [4.0]
    assert ctx.any(True) and not ctx.any(False) and ctx.gather("x") == ["x"]
    assert ctx.padded_share("abc") == (["a", "b", "c"], 0, 3)


def _worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        ctx = DistContext.current()
        result = {"rank": ctx.rank, "main": ctx.is_main, "sum": ctx.sum(rank + 1.0, 10.0), "mean": ctx.mean(rank * 2.0),
                  "any_one": ctx.any(rank == 1), "any_none": ctx.any(False), "texts": ctx.gather(f"r{rank}"),
                  "shares": [ctx.padded_share(items) for items in ("abcde", "a", "")]}
        with open(f"{out}/{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_two_processes_agree_through_collectives(tmp_path):
    mp.spawn(_worker, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert [r["main"] for r in results] == [True, False]
    for r in results:  # every rank sees the same decision and the same totals
        assert r["sum"] == [3.0, 20.0] and r["mean"] == [1.0]
        assert r["any_one"] is True and r["any_none"] is False and r["texts"] == ["r0", "r1"]
    # uneven work: equal lengths on every rank (padded by repetition), with the index and count of the real items
    assert results[0]["shares"] == [[["a", "b", "c"], 0, 3], [["a"], 0, 1], [[], 0, 0]]
    assert results[1]["shares"] == [[["d", "e", "e"], 3, 2], [["a"], 1, 0], [[], 0, 0]]


def test_a_non_main_rank_trains_but_writes_nothing(tmp_path):
    out = tmp_path / "run"
    result = run_train(small_cfg("grpo", ["trainer.max_steps=1", "trainer.save_every=1"]), str(out),
                       ctx=DistContext(rank=1, world_size=1))
    assert result["steps"] == 1
    assert not out.exists() or not any(out.rglob("*"))


# --------------------------------------------------------------------------- training in two processes

EXTRA = ["trainer.max_steps=3", "trainer.micro_batch_size=4", "trainer.save_every=1", "trainer.keep_last=3"]
HELDOUT = ["trainer.eval_before_after=true", "data.test=synthetic:all?split=test&size=224&n=5", "trainer.eval_k=2"]


def _train_worker(rank: int, init: str, out: str, extra: list[str], resume: bool, preset: str, world: int) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        run_train(small_cfg(preset, EXTRA + extra), out, resume=resume)
    finally:
        dist.destroy_process_group()


def _train_in_group(tmp: Path, name: str, extra: list[str] = (), resume: bool = False, preset: str = "papo_g",
                    world: int = 2) -> Path:
    """A run trained by ``world`` processes joined by a process group (gloo), as torchrun starts them."""
    out = tmp / name
    rendezvous = tmp / f"rendezvous-{name}-{int(resume)}"
    mp.spawn(_train_worker, args=(f"file://{rendezvous}", str(out), list(extra), resume, preset, world),
             nprocs=world, join=True)
    return out


def _rows(run: Path) -> list[dict]:
    measured = ("_s", "_gib", "tokens_per_s")  # times and memory peaks differ between any two runs
    return [{k: v for k, v in json.loads(line).items() if not k.endswith(measured)}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_rows(a: list[dict], b: list[dict], tol: float = 1e-5) -> None:
    assert len(a) == len(b) and [r.keys() for r in a] == [r.keys() for r in b]
    for ra, rb in zip(a, b):
        for k, va in ra.items():
            vb = rb[k]
            if isinstance(va, float) or isinstance(vb, float):
                assert abs(va - vb) <= tol * max(1.0, abs(va)), (ra["step"], k, va, vb)
            else:
                assert va == vb, (ra["step"], k, va, vb)


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("worlds")
    run_train(small_cfg("papo_g", EXTRA + HELDOUT), str(tmp / "one"))
    return tmp, tmp / "one", _train_in_group(tmp, "two", HELDOUT)


def test_two_processes_train_like_one(one_and_two):
    """The same seed at world size 1 and 2: the same rollouts (keyed noise), losses, gradient norms and weights."""
    _, one, two = one_and_two
    rows = _rows(two)
    _assert_same_rows(_rows(one), rows)
    assert rows[-1]["tokens"] > 0 and any(r["kl_prcp"] > 0 for r in rows) and any(r["grad_norm"] > 0 for r in rows)
    w1, w2 = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    assert w1.keys() == w2.keys()
    assert max(float((w1[k].float() - w2[k].float()).abs().max()) for k in w1) < 1e-5
    assert json.loads((two / "final" / "config.json").read_text())["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert (two / "checkpoints" / "step-3" / "dcp").is_dir()  # sharded checkpoints, one RNG file per rank
    assert sorted(p.name for p in (two / "checkpoints" / "step-3").glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]


def test_two_processes_split_the_heldout_check_and_grade_like_one(one_and_two):
    """Each rank grades its share of the 5 held-out samples (3 and 2, one padded), noise keyed by sample index."""
    _, one, two = one_and_two
    for name in ("heldout_before.json", "heldout_after.json"):
        a, b = json.loads((one / name).read_text()), json.loads((two / name).read_text())
        assert a["n"] == b["n"] == 5 and a["k"] == 2
        assert a == b, name


def test_a_sharded_checkpoint_exports_as_a_hugging_face_directory(one_and_two, tmp_path):
    _, _, two = one_and_two
    assert main(["model", "export", "--model", str(two / "checkpoints" / "step-3"), "--out", str(tmp_path / "hf")]) == 0
    exported, final = load_file(tmp_path / "hf" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)


def test_two_processes_resume_exactly_and_at_another_world_size(one_and_two):
    """The two-process run's step-2 checkpoint, resumed by two processes and by one: its third step again."""
    tmp, _, two = one_and_two
    for name in ("stopped", "single"):  # the run as a kill after step 2's checkpoint would leave it
        shutil.copytree(two, tmp / name, ignore=shutil.ignore_patterns("step-3", "final", "heldout_after.json"))
        rows = (tmp / name / "metrics.jsonl").read_text().splitlines()
        (tmp / name / "metrics.jsonl").write_text("\n".join(rows[:2]) + "\n")
    resumed = _train_in_group(tmp, "stopped", resume=True)
    _assert_same_rows(_rows(two), _rows(resumed), tol=0.0)
    run_train(small_cfg("papo_g", EXTRA), str(tmp / "single"), resume=True)
    _assert_same_rows(_rows(two), _rows(tmp / "single"))


def test_vppo_trains_in_two_processes_like_one(tmp_path):
    """VPPO's dependency range spans the whole mini-batch (a min and max over both ranks) and its loss takes the
    mini-batch token mean: the same metrics at world size 1 and 2."""
    # seed 1: groups with different rewards, whose advantages the scales change (each rank's own range fails)
    extra = ["trainer.max_steps=2", "algorithm.online_filter=false", "trainer.save_every=2", "trainer.seed=1"]
    run_train(small_cfg("vppo", EXTRA + extra), str(tmp_path / "one"))
    rows = _rows(_train_in_group(tmp_path, "two", extra, preset="vppo"))
    _assert_same_rows(_rows(tmp_path / "one"), rows)
    assert all(r["visual_dependency"] > 0 for r in rows) and any(r["grad_norm"] > 0 for r in rows)


def _uneven_filter_worker(rank: int, init: str, out: str) -> None:
    from papo.training.trainer import Trainer

    real = Trainer.rollout

    def rollout(self, draws):  # rank 0: both its groups mixed; rank 1: its first mixed, its second all wrong
        exp = real(self, draws)
        for i, s in enumerate(exp.scores):
            s["accuracy"] = float(i % 2 == 0 and (rank == 0 or i < self.cfg.rollout.n))
        return exp

    Trainer.rollout = rollout
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        run_train(small_cfg("dapo", ["trainer.max_steps=2", "trainer.rollout_batch_size=4", "trainer.mini_batch_size=4",
                                     "trainer.micro_batch_size=4", "algorithm.max_filter_rounds=1",
                                     "algorithm.filter_fallback=kept"]), out)
    finally:
        dist.destroy_process_group()


def test_dapo_filter_fallback_trains_every_rank_on_as_many_groups(tmp_path):
    """Rank 0 keeps 2 groups and rank 1 one when the rounds run out: both train on one, so their sharded passes
    match (two micro-batches against one would leave a collective waiting)."""
    procs = mp.start_processes(_uneven_filter_worker, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path / "run")),
                               nprocs=2, join=False, start_method="spawn")
    for _ in range(24):  # 15 s on 2 cores when it works
        if procs.join(timeout=5):
            break
    else:
        for p in procs.processes:
            p.kill()
        pytest.fail("the two ranks did not finish in 120 s: a collective was left waiting")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["filter_rounds"], r["filter_kept_groups"], r["filter_trained_groups"], r["skipped_updates"])
            for r in rows] == [(1, 3, 2, 0)] * 2  # kept 2 + 1, trained 1 + 1
    assert all(r["groups_all_wrong"] == 0.25 for r in rows)  # rank 1's second group, averaged over the ranks


def test_lora_trains_sharded_like_one_process_and_exports_merged(tmp_path):
    """LoRA under FSDP2: the adapters train sharded with the frozen base, the reference is the policy with its
    adapters off; the same metrics as one process, and merged weights in final/ and in an export."""
    extra = ["trainer.max_steps=2", "model.lora_rank=4", "optim.lr=1e-2", "trainer.save_every=2"]
    run_train(small_cfg("papo_g", EXTRA + extra), str(tmp_path / "one"))
    two = _train_in_group(tmp_path, "two", extra)
    rows = _rows(two)
    _assert_same_rows(_rows(tmp_path / "one"), rows)
    assert rows[-1]["ref_kl"] > 0  # the adapters moved the policy off the base
    w1, w2 = load_file(tmp_path / "one" / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    assert w1.keys() == w2.keys() and not any("lora" in k for k in w2)
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-5
    assert main(["model", "export", "--model", str(two / "checkpoints" / "step-2"), "--out", str(tmp_path / "hf")]) == 0
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert exported.keys() == w2.keys() and all(torch.equal(exported[k], w2[k]) for k in w2)


def test_one_process_under_a_process_group_trains_sharded_like_a_plain_one(tmp_path):
    """torchrun --nproc-per-node 1: FSDP2 over a group of one (the sharded path on one GPU), with sharded
    checkpoints; the metrics of a process without a group."""
    extra = ["trainer.max_steps=2", "trainer.save_every=2"]
    run_train(small_cfg("papo_g", EXTRA + extra), str(tmp_path / "plain"))
    one = _train_in_group(tmp_path, "group-of-one", extra, world=1)
    _assert_same_rows(_rows(tmp_path / "plain"), _rows(one))
    assert (one / "checkpoints" / "step-2" / "dcp").is_dir()
    assert not (tmp_path / "plain" / "checkpoints" / "step-2" / "dcp").exists()


def _group_of_one_worker(rank: int, init: str, out: str, body) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=1)
    try:
        Path(out).write_text(json.dumps(body()))
    finally:
        dist.destroy_process_group()


def _in_group_of_one(tmp_path: Path, body) -> dict:
    """``body()``'s result, run in a process of its own under a gloo group of one (the sharded path)."""
    out = tmp_path / "result.json"
    mp.spawn(_group_of_one_worker, args=(f"file://{tmp_path / 'rendezvous'}", str(out), body), nprocs=1, join=True)
    return json.loads(out.read_text())


def _sharded_blocks() -> dict:
    from model_fixtures import tiny_policy

    from papo.models.loading import transformer_blocks
    from papo.training.sharding import shard_model

    policy = tiny_policy()

    def names(modules) -> list[str]:
        ids = {id(m) for m in modules}
        return [name for name, m in policy.model.named_modules() if id(m) in ids]

    before = names(transformer_blocks(policy.model))
    shard_model(policy.root, policy.precision, torch.device("cpu"), 1)
    policy.compile_layers = True
    with policy.compiled_passes():
        routed = [name for name, m in policy.model.named_modules() if m._compiled_call_impl is not None]
    after = names(transformer_blocks(policy.model))
    return {"before": before, "after": after, "routed": routed}


def test_sharded_blocks_are_still_found_and_compiled(tmp_path):
    """fully_shard swaps each block's class for an FSDP subclass: the blocks must still be found by their own
    class name, or nothing compiles under FSDP2 (as happened: one graph, the log-prob head)."""
    got = _in_group_of_one(tmp_path, _sharded_blocks)
    assert got["before"] and got["after"] == got["before"] == got["routed"]
    assert any(".visual." in f".{n}." for n in got["before"]) and any(".layers." in f".{n}." for n in got["before"])


def _block_inputs() -> dict:
    """fp32 weights, bf16 compute, checkpointed blocks, sharded: the floating dtypes of each block call's inputs
    as the model passes them and as the block receives them after FSDP's pre-forward hook, in the forward and in
    the recomputation."""
    from model_fixtures import mixed_batch, tiny_policy

    from papo.models.checkpointing import set_checkpointing
    from papo.models.loading import transformer_blocks
    from papo.models.precision import Precision
    from papo.training.sharding import shard_model

    torch.manual_seed(0)
    policy = tiny_policy()
    policy.precision = Precision(torch.float32, torch.bfloat16)
    set_checkpointing(policy.model, True)
    policy.model.train()
    shard_model(policy.root, policy.precision, torch.device("cpu"), 1)
    _, prompts, images = mixed_batch(policy)
    batch = policy.encode(prompts, images)
    ids, mask = policy.tokenize_completions(["<answer>3</answer>", "left then up"])
    seen: dict[str, dict[str, list[list[str]]]] = {"passed": {}, "received": {}}

    def dtypes(value, key: str) -> list[str]:
        if isinstance(value, (tuple, list)):
            return [d for i, v in enumerate(value) for d in dtypes(v, f"{key}.{i}")]
        return [f"{key}:{value.dtype}"] if isinstance(value, torch.Tensor) and value.is_floating_point() else []

    def record(where: str, name: str):
        def hook(module, args, kwargs):
            seen[where].setdefault(name, []).append(dtypes(list(args), "args") + dtypes(list(kwargs.values()), "kwargs"))
        return hook

    blocks = {id(b) for b in transformer_blocks(policy.model)}
    for name, m in policy.model.named_modules():
        if id(m) in blocks:  # FSDP's pre-forward hook is prepended at fully_shard: one hook before it, one after
            m.register_forward_pre_hook(record("passed", name), with_kwargs=True, prepend=True)
            m.register_forward_pre_hook(record("received", name), with_kwargs=True)
    logp, _ = policy.logprobs(batch, ids, mask)
    logp.sum().backward()
    return seen


def test_sharded_blocks_take_their_inputs_uncast_in_the_forward_and_the_recomputation(tmp_path):
    """Under FSDP2's mixed precision only the root casts its inputs: each block gets what the model computed for
    it (e.g. fp32 vision rope tables), as unsharded, in its forward and its recomputation alike. torch 2.11's
    FSDP2 casts block inputs in the forward but not in the recomputation, and compiled blocks on Qwen2.5-VL-3B
    then failed their first backward."""
    got = _in_group_of_one(tmp_path, _block_inputs)
    assert got["passed"] and got["received"] == got["passed"]
    for name, per_call in got["received"].items():
        assert len(per_call) == 2 and per_call[0] == per_call[1], name  # the forward, then its recomputation
    vision = [c[0] for n, c in got["received"].items() if ".visual." in f".{n}."]
    assert vision and all(any(d.endswith("torch.float32") for d in call) for call in vision)  # the rope tables


def test_mini_batch_token_mean_does_not_depend_on_micro_batch_size(tmp_path):
    """algorithm.token_mean_scope=mini_batch: every valid token weighs the same whatever the micro-batching, so
    the gradient and the updated weights are the same (the logged loss terms stay means of micro-batch means)."""
    norms, weights = [], []
    for micro in (8, 2):
        cfg = small_cfg("papo_g", ["trainer.max_steps=1", f"trainer.micro_batch_size={micro}",
                                   "algorithm.token_mean_scope=mini_batch"])
        run_train(cfg, str(tmp_path / f"micro{micro}"))
        norms.append(_rows(tmp_path / f"micro{micro}")[0]["grad_norm"])
        weights.append(load_file(tmp_path / f"micro{micro}" / "final" / "model.safetensors"))
    assert norms[0] > 0 and abs(norms[0] - norms[1]) <= 1e-5 * norms[0]
    # Adam's first step moves a weight by lr * g / (|g| + eps): where |g| is near eps, rounding-level gradient
    # differences (other passes, other kernels' summation order) become a few percent of lr
    assert max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0]) < 0.05 * cfg.optim.lr


def test_papo_train_launches_torchrun_and_one_rank_out_of_memory_stops_the_job(tmp_path):
    """`papo train --nproc-per-node 2` starts two processes under torchrun (gloo on CPU) that train as one run.
    In step 2 rank 1 alone runs out of memory: the job stops with that rank's message, and the step-1 checkpoint
    and metrics stay as they were."""
    out = tmp_path / "run"
    sets = [a for kv in SMALL + ["trainer.max_steps=3", "trainer.micro_batch_size=4", "trainer.save_every=1"]
            for a in ("--set", kv)]
    env = {**os.environ, "PAPO_FAILPOINTS": "rank1:update=oom@2"}  # rank 1's second micro-batch: step 2
    done = subprocess.run([sys.executable, "-m", "papo", "train", "--preset", "grpo", "--device", "cpu", "--out", str(out),
                           "--nproc-per-node", "2", *sets], capture_output=True, text=True, timeout=600, env=env)
    assert "torch.distributed.run --standalone --nproc-per-node=2 -m papo train" in done.stderr
    assert done.returncode != 0
    assert "stopped: out of memory during the update phase of step 2 on rank 1 of 2" in done.stderr, done.stderr[-3000:]
    assert "resume from step-1 with --resume" in done.stderr
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1] and rows[0]["tokens"] > 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"]
    assert (out / "checkpoints" / "step-1" / "dcp").is_dir()
