"""Tests for flowprune.route: dispatch, routers, calibration, cost, save/load, CLI, bad input."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

from flowprune.errors import FlowpruneError
from flowprune.models import build_model, forward_with_features
from flowprune.route import (
    Cascade,
    build_early_exit,
    calibrate,
    collect_outputs,
    fit_learned_router,
    load_cascade,
    make_router,
    route_experts,
    save_cascade,
)
from flowprune.route.calibrate import routed_accuracy, threshold_for_budget
from flowprune.route.cost import c_cascade, c_mix, mac_costs
from flowprune.route.diagnostics import dynamic_range, per_sample_agf_signal
from flowprune.route.routers import auroc
from flowprune.train import TrainConfig, fit

_LIGHT: dict = {}


@pytest.fixture
def light_lenet(mnist5k_data):
    """LeNet with hidden (30, 10), one epoch: clearly worse than the 300-100 heavy fixture."""
    if "m" not in _LIGHT:
        torch.manual_seed(1)
        m = build_model("lenet300", mnist5k_data.input_shape, 10, hidden=(30, 10))
        fit(m, mnist5k_data, TrainConfig(epochs=1, lr=0.05, augment=False), progress=False)
        _LIGHT["m"] = m.eval()
    return copy.deepcopy(_LIGHT["m"])


@pytest.fixture
def cascade(light_lenet, trained_lenet_mnist):
    return Cascade(light_lenet, trained_lenet_mnist, make_router("confidence"), 0.0)


def _x(data, n=200):
    return data.test.tensors[0][:n]


@pytest.mark.parametrize("router", ["confidence", "entropy", "l1"])
def test_routed_outputs_equal_chosen_expert(cascade, mnist5k_data, router):
    cascade.router = make_router(router, **({"direction": "low_is_hard"} if router == "l1" else {}))
    x = _x(mnist5k_data)
    with torch.no_grad():
        light_logits, _ = forward_with_features(cascade.light, x)
        heavy_logits = cascade.heavy(x)
        scores = cascade.router(light_logits, forward_with_features(cascade.light, x)[1])
    cascade.threshold = float(scores.median())
    out = cascade.route(x)
    esc = out.expert.bool()
    assert 0 < int(esc.sum()) < len(x)
    assert torch.equal(esc, scores > cascade.threshold)
    torch.testing.assert_close(out.logits[~esc], light_logits[~esc])
    torch.testing.assert_close(out.logits[esc], heavy_logits[esc], rtol=1e-5, atol=1e-5)
    assert torch.equal(cascade(x), out.logits)


@pytest.mark.parametrize("router", ["confidence", "entropy", "l1", "learned"])
def test_batched_dispatch_equals_one_by_one(cascade, mnist5k_data, router):
    x = _x(mnist5k_data, 32)
    if router == "learned":
        outs, _ = _outs(cascade, mnist5k_data)
        cascade.router = fit_learned_router(outs.light_logits, outs.feats, ~outs.light_correct, epochs=30)
    else:
        cascade.router = make_router(router, **({"direction": "high_is_hard"} if router == "l1" else {}))
    with torch.no_grad():
        lo, f = forward_with_features(cascade.light, x)
        cascade.threshold = float(cascade.router(lo, f).quantile(0.6))
    batched = cascade.route(x)
    for i in range(len(x)):
        one = cascade.route(x[i:i + 1])
        assert int(one.expert[0]) == int(batched.expert[i])
        torch.testing.assert_close(one.logits[0], batched.logits[i], rtol=1e-5, atol=1e-5)


def test_batch_of_one_and_all_or_none_escalated(cascade, mnist5k_data):
    x = _x(mnist5k_data, 16)
    with torch.no_grad():
        lo, hi = cascade.light(x), cascade.heavy(x)
    none = cascade.route(x, threshold=math.inf)
    assert none.expert.sum() == 0 and torch.equal(none.logits, lo)
    every = cascade.route(x, threshold=-math.inf)
    assert every.expert.sum() == len(x)
    torch.testing.assert_close(every.logits, hi, rtol=1e-5, atol=1e-5)
    for t in (math.inf, -math.inf):
        one = cascade.route(x[:1], threshold=t)
        assert one.logits.shape == (1, 10) and one.expert.shape == (1,)


def test_early_exit_same_interface(trained_lenet_mnist, mnist5k_data):
    ee = build_early_exit(trained_lenet_mnist, mnist5k_data, epochs=1)
    x = _x(mnist5k_data, 100)
    with torch.no_grad():
        full = trained_lenet_mnist(x)
        exit_logits = ee.head(ee.prefix(x))
    outs = collect_outputs(ee, mnist5k_data.val)
    cal = calibrate(ee, outs, heavy_budget=0.4)
    assert abs(cal.calib_heavy_usage - 0.4) <= 0.01
    o = ee.route(x)
    esc = o.expert.bool()
    assert 0 < int(esc.sum()) < len(x)
    torch.testing.assert_close(o.logits[~esc], exit_logits[~esc])
    torch.testing.assert_close(o.logits[esc], full[esc], rtol=1e-5, atol=1e-5)
    costs = mac_costs(ee)
    assert 0 < costs["c_l"] < 1 and 0 < costs["c_rest"] < 1


# ----------------------------------------------------------------------------------------- calibration

_OUTS: dict = {}


def _outs(cascade, data):
    if "val" not in _OUTS:
        _OUTS["val"] = collect_outputs(cascade, data.val)
        _OUTS["test"] = collect_outputs(cascade, data.test)
    return _OUTS["val"], _OUTS["test"]


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(budget=st.floats(0.05, 0.95), router=st.sampled_from(["confidence", "entropy", "l1"]))
def test_budget_lands_within_tolerance_on_held_out(cascade, mnist5k_data, budget, router):
    val, test = _outs(cascade, mnist5k_data)
    cascade.router = make_router(router)
    cal = calibrate(cascade, val, heavy_budget=budget)
    assert abs(cal.calib_heavy_usage - budget) <= 1.5 / len(val)  # exact up to ties on the calibration split
    with torch.no_grad():
        scores = cascade.router(test.light_logits, test.feats)
    usage, _ = routed_accuracy(scores, cal.threshold, test)
    sd = math.sqrt(budget * (1 - budget))
    tol = 3 * sd * (1 / math.sqrt(len(val)) + 1 / math.sqrt(len(test))) + 2 / len(val)
    assert abs(usage - budget) <= tol


def test_max_drop_zero_keeps_heavy_accuracy_on_calibration(cascade, mnist5k_data):
    val, test = _outs(cascade, mnist5k_data)
    cal = calibrate(cascade, val, max_drop=0.0)
    assert cal.calib_accuracy >= cal.calib_heavy_accuracy - 1e-9
    assert cal.calib_heavy_usage < 1.0  # the light expert is right often enough to skip some inputs
    looser = calibrate(cascade, val, max_drop=0.05)
    assert looser.calib_heavy_usage <= cal.calib_heavy_usage


def test_confidence_routing_beats_random(cascade, mnist5k_data):
    val, test = _outs(cascade, mnist5k_data)
    with torch.no_grad():
        s = cascade.router(test.light_logits, None)
    tau = threshold_for_budget(cascade.router(val.light_logits, None), 0.4)
    u, acc = routed_accuracy(s, tau, test)
    # paired on the same test images: routed correct minus what random routing at usage u gets on average;
    # the mean difference must exceed 3 of its standard errors (measured: 0.062 = 83.2% - 77.0% at u = 0.41)
    light, heavy = test.light_correct.float(), test.heavy_correct.float()
    d = torch.where(s > tau, heavy, light) - ((1 - u) * light + u * heavy)
    assert float(d.mean()) == pytest.approx(acc - float((1 - u) * light.mean() + u * heavy.mean()), abs=1e-6)
    assert float(d.mean()) > 3 * float(d.std()) / math.sqrt(len(d)), (acc, u, float(d.mean()))
    # the confidence ranks the light expert's mistakes above chance by more than 3 standard errors
    # (Hanley & McNeil's standard error of an AUROC; measured: 0.76, ~15 standard errors above 0.5)
    a, n1, n0 = auroc(s, ~test.light_correct), int((~test.light_correct).sum()), int(test.light_correct.sum())
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = math.sqrt((a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a)) / (n1 * n0))
    assert a > 0.5 + 3 * se, (a, se)


def test_random_router_budget(cascade, mnist5k_data):
    val, _ = _outs(cascade, mnist5k_data)
    cascade.router = make_router("random", seed=3)
    cal = calibrate(cascade, val, heavy_budget=0.3)
    assert cal.threshold == pytest.approx(0.7)
    o = cascade.route(mnist5k_data.test.tensors[0])
    assert abs(o.heavy_usage - 0.3) < 0.06


def test_l1_direction_resolved_from_data(cascade, mnist5k_data):
    val, _ = _outs(cascade, mnist5k_data)
    cascade.router = make_router("l1")
    cal = calibrate(cascade, val, heavy_budget=0.5)
    info = cal.extra["l1"]
    assert info["direction"] in ("low_is_hard", "high_is_hard")
    assert (info["auroc_high_is_hard"] > 0.5) == (info["direction"] == "high_is_hard")


def test_auroc_known_values():
    s = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert auroc(s, torch.tensor([False, False, True, True])) == 1.0
    assert auroc(s, torch.tensor([True, True, False, False])) == 0.0
    assert auroc(torch.ones(4), torch.tensor([True, False, True, False])) == 0.5


# ------------------------------------------------------------------------------------------ cost, io

def test_cost_formulas_and_macs(cascade):
    assert c_mix(0.5, 0.2) == pytest.approx(0.6)
    assert c_cascade(0.5, 0.2) == pytest.approx(0.7)
    assert c_mix(0.0, 0.3) == pytest.approx(0.3) and c_cascade(1.0, 0.3) == pytest.approx(1.3)
    c = mac_costs(cascade)
    # LeNet 784-300-100-10 vs 784-30-10-10: about 11x fewer MACs (linear layers dominate)
    assert 10 < c["macs_heavy"] / c["macs_light"] < 12
    assert c["c_l"] == pytest.approx(c["macs_light"] / c["macs_heavy"]) and c["c_rest"] == 1.0


@pytest.mark.parametrize("router", ["learned", "l1", "random"])
def test_save_load_reproduces_decisions(cascade, mnist5k_data, tmp_path, router):
    val, _ = _outs(cascade, mnist5k_data)
    if router == "learned":
        cascade.router = fit_learned_router(val.light_logits, val.feats, ~val.light_correct, epochs=30)
    else:
        cascade.router = make_router(router)
    calibrate(cascade, val, heavy_budget=0.35)
    save_cascade(cascade, tmp_path / "c")
    back = load_cascade(tmp_path / "c")
    x = _x(mnist5k_data, 300)
    a, b = cascade.route(x), back.route(x)
    assert torch.equal(a.expert, b.expert)
    torch.testing.assert_close(a.logits, b.logits)
    assert back.threshold == cascade.threshold
    assert not any(p.suffix == ".pt" or p.suffix == ".pkl" for p in (tmp_path / "c").rglob("*"))


def test_early_exit_save_load(trained_lenet_mnist, mnist5k_data, tmp_path):
    ee = build_early_exit(trained_lenet_mnist, mnist5k_data, epochs=1)
    ee.threshold = 0.05
    save_cascade(ee, tmp_path / "ee")
    back = load_cascade(tmp_path / "ee")
    x = _x(mnist5k_data, 100)
    a, b = ee.route(x), back.route(x)
    assert torch.equal(a.expert, b.expert)
    torch.testing.assert_close(a.logits, b.logits)


def test_agf_signal_per_sample(trained_lenet_mnist, mnist5k_data):
    batches = mnist5k_data.calibration_batches(32, 2, split="val")
    s = per_sample_agf_signal(trained_lenet_mnist, batches)
    assert s.shape == (64,) and bool((s >= 0).all())
    # batch independence: one sample alone gives its own signal
    x, y = batches[0]
    one = per_sample_agf_signal(trained_lenet_mnist, [(x[:1], y[:1])])
    torch.testing.assert_close(one[0], s[0], rtol=1e-4, atol=1e-6)
    dr = dynamic_range(s)
    assert dr["max_min"] >= dr["p99_p1"] >= 1.0
    assert all(p.grad is None for p in trained_lenet_mnist.parameters())


def test_route_experts_end_to_end_and_cli(light_lenet, trained_lenet_mnist, mnist5k_data, tmp_path):
    res = route_experts(light_lenet, trained_lenet_mnist, mnist5k_data, router="confidence", heavy_budget=0.5,
                        out_dir=tmp_path / "api", measure=False, sweep=True, diagnostic=False,
                        sweep_usages=(0.0, 0.5, 1.0))
    s = res.summary()
    assert abs(s["heavy_usage"] - 0.5) < 0.08
    # above random routing by more than 2 standard errors of the (unpaired) difference on the n test
    # images; measured 85.8% vs 79.2% (3.9 standard errors); test_confidence_routing_beats_random pairs them
    n, a, b = len(mnist5k_data.test), s["routed_acc"], s["random_acc_same_usage"]
    assert a - b > 2 * math.sqrt(a * (1 - a) / n + b * (1 - b) / n), s
    r = json.loads((tmp_path / "api" / "results.json").read_text())
    for k in ("accuracy", "heavy_usage", "C_mix", "C_cascade", "threshold", "sweep", "calibration"):
        assert k in r
    assert (tmp_path / "api" / "pareto.png").exists()
    # the caller's models are untouched
    assert all(p.grad is None for p in light_lenet.parameters())
    # CLI on saved experts
    from flowprune.cli import main
    from flowprune.io import save

    save(light_lenet, tmp_path / "light")
    save(trained_lenet_mnist, tmp_path / "heavy")
    rc = main(["route", "--light", str(tmp_path / "light"), "--heavy", str(tmp_path / "heavy"), "--data", "mnist5k",
               "--router", "entropy", "--max-drop", "0.0", "--no-speed", "--no-sweep", "--no-diagnostic",
               "--out", str(tmp_path / "cli")])
    assert rc == 0
    r = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert r["router"] == "entropy" and r["calibration"]["mode"] == "max_drop"
    back = load_cascade(tmp_path / "cli" / "cascade")
    x = _x(mnist5k_data, 300)
    assert back.route(x).expert.float().mean() == pytest.approx(
        float((back.router(back.light(x), None) > back.threshold).float().mean()))
    rc = main(["route", "--light", str(tmp_path / "light"), "--heavy", str(tmp_path / "heavy"), "--data", "mnist5k",
               "--heavy-budget", "1.5", "--out", str(tmp_path / "bad")])
    assert rc == 2


# ------------------------------------------------------------------------------------------ bad input

def test_bad_inputs_raise_before_work(light_lenet, trained_lenet_mnist, mnist5k_data):
    five = build_model("lenet300", mnist5k_data.input_shape, 5, hidden=(8,))
    with pytest.raises(FlowpruneError, match="classes"):
        Cascade(five, trained_lenet_mnist, make_router("confidence"), 0.0)
    small = build_model("lenet300", (1, 8, 8), 10, hidden=(8,))
    with pytest.raises(FlowpruneError, match="different inputs"):
        Cascade(small, trained_lenet_mnist, make_router("confidence"), 0.0)
    with pytest.raises(FlowpruneError, match="different inputs"):
        route_experts(small, trained_lenet_mnist, mnist5k_data, measure=False)
    for b in (-0.1, 1.5, float("nan")):
        with pytest.raises(FlowpruneError, match="heavy_budget"):
            route_experts(light_lenet, trained_lenet_mnist, mnist5k_data, heavy_budget=b)
    with pytest.raises(FlowpruneError, match="max_drop"):
        route_experts(light_lenet, trained_lenet_mnist, mnist5k_data, max_drop=2.0)
    with pytest.raises(FlowpruneError, match="exactly one"):
        route_experts(light_lenet, trained_lenet_mnist, mnist5k_data, heavy_budget=0.5, max_drop=0.0)
    with pytest.raises(FlowpruneError, match="unknown router"):
        route_experts(light_lenet, trained_lenet_mnist, mnist5k_data, router="agf")
    xv, yv = mnist5k_data.val.tensors
    no_val = dataclasses.replace(mnist5k_data, val=TensorDataset(xv[:0], yv[:0]))
    with pytest.raises(FlowpruneError, match="empty"):
        route_experts(light_lenet, trained_lenet_mnist, no_val)
    tiny = dataclasses.replace(mnist5k_data, val=TensorDataset(xv[:30], yv[:30]))
    with pytest.raises(FlowpruneError, match="too few"):
        route_experts(light_lenet, trained_lenet_mnist, tiny, heavy_budget=0.5)
    with pytest.raises(FlowpruneError, match="finer than one sample"):
        route_experts(light_lenet, trained_lenet_mnist, mnist5k_data, max_drop=0.001)
    with pytest.raises(FlowpruneError, match="router"):
        Cascade(light_lenet, trained_lenet_mnist, "confidence", 0.0)
    with pytest.raises(FlowpruneError, match="direction"):
        make_router("l1", direction="sideways")
    with pytest.raises(FlowpruneError, match="NaN"):
        Cascade(light_lenet, trained_lenet_mnist, make_router("confidence"), float("nan"))
