"""The latency model (per-layer lookup tables), its cache, the width-multiple probe, the latency
knapsack and prune(target_speedup=...), all on a fake timer whose times are exact functions of the
layer shapes, so every assertion is about values computed by hand (no measured timing is asserted)."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch

from flowprune.errors import FlowpruneError
from flowprune.latency import (
    LatencyModel,
    LayerCost,
    LayerSpec,
    Table,
    _grid,
    _monotone,
    build_latency_model,
    parse_speedup,
    probe_multiple,
    unit_rules,
)
from flowprune.measure import count_macs_params
from flowprune.models import build_model
from flowprune.plan_latency import check_reachable_speedup, plan_for_speedup
from flowprune.pruning.structural import prune
from flowprune.units import find_units

SHAPE = (3, 16, 16)


class FakeTimer:
    """Seconds = MACs * 1e-9 (a layer: :meth:`LayerSpec.macs`; a model: Torch-Pruning's count)."""

    def __init__(self, slow_unless_multiple_of: int = 1):
        self.calls = 0
        self.m = slow_unless_multiple_of

    def layers(self, points):
        self.calls += len(points)
        return {k: s.macs(ci, co) * 1e-9 * (1.0 if co % self.m == 0 else 1.3) for k, (s, ci, co) in points.items()}

    def models(self, models, x):
        self.calls += len(models)
        return SimpleNamespace(median={k: count_macs_params(m, tuple(x.shape[1:]))[0] * 1e-9
                                       for k, m in models.items()})


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    m = build_model("resnet20", SHAPE, 10)
    x = torch.randn(1, *SHAPE)
    return m, find_units(m, x), x


def test_table_bilinear_interpolation_and_clamping():
    t = Table(ci=[1, 3], co=[2, 4], t=[[1.0, 2.0], [3.0, 5.0]])
    assert t(1, 2) == 1.0 and t(3, 4) == 5.0
    assert t(2, 3) == pytest.approx(0.5 * (1.5 + 4.0))  # rows at co=3: 1.5 and 4.0
    assert t(0, 0) == 1.0 and t(9, 9) == 5.0  # clamped to the grid


def test_monotone_and_grid():
    assert _monotone([[1.0, 0.5], [0.8, 2.0]]) == [[1.0, 1.0], [1.0, 2.0]]
    assert _grid(64, 8, 8) == [8, 16, 32, 48, 64]
    assert _grid(10, 1, 1) == [1, 2, 5, 8, 10]  # round(2.5) = 2 (banker's), round(7.5) = 8


def test_unit_rules_round_widths_to_the_multiple():
    units = [SimpleNamespace(name="a", size=64, kind="channel"), SimpleNamespace(name="b", size=6, kind="channel"),
             SimpleNamespace(name="h", size=12, kind="head")]
    step, floor = unit_rules(units, 8, 10)
    assert step == {"a": 8, "b": 1, "h": 1}
    assert floor == {"a": 16, "b": 6, "h": 10}  # min_width 10 rounded up to 16; b narrower than 8 keeps 6


def test_lut_predicts_exactly_what_the_fake_timer_says(net):
    m, units, x = net
    lm = build_latency_model(m, units, x, batch_size=4, cache=False, timer=FakeTimer(), multiple=4)
    assert lm.full_s == pytest.approx(count_macs_params(m, SHAPE)[0] * 1e-9)
    truth = sum(lay.spec.macs(*lay.channels({}, lm.sizes)) for lay in lm.layers) * 1e-9
    assert 0 <= lm.fixed_s < 0.05 * lm.full_s  # a CNN: every conv is cut by some unit
    assert lm.scale == pytest.approx((lm.full_s - lm.fixed_s) / truth, rel=1e-12)
    # MACs are bilinear in (in, out) channels, so bilinear interpolation between grid points is exact
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        w = {n: int(torch.randint(lm.floors[n] // lm.steps[n], s // lm.steps[n] + 1, (1,), generator=g)) * lm.steps[n]
             for n, s in lm.sizes.items()}
        exact = lm.fixed_s + sum(lay.spec.macs(*lay.channels(w, lm.sizes)) for lay in lm.layers) * 1e-9 * lm.scale
        assert lm.latency(w) == pytest.approx(exact, rel=1e-9)


def test_cache_round_trip_and_key(net, tmp_path):
    m, units, x = net
    first = FakeTimer()
    a = build_latency_model(m, units, x, batch_size=4, cache=tmp_path, timer=first, multiple=None)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and first.calls > 0
    d = json.loads(files[0].read_text())  # JSON, no pickle
    assert d["key"]["batch_size"] == 4 and d["key"]["backend"] == "eager" and d["multiple"] == a.multiple
    again = FakeTimer()
    b = build_latency_model(m, units, x, batch_size=4, cache=tmp_path, timer=again)
    assert again.calls == 0  # nothing re-measured
    assert b.tables == a.tables and b.multiple == a.multiple and b.full_s == a.full_s and b.probe == a.probe
    other = FakeTimer()
    build_latency_model(m, units, x, batch_size=8, cache=tmp_path, timer=other)
    assert other.calls > 0 and len(list(tmp_path.glob("*.json"))) == 2  # another batch size: another table


def test_probe_picks_the_smallest_fast_multiple():
    spec = LayerSpec("conv", 512, 512, (3, 3), (1, 1), (1, 1), (1, 1), 1, False, False, (7, 7))
    lay = LayerCost("c", spec, 0, {"u": 1}, 0, {"u": 1})
    m, rec = probe_multiple(FakeTimer(slow_unless_multiple_of=8), [lay])
    assert m == 8 and rec["widths"] == {"1": 255, "2": 254, "4": 252, "8": 248, "16": 240, "32": 224, "64": 256}
    assert rec["per_mac_vs_best"]["1"] == pytest.approx(1.3) and rec["per_mac_vs_best"]["16"] == pytest.approx(1.0)
    assert probe_multiple(FakeTimer(), [lay])[0] == 1


def _hand_lm():
    """Two units of 4: layer A costs 1 s per channel of unit a, layer B 3 s per channel of unit b."""
    sa, sb = LayerSpec("linear", 1, 4), LayerSpec("linear", 2, 4)
    layers = [LayerCost("A", sa, 1, {}, 0, {"a": 1}), LayerCost("B", sb, 2, {}, 0, {"b": 1})]
    tables = {sa.key(): Table([1], [1, 4], [[1.0, 4.0]]), sb.key(): Table([2], [1, 4], [[3.0, 12.0]])}
    key = {"device": "hand", "batch_size": 1, "backend": "eager"}
    return LatencyModel(key, 1, {"a": 4, "b": 4}, {"a": 1, "b": 1}, {"a": 1, "b": 1}, layers, tables, 16.0, 1.0)


def test_knapsack_allocation_by_hand():
    lm = _hand_lm()
    units = [SimpleNamespace(name="a", size=4, kind="channel"), SimpleNamespace(name="b", size=4, kind="channel")]
    scores = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([7.0, 1.0, 5.0, 6.0])}
    mm = SimpleNamespace(total=16.0, macs=lambda w: float(w.get("a", 4) + 3 * w.get("b", 4)))
    # score lost per second saved: b 1/3 -> a 1/1 -> b 5/3 -> a 2/1 (ties b's 6/3; less score lost first):
    # latency 16 -> 13 -> 12 -> 9 -> 8 = 16 / 2
    plan = plan_for_speedup(None, units, scores, latency_model=lm, target_speedup=2.0, example_inputs=None,
                            normalize="none", macs_model=mm)
    assert plan.widths == {"a": 2, "b": 2}
    assert plan["a"].tolist() == [0, 1] and plan["b"].tolist() == [1, 2]
    assert plan.predicted_speedup == pytest.approx(2.0) and plan.measured_speedup is None
    assert lm.max_speedup() == pytest.approx(16.0 / 4.0)
    with pytest.raises(FlowpruneError, match=r"5x cannot be reached on hand at batch 1.*allowed: 1 < target_speedup <= 4\.00"):
        check_reachable_speedup(lm, 5.0)


@pytest.mark.parametrize("bad, needle", [(0, "> 1"), ("3y", "such as 3 or '3x'"), (1.0, "> 1"),
                                         (float("inf"), "> 1"), (True, "> 1")])
def test_parse_speedup_rejects(bad, needle):
    with pytest.raises(FlowpruneError, match="target_speedup must be a speed-up factor .*" + re.escape(needle)):
        parse_speedup(bad)
    assert parse_speedup("3x") == 3.0


def _batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, *SHAPE, generator=g), torch.randint(0, 10, (8,), generator=g))]


