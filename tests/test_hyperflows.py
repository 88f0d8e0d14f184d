"""Hyperflows: straight-through flow, regrowth, scheduler, law fit, baselines, CLI, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from flowprune.config import ProcedureConfig
from flowprune.errors import FlowpruneError
from flowprune.models import build_model
from flowprune.pruning.hyperflows import HyperflowsConfig, hyperflows_prune, pressure_sweep
from flowprune.pruning.magnitude_unstructured import cubic_sparsity, gradual_magnitude, one_shot_magnitude
from flowprune.pruning.masks import (
    LogitMask,
    install_masks,
    mask_logits,
    masked_modules,
    set_global_topk,
    set_pressure,
    sparsity_report,
)
from flowprune.pruning.pressure import (
    PressureScheduler,
    fit_power_law,
    gamma_for_remaining,
    solve_s0,
    trajectory,
)
from flowprune.train import TrainConfig, fit


@pytest.fixture(scope="module")
def lenet_digits(digits_data):
    torch.manual_seed(0)
    m = build_model("lenet300", digits_data.input_shape, 10)
    fit(m, digits_data, TrainConfig(epochs=3, lr=0.05, augment=False), progress=False)
    return m


def test_straight_through_flow_equals_scaled_w_times_grad():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    net = install_masks(lin)  # the module itself is the one maskable layer, named ""
    p = masked_modules(net)[""]
    with torch.no_grad():
        p.logits[0, :2] = -0.3  # two pruned entries
    x = torch.randn(7, 5)
    r = torch.randn(7, 3)
    (net(x) * r).sum().backward()
    w = net.parametrizations["weight"].original
    keep = (p.logits.detach() >= 0).float()
    w_eff = (w.detach() * keep).requires_grad_(True)
    (F.linear(x, w_eff, net.bias.detach()) * r).sum().backward()
    g = w_eff.grad
    assert torch.allclose(p.logits.grad, 0.25 * w.detach() * g, atol=1e-6)
    assert torch.allclose(w.grad, keep * g, atol=1e-6)
    assert p.logits.grad[0, 0] != 0  # a pruned weight still receives flow
    assert lin.weight.grad is None  # the caller's layer untouched


def test_fused_mask_adds_pressure_gradient_and_matches_explicit_term():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    a, b = install_masks(lin, seed=1), install_masks(lin, seed=1)
    with torch.no_grad():
        for pa, pb in zip(mask_logits(a), mask_logits(b)):
            pa.sub_(0.35)
            pb.sub_(0.35)  # about half pruned
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    n = sum(p.numel() for p in mask_logits(a))
    P = 2.0 ** 1.5
    (F.cross_entropy(a(x), y) + P * sum(p.sum() for p in mask_logits(a)) / n).backward()
    set_pressure(b, P / n)
    F.cross_entropy(b(x), y).backward()
    for pa, pb in zip(list(a.parameters()), list(b.parameters())):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6)


def test_scale_option_changes_flow():
    lin = nn.Linear(3, 2)
    net = install_masks(lin, scale=1.0)
    x = torch.randn(4, 3)
    net(x).sum().backward()
    w = net.parametrizations["weight"].original.detach()
    g = torch.ones(4, 2).t() @ x  # dL/dW for sum of outputs
    assert torch.allclose(masked_modules(net)[""].logits.grad, w * g, atol=1e-5)


@pytest.mark.parametrize("gamma, regrows", [(0.25, True), (4.0, False)])
def test_pruned_weight_regrows_when_flow_beats_pressure(gamma, regrows):
    # y = 2x, one weight w=1 that is pruned (logit -0.05): its flow -s*w*dL/dw_eff pushes the logit
    # up while the pressure gamma^1.5 / N pushes it down; N = 1.
    torch.manual_seed(0)
    lin = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    net = install_masks(lin)
    mask = masked_modules(net)[""]
    with torch.no_grad():
        mask.logits.fill_(-0.05)
    x = torch.linspace(-1, 1, 32).unsqueeze(1)
    for _ in range(30):  # plain gradient steps on the logit
        mask.logits.grad = None
        loss = F.mse_loss(net(x), 2 * x) + gamma ** 1.5 * mask.logits.mean()
        loss.backward()
        with torch.no_grad():
            mask.logits -= 0.05 * mask.logits.grad
    # flow: s * w * dMSE/dw_eff = 0.25 * 1 * (-4 mean(x^2)) ~ -0.35 at w_eff = 0; pressure gamma^1.5 / N:
    # 0.125 (flow wins: regrows) or 8 (pressure wins: stays pruned)
    assert bool(mask.keep().all()) is regrows


def test_install_masks_returns_copy_and_selection(lenet_digits):
    net = install_masks(lenet_digits)
    assert set(masked_modules(net)) == {"body.0", "body.2", "fc"}
    assert not any(hasattr(m, "parametrizations") for m in lenet_digits.modules())
    net2 = install_masks(lenet_digits, include_classifier=False)
    assert set(masked_modules(net2)) == {"body.0", "body.2"}
    lo = min(float(p.detach().min()) for p in mask_logits(net))
    hi = max(float(p.detach().max()) for p in mask_logits(net))
    assert 0.2 <= lo and hi <= 0.5
    assert sparsity_report(net)["sparsity"] == 0.0


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 35), st.integers(0, 3), st.integers(0, 10_000))
def test_global_topk_is_exact_even_with_ties(k, ties, seed):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))
    net = install_masks(lin)
    with torch.no_grad():
        for p in mask_logits(net):
            p.copy_(torch.randn(p.shape, generator=g).round(decimals=ties))
    set_global_topk(net, k)
    assert sparsity_report(net)["kept"] == k


def test_trajectory_and_s0():
    for target, total in [(0.1, 10), (0.02, 30), (0.5, 3)]:
        s0 = solve_s0(target, total)
        assert math.isclose(trajectory(total, s0, total), target, rel_tol=1e-6)
        assert trajectory(0, s0, total) == 1.0
        vals = [trajectory(e, s0, total) for e in range(total + 1)]
        assert all(a >= b for a, b in zip(vals, vals[1:]))
    sch = PressureScheduler(0.1, 10, gamma=1.0)
    assert sch.step(1, 0.99) > 1.0  # above the trajectory: more pressure
    sch2 = PressureScheduler(0.1, 10, gamma=1.0)
    assert sch2.step(1, 0.05) < 1.0  # below: less


@settings(max_examples=20, deadline=None)
@given(st.floats(0.01, 1.0), st.floats(0.2, 1.5))
def test_power_law_fit_recovers_constants(c, a):
    gammas = [2.0 ** k for k in range(-2, 5)]
    rem = [c * g ** (-a) for g in gammas]
    f = fit_power_law(gammas, rem)
    assert math.isclose(f["power"]["c"], c, rel_tol=1e-6)
    assert math.isclose(f["power"]["a"], a, rel_tol=1e-6)
    assert f["power"]["r2"] > 0.999999
    assert abs(f["log_quadratic"]["a1"]) < 1e-6
    assert math.isclose(gamma_for_remaining(f, rem[3]), gammas[3], rel_tol=1e-6)


def test_scheduler_reaches_target_on_small_model(lenet_digits, digits_data, tmp_path):
    law = {"power": {"c": 0.1, "a": 1.0}}  # a fitted law seeds the initial pressure
    r = hyperflows_prune(lenet_digits, digits_data, target_sparsity=0.9, prune_epochs=6, regrow_epochs=2,
                         augment=False, checkpoint_dir=tmp_path, progress=False, law=law)
    assert math.isclose(r["initial_gamma"], gamma_for_remaining(law, 0.1))
    assert abs(r["sparsity"] - 0.9) < 0.005
    # the scheduler itself (before the exact top-k correction) lands within the 0.5 pp tolerance
    assert abs(r["scheduler"]["sparsity"] - 0.9) <= 0.005 and r["scheduler"]["within_tolerance"]
    assert r["correction"]["sparsity_before"] == r["scheduler"]["sparsity"]
    assert r["scheduler"]["accuracy"] > 0.8 and "warning" not in r["scheduler"]
    assert len(r["gamma_trajectory"]) == 6 and len(r["remaining_per_epoch"]) == 8
    assert r["accuracy"] > 0.8
    assert not any(hasattr(m, "parametrizations") for m in r["model"].modules())
    assert (tmp_path / "hyperflows.pt").exists()
    state = torch.load(tmp_path / "hyperflows.pt", weights_only=True)
    assert state["epoch"] == 8
    # resume: the finished run is loaded, nothing is retrained, the same masks come back
    r2 = hyperflows_prune(lenet_digits, digits_data, target_sparsity=0.9, prune_epochs=6, regrow_epochs=2,
                          augment=False, checkpoint_dir=tmp_path, progress=False)
    assert r2["kept"] == r["kept"] and r2["epochs"] == r["epochs"]
    assert not any(hasattr(m, "parametrizations") for m in lenet_digits.modules())


class _NaNAfter(nn.Module):
    """A small MLP whose output becomes NaN after ``n`` training forwards."""

    def __init__(self, n: int):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        self.n, self.calls = n, 0

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls > self.n:
                out = out * float("nan")
        return out


def test_missed_target_is_reported_and_correction_is_finetuned(lenet_digits, digits_data):
    # paper-style free regrowth aimed at 0.9 x the target, zero tolerance: the miss must be said
    with pytest.warns(UserWarning, match="scheduler ended at sparsity"):
        r = hyperflows_prune(lenet_digits, digits_data, target_sparsity=0.8, prune_epochs=3, regrow_epochs=1,
                             regrow_mode="free", prune_aim=0.9, tolerance=0.0, augment=False, progress=False,
                             max_batches_per_epoch=4, finetune_steps=3)
    s, c = r["scheduler"], r["correction"]
    assert not s["within_tolerance"] and "warning" in s
    assert math.isclose(s["error_pp"], 100 * (s["sparsity"] - 0.8))
    assert c["flipped"] == c["switched_on"] + c["switched_off"] > 0
    assert c["finetune_steps"] == 3 and c["accuracy_before"] is not None and "accuracy_after_flip" in c
    assert c["accuracy_after"] == r["accuracy"]
    assert abs(r["sparsity"] - 0.8) < 1e-3
    # the result object: models as attributes, a JSON-safe record, the old dict reading
    assert r.model is r["model"] and r.masked_model is r["masked_model"] and "masked_model" in r
    rec = r.to_dict()
    assert "model" not in rec and "masked_model" not in rec and rec["sparsity"] == r["sparsity"]
    json.dumps(rec)


def test_config_dict_and_unknown_override_raise_before_work(lenet_digits):
    with pytest.raises(FlowpruneError, match="unknown option 'prune_epoch'"):
        hyperflows_prune(lenet_digits, None, prune_epoch=3)  # typo of prune_epochs
    with pytest.raises(FlowpruneError, match="unknown config key 'bogus'"):
        hyperflows_prune(lenet_digits, None, {"bogus": 1})
    with pytest.raises(FlowpruneError, match="target_sparsity"):
        hyperflows_prune(lenet_digits, None, {"target_sparsity": 1.5})
    with pytest.raises(FlowpruneError, match="DataSplits"):  # a valid dict config gets past validation
        hyperflows_prune(lenet_digits, None, {"target_sparsity": 0.9}, seed=2)
    assert isinstance(HyperflowsConfig(), ProcedureConfig)
    cfg = HyperflowsConfig.resolve({"target_sparsity": 0.95}, {"seed": 3})
    assert (cfg.target_sparsity, cfg.seed) == (0.95, 3)


def test_target_beyond_maskable_share_and_foreign_law(lenet_digits, digits_data):
    with pytest.raises(FlowpruneError, match="masks cover 0.9"):
        hyperflows_prune(lenet_digits, digits_data, target_sparsity=0.99, target_scope="all",
                         include_classifier=False)
    with pytest.raises(FlowpruneError, match="would remove all"):
        hyperflows_prune(nn.Linear(8, 2), digits_data, target_sparsity=0.99)
    foreign = {"fit": {"power": {"c": 0.05, "a": 1.2}}, "model": {"name": "resnet20", "masked_weights": 270_000}}
    with pytest.raises(FlowpruneError, match="fitted on another model"):
        hyperflows_prune(lenet_digits, digits_data, target_sparsity=0.9, law=foreign)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(digits_data, tmp_path):
    with pytest.raises(FloatingPointError, match=r"last good checkpoint \(epoch 1 of 3\)"):
        hyperflows_prune(_NaNAfter(4), digits_data, prune_epochs=3, regrow_epochs=0, max_batches_per_epoch=3,
                         checkpoint_dir=tmp_path, progress=False, target_sparsity=0.5)
    state = torch.load(tmp_path / "hyperflows.pt", weights_only=True)
    assert state["epoch"] == 1


@pytest.mark.parametrize("kw, match", [
    ({"target_sparsity": 0.0}, "target_sparsity"),
    ({"target_sparsity": 1.0}, "target_sparsity"),
    ({"target_sparsity": 1.5}, "target_sparsity"),
    ({"prune_epochs": 0}, "prune_epochs"),
    ({"regrow_epochs": -1}, "regrow_epochs"),
    ({"gamma0": 0.0}, "gamma0"),
    ({"gamma0": -2.0}, "gamma0"),
    ({"constant_gamma": -1.0}, "constant_gamma"),
])
def test_bad_input_raises_before_work(lenet_digits, kw, match):
    with pytest.raises(FlowpruneError, match=match):
        hyperflows_prune(lenet_digits, None, **kw)  # data=None: validation must come first


def test_no_maskable_layer_and_bad_sweep(digits_data):
    with pytest.raises(FlowpruneError, match="unreachable"):
        hyperflows_prune(nn.Linear(64, 10), digits_data, target_sparsity=0.99, prune_epochs=1, updates_per_epoch=1)
    with pytest.raises(FlowpruneError, match="no maskable layer"):
        hyperflows_prune(nn.Sequential(nn.Flatten(), nn.ReLU()), digits_data)
    with pytest.raises(FlowpruneError, match="not a Conv/Linear"):
        install_masks(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), ["1"])
    with pytest.raises(FlowpruneError, match="pressure"):
        pressure_sweep(nn.Linear(2, 2), digits_data, [1.0, 0.0])
    with pytest.raises(FlowpruneError, match="epochs"):
        gradual_magnitude(nn.Linear(2, 2), digits_data, 0.5, 0)
    with pytest.raises(FlowpruneError, match="sparsity"):
        one_shot_magnitude(nn.Linear(2, 2), digits_data, 1.0, 1)
    with pytest.raises(FlowpruneError, match="mask kind"):
        install_masks(nn.Linear(2, 2), kind="soft")


def test_magnitude_baselines_hit_sparsity(lenet_digits, digits_data):
    assert cubic_sparsity(0, 4, 0.9) == 0.0 and cubic_sparsity(4, 4, 0.9) == 0.9
    g = gradual_magnitude(lenet_digits, digits_data, 0.9, 4, TrainConfig(lr=0.05, augment=False), progress=False,
                          max_batches_per_epoch=5)
    o = one_shot_magnitude(lenet_digits, digits_data, 0.5, 1, TrainConfig(lr=0.02, augment=False), progress=False)
    for r, s in ((g, 0.9), (o, 0.5)):
        assert abs(r["sparsity"] - s) < 1e-3
        assert r["accuracy"] > 0.3  # chance is 0.1
        w = r["model"].body[0].weight
        assert abs(float((w == 0).float().mean()) - r["layers"]["body.0"]) < 1e-6
    assert [s["sparsity"] for s in g["schedule"]] == sorted(s["sparsity"] for s in g["schedule"])


def test_sweep_fit_and_cli(lenet_digits, digits_data, tmp_path, capsys):
    from flowprune.cli import main
    from flowprune.io import load, save

    sw = pressure_sweep(lenet_digits, digits_data, [0.5, 2.0, 8.0], HyperflowsConfig(prune_epochs=2, augment=False),
                        progress=False, max_batches_per_epoch=4)
    rem = [r["remaining"] for r in sw["runs"]]
    assert rem[0] > rem[-1]  # more pressure, fewer weights
    save(lenet_digits, tmp_path / "dense")
    rc = main(["--threads", "1", "hyperflows", "--checkpoint", str(tmp_path / "dense"), "--data", "digits",
               "--target-sparsity", "0.7", "--epochs", "3", "--batch-size", "512", "--regrow-epochs", "1", "--out", str(tmp_path / "hf"),
               "--no-speed", "--no-augment"])
    assert rc == 0
    res = json.loads((tmp_path / "hf" / "results.json").read_text())
    for k in ("accuracy", "sparsity", "layers", "gamma_trajectory", "remaining_per_epoch", "regrew_total"):
        assert k in res
    assert abs(res["sparsity"] - 0.7) < 0.005
    model = load(tmp_path / "hf")
    zeros = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, nn.Linear))
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert abs(zeros / total - 0.7) < 0.005
    rc = main(["hyperflows", "--checkpoint", str(tmp_path / "dense"), "--data", "digits",
               "--target-sparsity", "1.2", "--out", str(tmp_path / "bad")])
    assert rc == 2
    rc = main(["hyperflows", "sweep", "--checkpoint", str(tmp_path / "dense"), "--data", "digits",
               "--gammas", "1,-1", "--out", str(tmp_path / "bad")])
    assert rc == 2
    assert res["scheduler"]["sparsity"] == res["correction"]["sparsity_before"]
    foreign = tmp_path / "law.json"
    foreign.write_text(json.dumps({"fit": {"power": {"c": 0.05, "a": 1.2}},
                                   "model": {"name": "resnet20", "masked_weights": 270_000}}))
    rc = main(["hyperflows", "--checkpoint", str(tmp_path / "dense"), "--data", "digits", "--law", str(foreign),
               "--out", str(tmp_path / "bad2")])
    assert rc == 2
    assert "fitted on another model" in capsys.readouterr().err


def test_logit_mask_module_shape():
    m = LogitMask((3, 4), init=(0.3, 0.3))
    assert m.logits.shape == (3, 4) and torch.allclose(m.logits, torch.full((3, 4), 0.3))
