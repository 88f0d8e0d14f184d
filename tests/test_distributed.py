"""torchrun on the CPU: 2 processes over gloo on loopback give the 1-process results.

One spawn of 2 worker processes does everything (process start-up dominates the cost): AGF,
Taylor, divergence and Wanda scores on a ResNet-20 and the cut plan they give, two DDP fine-tune
steps of an MLP on an odd global batch, ``flowprune prune`` through the CLI with fine-tuning, and a
rank that dies (the other stops with a clear error).
The parent process computes the same things as one process and compares.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from flowprune import distributed
from flowprune.cli import main
from flowprune.data import load_dataset
from flowprune.errors import FlowpruneError
from flowprune.io import load, save
from flowprune.models import build_model
from flowprune.plan import plan_cuts
from flowprune.scores import get_score
from flowprune.train import TrainConfig, fit
from flowprune.units import find_units

WORLD = 2
SCORES = ("agf", "taylor", "divergence", "wanda")
CALIB = dict(batch_size=16, num_batches=3, seed=3)  # 3 batches over 2 ranks: 2 + 1 (unequal shares)
FIT = dict(epochs=1, lr=0.1, batch_size=63, augment=False, seed=1)  # odd global batch: slices 32 + 31
PRUNE_ARGS = ["prune", "--checkpoint", "{ck}", "--data", "mnist5k", "--method", "agf", "--ratio", "0.5",
              "--calib-batches", "4", "--calib-batch-size", "32", "--finetune-epochs", "1", "--lr", "0.05",
              "--no-speed", "--no-report", "--out", "{out}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scores_and_plan(model, data):
    batches = data.calibration_batches(**CALIB)
    x = torch.randn(1, *data.input_shape)
    units = find_units(model, x)
    out = {name: get_score(name)(model, units, batches) for name in SCORES}
    plan = plan_cuts(model, units, out["agf"], example_inputs=x, ratio=0.5, budget="global")
    out["plan"] = {k: sorted(int(i) for i in v) for k, v in plan.items()}
    return out


def _fit_step(mlp, data):
    fit(mlp, data, TrainConfig(**FIT), max_batches_per_epoch=2, progress=False)
    return {k: v.detach().clone() for k, v in mlp.state_dict().items()}


def _worker(rank: int, port: int, tmp: str, port2: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), FLOWPRUNE_DIST_TIMEOUT="60")
    torch.set_num_threads(1)
    t = Path(tmp)
    assert distributed.init_from_env()
    assert distributed.world_size() == WORLD and distributed.rank() == rank
    data = load_dataset("mnist5k", seed=0)
    res = _scores_and_plan(load(t / "resnet"), data)
    res["fit"] = _fit_step(load(t / "mlp"), data)
    try:
        distributed.shard([1], "calibration batches")
    except FlowpruneError as e:
        res["too_few"] = str(e)
    torch.save(res, t / f"rank{rank}.pt")
    argv = [a.format(ck=t / "mlp", out=t / "prune2") for a in PRUNE_ARGS]
    res["cli_rc"] = main(argv)  # joins the existing group; its teardown ends it
    torch.save(res, t / f"rank{rank}.pt")
    # a rank that dies: the other one stops with one clear error instead of hanging
    os.environ.update(MASTER_PORT=str(port2), FLOWPRUNE_DIST_TIMEOUT="20")
    assert distributed.init_from_env()
    if rank == 1:
        os._exit(0)
    try:
        distributed.all_reduce_sum(torch.ones(2))
        (t / "dead.txt").write_text("no error")
    except FlowpruneError as e:
        (t / "dead.txt").write_text(str(e))
    distributed.shutdown()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    data = load_dataset("mnist5k", seed=0)
    torch.manual_seed(0)
    save(build_model("resnet20", data.input_shape, 10).eval(), tmp / "resnet")
    torch.manual_seed(0)
    save(build_model("lenet300", data.input_shape, 10, hidden=[32, 16]).eval(), tmp / "mlp")
    before = set(Path(tempfile.gettempdir()).glob("flowprune-rank*"))
    mp.start_processes(_worker, args=(_free_port(), str(tmp), _free_port()), nprocs=WORLD, start_method="spawn",
                       join=True)
    leftovers = set(Path(tempfile.gettempdir()).glob("flowprune-rank*")) - before
    single = _scores_and_plan(load(tmp / "resnet"), data)
    single["fit"] = _fit_step(load(tmp / "mlp"), data)
    argv = [a.format(ck=tmp / "mlp", out=tmp / "prune1") for a in PRUNE_ARGS]
    assert main(argv) == 0
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {"tmp": tmp, "single": single, "ranks": ranks, "leftovers": leftovers,
            "dead": (tmp / "dead.txt").read_text()}


@pytest.mark.parametrize("name", SCORES)
def test_two_process_scores_equal_one_process(runs, name):
    one = runs["single"][name]
    for res in runs["ranks"]:
        assert set(res[name]) == set(one)
        for unit, s in one.items():
            torch.testing.assert_close(res[name][unit], s, rtol=1e-6, atol=1e-12)
    r0, r1 = runs["ranks"]
    for unit in one:  # every rank holds bit-identical scores (broadcast from rank 0)
        assert torch.equal(r0[name][unit], r1[name][unit])


def test_two_process_cut_plan_equals_one_process(runs):
    assert runs["ranks"][0]["plan"] == runs["single"]["plan"] == runs["ranks"][1]["plan"]
    assert any(runs["single"]["plan"].values())


def test_two_process_finetune_steps_match_one_process(runs):
    one = runs["single"]["fit"]
    for res in runs["ranks"]:
        for k, v in one.items():
            torch.testing.assert_close(res["fit"][k], v, rtol=1e-5, atol=1e-6)
    moved = any(not torch.equal(runs["single"]["fit"][k], v)
                for k, v in load(runs["tmp"] / "mlp").state_dict().items())
    assert moved  # the steps did change the weights


def test_fewer_batches_than_processes_is_a_clear_error(runs):
    msg = runs["ranks"][0]["too_few"]
    assert "1 calibration batches cannot be shared by 2 processes" in msg and "--calib-batches 2" in msg


def test_cli_under_two_processes_writes_one_set_of_outputs(runs):
    tmp = runs["tmp"]
    assert [r["cli_rc"] for r in runs["ranks"]] == [0, 0]
    assert runs["leftovers"] == set()  # rank 1's scratch copy of --out is gone
    two, one = tmp / "prune2", tmp / "prune1"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    r2, r1 = json.loads((two / "results.json").read_text()), json.loads((one / "results.json").read_text())
    assert r2["widths"] == r1["widths"]
    assert r2["dense_accuracy"] == r1["dense_accuracy"]
    assert r2["accuracy_after_cut"] == r1["accuracy_after_cut"]
    m2, m1 = load(two), load(one)
    for (k, a), (_, b) in zip(m2.state_dict().items(), m1.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


def test_a_dead_rank_stops_the_others_with_a_clear_error(runs):
    msg = runs["dead"]
    assert msg.startswith("rank 0: all_reduce failed: another process of the torchrun job stopped"), msg


def test_single_process_helpers_are_no_ops():
    assert not distributed.active() and distributed.is_main() and distributed.world_size() == 1
    t = torch.arange(3.0)
    assert distributed.all_reduce_sum(t) is t
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    assert not distributed.init_from_env()  # no WORLD_SIZE: nothing to join