@pytest.mark.parametrize("kw, needle", [
    ({"target_speedup": 2.0, "batch_size": 0}, "batch_size must be a positive integer, got 0"),
    ({"target_speedup": 2.0, "batch_size": -2}, "got -2"),
    ({"target_speedup": 2.0, "backend": "onnxruntime"}, "backend 'onnxruntime'.*allowed: eager"),
    ({"target_speedup": 2.0, "device": "cuda:9"}, "cuda:9"),
    ({"target_speedup": 2.0, "device": "tpu"}, "tpu"),
    ({"target_speedup": 2.0, "target_macs": 2.0}, "not target_macs and target_speedup"),
    ({"target_speedup": 1000.0}, r"1000x cannot be reached.*allowed: 1 < target_speedup <= "),
])
def test_bad_input_before_any_pruning(net, kw, needle):
    m, units, x = net
    timer = FakeTimer()
    lm = build_latency_model(m, units, x, batch_size=1, cache=False, timer=timer, multiple=4)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    timer.calls = 0
    with pytest.raises(FlowpruneError, match=needle):
        prune(m, _batches(), "l1", latency_model=lm, **kw)
    assert timer.calls == 0  # nothing timed (the model is neither cut nor measured)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


@pytest.mark.parametrize("target", [2.0, 3.0])
def test_prune_to_a_speedup_end_to_end(net, target):
    m, units, x = net
    lm = build_latency_model(m, units, x, batch_size=1, cache=False, timer=FakeTimer(), multiple=4)
    res = prune(m, _batches(), "l1", target_speedup=target, latency_model=lm)
    rec = res.history[-1]
    # the plan meets the target on the latency model, within the planner's tolerance of the measured one
    assert rec["predicted_speedup"] >= target * 0.95
    assert all(w % 4 == 0 or w == lm.sizes[n] for n, w in res.widths.items())
    lat = res.latency
    assert lat["target_speedup"] == target and lat["batch_size"] == 1 and lat["multiple"] == 4
    assert lat["macs_reduction"] == pytest.approx(res.dense_macs / res.macs)
    # the fake timer's model time is MACs: the "measured" speed-up is the MACs reduction, exactly
    assert lat["measured_speedup_b1"] == pytest.approx(lat["macs_reduction"])
    assert lat["within_10pct"] == (abs(lat["measured_speedup_b1"] / target - 1) <= 0.10)
    assert res.model(x).shape == (1, 10)
    assert res.to_dict()["latency"]["target_speedup"] == target


