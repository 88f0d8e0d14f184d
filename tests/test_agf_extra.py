"""AGF: hook-based accumulation against hand computations (conv + BN, shared features), no leaks, no state change."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from flowprune.models import build_model
from flowprune.scores import get_score
from flowprune.units import find_units


class ConvBN(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> ReLU -> pool -> linear, (B, 2, 12) inputs."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv1d(2, 5, 3, padding=1), nn.BatchNorm1d(5)
        self.c2, self.b2 = nn.Conv1d(5, 4, 3, padding=1), nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        h = torch.relu(self.b2(self.c2(h)))
        return self.fc(h.mean(2))


class Shared(nn.Module):
    """One hidden ReLU tensor read by two linears (the same tensor must count once)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.a = nn.Linear(6, 3)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.a(h) + self.b(h)


def _batches(shape, n=2, b=5, seed=0, classes=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, *shape, generator=g), torch.randint(0, classes, (b,), generator=g)) for _ in range(n)]


def _with_stats(m: ConvBN) -> ConvBN:
    with torch.no_grad():
        for bn in (m.b1, m.b2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    return m.eval()


def _hand_convbn(m: ConvBN, batches, feature: str) -> dict[str, torch.Tensor]:
    out = {"c1": torch.zeros(5), "c2": torch.zeros(4)}
    for x, y in batches:
        z1 = m.c1(x).detach().requires_grad_(True)
        h1 = torch.relu(m.b1(z1))
        h1.retain_grad()
        z2 = m.c2(h1)
        z2.retain_grad()
        h2 = torch.relu(m.b2(z2))
        p = h2.mean(2)
        p.retain_grad()
        F.cross_entropy(m.fc(p), y, reduction="sum").backward()
        if feature == "post":  # Y = input of the next conv / of the classifier (pooled)
            out["c1"] += (h1 * h1.grad).abs().sum(2).mean(0).detach()
            out["c2"] += (p * p.grad).abs().mean(0).detach()
        else:  # Y = conv outputs before BN
            out["c1"] += (z1 * z1.grad).abs().sum(2).mean(0).detach()
            out["c2"] += (z2 * z2.grad).abs().sum(2).mean(0).detach()
    return {k: v / len(batches) for k, v in out.items()}


@pytest.mark.parametrize("feature", ["post", "raw"])
def test_conv_bn_scores_match_hand_computation(feature):
    torch.manual_seed(0)
    m = _with_stats(ConvBN())
    units = find_units(m, torch.randn(1, 2, 12))
    assert sorted(u.name for u in units) == ["c1", "c2"]
    batches = _batches((2, 12), n=3)
    got = get_score("agf-paper", feature=feature)(m, units, batches)
    want = _hand_convbn(m, batches, feature)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)


def test_a_tensor_read_by_two_layers_counts_once():
    torch.manual_seed(0)
    m = Shared()
    units = find_units(m, torch.randn(1, 4))
    u = next(u for u in units if u.name == "fc1")
    assert {c.module_name for c in u.consumers} == {"a", "b"}
    batches = _batches((4,), n=2, b=6)
    got = get_score("agf-paper")(m, [u], batches)["fc1"]
    want = torch.zeros(6)
    for x, y in batches:
        h = torch.relu(m.fc1(x)).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(m.a(h) + m.b(h), y, reduction="sum"), h)
        want += (h * g).abs().mean(0)
    torch.testing.assert_close(got, want / len(batches), rtol=1e-5, atol=1e-7)


def test_flags_grads_hooks_restored_and_no_feature_kept_alive():
    m = build_model("resnet20", (1, 8, 8), 10).eval()
    m.layer1[0].conv1.weight.requires_grad_(False)  # a partly frozen model
    flags = [p.requires_grad for p in m.parameters()]
    units = find_units(m, torch.randn(1, 1, 8, 8))
    seen: list[weakref.ref] = []
    spy = m.layer2[0].conv1.register_forward_pre_hook(lambda _m, a: seen.append(weakref.ref(a[0])))
    out = get_score("agf")(m, units, _batches((1, 8, 8), n=2, b=4, classes=10))
    spy.remove()
    gc.collect()
    assert seen and all(r() is None for r in seen)  # nothing (hook closure, store) holds a feature
    assert [p.requires_grad for p in m.parameters()] == flags
    assert all(p.grad is None for p in m.parameters())
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in out.values())


def test_frozen_weights_do_not_change_the_scores():
    m = build_model("resnet20", (1, 8, 8), 10).eval()
    units = find_units(m, torch.randn(1, 1, 8, 8))
    batches = _batches((1, 8, 8), n=2, b=4, classes=10)
    a = get_score("agf")(m, units, batches)
    for p in m.parameters():
        p.requires_grad_(False)
    b = get_score("agf")(m, units, batches)
    assert all(not p.requires_grad for p in m.parameters())
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=0)


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 9), n=st.integers(1, 3), seed=st.integers(0, 10_000),
       abs_mode=st.sampled_from(["elementwise", "after_sum", "signed"]))
def test_property_linear_scores_equal_hand_computation(b, n, seed, abs_mode):
    torch.manual_seed(seed)
    m = Shared()
    units = [u for u in find_units(m, torch.randn(1, 4)) if u.name == "fc1"]
    batches = _batches((4,), n=n, b=b, seed=seed)
    got = get_score("agf-paper", abs_mode=abs_mode)(m, units, batches)["fc1"]
    want = torch.zeros(6, dtype=torch.float64)
    for x, y in batches:
        h = torch.relu(m.fc1(x)).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(m.a(h) + m.b(h), y, reduction="sum"), h)
        prod = (h * g).double()
        want += (prod.abs() if abs_mode != "signed" else prod).mean(0)  # one position: after_sum == elementwise
    torch.testing.assert_close(got, (want / n).float(), rtol=1e-5, atol=1e-7)


class TwoBranches(nn.Module):
    """Two branches from the input (two earliest features, neither below the other), then a sum."""

    def __init__(self):
        super().__init__()
        self.a1, self.a2 = nn.Linear(4, 5), nn.Linear(5, 3)
        self.b1, self.b2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.a2(torch.relu(self.a1(x))) + self.b2(torch.relu(self.b1(x)))


def test_every_branch_is_scored():
    torch.manual_seed(0)
    m = TwoBranches()
    units = find_units(m, torch.randn(1, 4))
    assert {"a1", "b1"} <= {u.name for u in units}
    batches = _batches((4,), n=2, b=6)
    got = get_score("agf-paper")(m, units, batches)
    want = {"a1": torch.zeros(5), "b1": torch.zeros(6)}
    for x, y in batches:
        ha = torch.relu(m.a1(x)).detach().requires_grad_(True)
        hb = torch.relu(m.b1(x)).detach().requires_grad_(True)
        ga, gb = torch.autograd.grad(F.cross_entropy(m.a2(ha) + m.b2(hb), y, reduction="sum"), (ha, hb))
        want["a1"] += (ha * ga).abs().mean(0)
        want["b1"] += (hb * gb).abs().mean(0)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v / len(batches), rtol=1e-5, atol=1e-7)
