"""Speed in every result (issue 21): the fields results.json carries, never how fast anything ran."""

from __future__ import annotations

import json

import pytest
import torch

from flowprune import io
from flowprune.cli import main
from flowprune.measure import speed_compare
from flowprune.models import build_model

SPEED_KEYS = {"speedup_b1", "speedup_b4", "speed_backend", "speed"}


def _check_speed(sp: dict, base: str, others: list[str], batches: list[int]) -> None:
    assert sp["batch_sizes"] == batches and sp["backend"] == "eager" and sp["device"] == "cpu"
    assert sp["threads"] >= 1 and sp["rounds"] >= 1
    for b in batches:
        e = sp[f"b{b}"]
        assert set(e["seconds"]) == {base, *others}
        for o in others:  # a speed-up is the ratio of the medians recorded, or None when refused
            v = e["speedup"][o]
            if v is None:
                assert any(f"{o} vs {base}" in m for m in sp["refused"])
            else:
                assert v == pytest.approx(e["seconds"][base] / e["seconds"][o])
                assert e["per_second"][o] == pytest.approx(b / e["seconds"][o])


def test_speed_compare_structure_and_macs_next_to_it():
    torch.manual_seed(0)
    dense = build_model("lenet300", (1, 8, 8), 10, hidden=(64, 32))
    small = build_model("lenet300", (1, 8, 8), 10, hidden=(16, 8))
    sp = speed_compare({"dense": dense, "small": small}, base="dense", batch_sizes=(1, 4), rounds=2,
                       min_round_s=0.0)
    _check_speed(sp, "dense", ["small"], [1, 4])
    # the MACs reduction beside it is Torch-Pruning's count: 64*64+64 + 64*32+32 + 32*10+10 (dense) ...
    dense_macs = (64 * 64 + 64) + 64 + (64 * 32 + 32) + 32 + (32 * 10 + 10)
    small_macs = (64 * 16 + 16) + 16 + (16 * 8 + 8) + 8 + (8 * 10 + 10)
    assert sp["macs"] == {"dense": dense_macs, "small": small_macs}
    assert sp["macs_reduction"]["small"] == pytest.approx(dense_macs / small_macs)
    json.dumps(sp)  # JSON-safe


def test_speed_compare_bad_input():
    from flowprune.errors import FlowpruneError

    m = build_model("lenet300", (1, 8, 8), 10, hidden=(8,))
    with pytest.raises(FlowpruneError, match="base 'dense'"):
        speed_compare({"m": m}, base="dense")
    with pytest.raises(FlowpruneError, match="batch size"):
        speed_compare({"dense": m}, base="dense", batch_sizes=(0,))


def test_prune_results_json_has_the_speed_fields(tmp_path, capsys):
    torch.manual_seed(0)
    dense = build_model("resnet20", (1, 8, 8), 10)
    io.save(dense, tmp_path / "dense")
    rc = main(["prune", "--checkpoint", str(tmp_path / "dense"), "--data", "digits", "--test-fraction", "0.05",
               "--method", "l1", "--target-macs", "2x", "--calib-batches", "2", "--out", str(tmp_path / "out"),
               "--speed-batch", "4", "--speed-rounds", "1"])
    assert rc == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert SPEED_KEYS <= set(res) and res["speed_backend"] == "eager on cpu"
    _check_speed(res["speed"], "dense", ["pruned"], [1, 4])
    assert res["speed"]["macs_reduction"]["pruned"] == pytest.approx(res["macs_reduction"])
    assert res["speedup_b4"] == res["speed"]["b4"]["speedup"]["pruned"]
    out = capsys.readouterr().out
    assert "speed-up b1" in out and "timed together, interleaved" in out


def test_route_results_json_has_the_speed_fields(tmp_path):
    from flowprune.data import load_dataset
    from flowprune.route.api import route_experts

    torch.manual_seed(0)
    data = load_dataset("digits", seed=0)
    heavy = build_model("lenet300", data.input_shape, data.num_classes, hidden=(32,)).eval()
    light = build_model("lenet300", data.input_shape, data.num_classes, hidden=(8,)).eval()
    res = route_experts(light, heavy, data, heavy_budget=0.5, tolerance=0.1, out_dir=tmp_path, sweep=False,
                        diagnostic=False, rounds=1, latency_samples=4)
    r = json.loads((tmp_path / "results.json").read_text())
    assert {"speedup_b1", "speedup_b64", "speedup_b256", "macs_reduction", "speed_backend", "speed"} <= set(r)
    sp = r["speed"]
    assert r["macs_reduction"] == pytest.approx(1 / r["C_cascade"])
    # one interleaved measurement per batch size, with its load and rounds recorded
    for b in ("b1", "b64", "b256"):
        t = sp["timing"][b]
        assert set(t["seconds_per_pass"]) == {"heavy", "light", "routed"} and t["rounds"] >= 1
        assert "load_before" in t and 0.0 <= t["heavy_usage"] <= 1.0
    for b in (64, 256):
        thr = sp["routed"][f"throughput_b{b}"]
        assert (thr is None) == (sp[f"routed_speedup_b{b}"] is None)
        if thr is not None:
            assert sp[f"routed_speedup_b{b}"] == pytest.approx(thr / sp["heavy"][f"throughput_b{b}"])
    assert res.summary()["speedup_b64"] == r["speedup_b64"]


def test_hyperflows_sparse_speed_fields():
    import argparse

    from flowprune.commands.hyperflows import _sparse_speed
    from flowprune.data import load_dataset

    torch.manual_seed(0)
    data = load_dataset("digits", seed=0)
    m = build_model("lenet300", data.input_shape, data.num_classes, hidden=(64, 32)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:  # 90 % of every weight matrix zero
                p.mul_((torch.rand_like(p) > 0.9).float())
    args = argparse.Namespace(no_speed=False, speed_batch=4, speed_backend="eager", speed_rounds=1)
    res = _sparse_speed(args, m, data, sparsity=0.9)
    sp = res["speed"]
    _check_speed(sp, "dense", ["sparse", "auto"], [1, 4])
    # the work of the sparse forms is the nonzero MACs: dense MACs x density
    assert sp["macs"]["sparse"] == sp["macs"]["auto"] == round(sp["macs"]["dense"] * 0.1)
    assert {"dense_latency_ms_b1", "sparse_latency_ms_b1", "auto_latency_ms_b1", "sparse_layers"} <= set(sp)
    assert res["speedup_b4"] == sp["b4"]["speedup"]["auto"]
