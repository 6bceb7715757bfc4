"""The distributed context: identity at world size 1, real collectives under a process group (2 CPU processes,
gloo), and a non-main rank that trains without writing a file."""

import json

import torch.distributed as dist
import torch.multiprocessing as mp
from model_fixtures import small_cfg

from papo.training.distributed import DistContext
from papo.training.loop import run_train


def test_a_single_process_reduces_to_itself():
    ctx = DistContext.current()
    assert (ctx.rank, ctx.world_size, ctx.is_main) == (0, 1, True)
    assert ctx.sum(2.0, 3.0) == [2.0, 3.0] and ctx.mean(4.0) == [4.0]
    assert ctx.any(True) and not ctx.any(False) and ctx.gather_text("x") == ["x"]


def _worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        ctx = DistContext.current()
        result = {"rank": ctx.rank, "main": ctx.is_main, "sum": ctx.sum(rank + 1.0, 10.0), "mean": ctx.mean(rank * 2.0),
                  "any_one": ctx.any(rank == 1), "any_none": ctx.any(False), "texts": ctx.gather_text(f"r{rank}")}
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


def test_a_non_main_rank_trains_but_writes_nothing(tmp_path):
    out = tmp_path / "run"
    result = run_train(small_cfg("grpo", ["trainer.max_steps=1", "trainer.save_every=1"]), str(out),
                       ctx=DistContext(rank=1, world_size=1))
    assert result["steps"] == 1
    assert not out.exists() or not any(out.rglob("*"))