def test_prune_cli_target_speedup_reports_the_speedup(tmp_path, capsys, monkeypatch):
    """The CLI path, with the fake timer in place of the device timer: the printed report and
    results.json carry the latency record, and the tables land in --latency-cache."""
    from flowprune import io
    from flowprune.cli import main

    monkeypatch.setattr("flowprune.latency.DeviceTimer", lambda device, batch_size, backend: FakeTimer())
    torch.manual_seed(0)
    io.save(build_model("resnet20", (1, 8, 8), 10), tmp_path / "dense")
    rc = main(["prune", "--checkpoint", str(tmp_path / "dense"), "--data", "digits", "--test-fraction", "0.05",
               "--method", "l1", "--target-speedup", "2x", "--batch-size", "4", "--calib-batches", "1",
               "--latency-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--no-speed",
               "--device", "cpu"])
    assert rc == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    lat = res["latency"]
    assert lat["target_speedup"] == 2.0 and lat["batch_size"] == 4 and lat["backend"] == "eager"
    assert lat["measured_speedup_b4"] == pytest.approx(lat["macs_reduction"])  # the fake timer's time is MACs
    assert abs(lat["measured_speedup_b4"] / 2.0 - 1) <= 0.10 and lat["within_10pct"]
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    assert "speed-up on" in capsys.readouterr().out
    assert io.load(tmp_path / "out")(torch.randn(2, 1, 8, 8)).shape == (2, 10)
