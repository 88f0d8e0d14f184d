"""Every score against values computed by hand on a tiny conv+BN net and a tiny linear net.

The conv net is conv(2->3, 1x1, no bias) -> BN(3) -> ReLU -> conv(3->2, 1x1) -> mean pool -> linear;
its stage unit is ``c1`` (3 channels, consumers ``c2``), so every number below can be written
down from the weights alone.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flowprune.scores import get_score, list_scores
from flowprune.units import find_units


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.c2 = nn.Conv2d(3, 2, 1, bias=False)
        self.fc = nn.Linear(2, 4)
        with torch.no_grad():
            self.c1.weight.copy_(torch.tensor([[1.0, 2.0], [-3.0, 0.5], [0.1, -0.2]]).view(3, 2, 1, 1))
            self.bn.weight.copy_(torch.tensor([0.5, -2.0, 4.0]))
            self.bn.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
            self.bn.running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
            self.bn.running_mean.copy_(torch.tensor([0.0, 1.0, -1.0]))
            self.c2.weight.copy_(torch.tensor([[1.0, -1.0, 2.0], [0.5, 0.0, -3.0]]).view(2, 3, 1, 1))

    def forward(self, x):
        return self.fc(self.c2(torch.relu(self.bn(self.c1(x)))).mean((2, 3)))


def _unit(model):
    units = find_units(model, torch.randn(1, 2, 3, 3))
    by = units.by_name()
    assert "c1" in by, [u.name for u in units]
    return units, by["c1"]


def _eps_factor(m):
    return m.bn.weight.detach().abs() / torch.sqrt(m.bn.running_var + m.bn.eps)


def test_l1_l2_fold_batchnorm_by_hand():
    m = ConvBN().eval()
    units, u = _unit(m)
    w = m.c1.weight.detach().view(3, 2)
    f = _eps_factor(m)
    # folded filter: w_c * |gamma_c| / sqrt(var_c + eps)
    want_l1 = (w.abs().sum(1) * f).double()
    want_l2 = ((w ** 2).sum(1).sqrt() * f).double()
    torch.testing.assert_close(get_score("l1")(m, [u])["c1"].double(), want_l1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(get_score("l2")(m, [u])["c1"].double(), want_l2, rtol=1e-6, atol=1e-7)
    # the raw reading ignores BN: [3, 3.5, 0.3]
    torch.testing.assert_close(get_score("l1", bn="ignore")(m, [u])["c1"], torch.tensor([3.0, 3.5, 0.3]))
    # with BN folded, channel 2 (tiny filter, large gamma / small var) is no longer the least important
    folded = get_score("l1")(m, [u])["c1"]
    assert int(torch.argmin(folded)) == 0 and int(torch.argmin(get_score("l1", bn="ignore")(m, [u])["c1"])) == 2


def test_group_all_adds_consumer_columns():
    m = ConvBN().eval()
    units, u = _unit(m)
    w = m.c1.weight.detach().view(3, 2)
    f = _eps_factor(m)
    cols = m.c2.weight.detach().view(2, 3).t()  # the columns reading channels 0..2
    want = torch.sqrt(((w * f[:, None]) ** 2).sum(1) + (cols ** 2).sum(1))
    got = get_score("l2", group="all")(m, [u])["c1"]
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-7)
    want1 = (w.abs() * f[:, None]).sum(1) + cols.abs().sum(1)
    torch.testing.assert_close(get_score("l1", group="all")(m, [u])["c1"], want1.float(), rtol=1e-6, atol=1e-7)


def test_bn_scale_by_hand():
    m = ConvBN().eval()
    units, u = _unit(m)
    torch.testing.assert_close(get_score("bn_scale")(m, [u])["c1"], torch.tensor([0.5, 2.0, 4.0]))


def _batches(n=2, b=5):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 2, 3, 3, generator=g), torch.randint(0, 4, (b,), generator=g)) for _ in range(n)]


def test_wanda_by_hand_with_bn_fold():
    m = ConvBN().eval()
    units, u = _unit(m)
    batches = _batches()
    xsq = sum((x ** 2).sum((0, 2, 3)) for x, _ in batches)  # ||X_j||^2 over samples and positions
    w = m.c1.weight.detach().view(3, 2)
    raw = (w.abs() * xsq.sqrt()[None, :]).sum(1)
    torch.testing.assert_close(get_score("wanda", bn="ignore")(m, [u], batches)["c1"], raw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(get_score("wanda")(m, [u], batches)["c1"], raw * _eps_factor(m), rtol=1e-5,
                               atol=1e-6)


def test_taylor_by_hand():
    m = ConvBN().eval()
    units, u = _unit(m)
    batches = _batches()
    want = torch.zeros(3, dtype=torch.float64)
    for x, y in batches:
        loss = F.cross_entropy(m(x), y)
        params = [m.c1.weight, m.bn.weight, m.bn.bias]
        gw, gg, gb = torch.autograd.grad(loss, params)
        s = (gw * m.c1.weight).view(3, 2).sum(1) + gg * m.bn.weight + gb * m.bn.bias
        want += s.detach().double() ** 2
    got = get_score("taylor")(m, [u], batches)["c1"]
    torch.testing.assert_close(got.double(), want / len(batches), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("abs_mode", ["elementwise", "after_sum", "squared"])
def test_agf_by_hand_centred_and_not(center, abs_mode):
    m = ConvBN().eval()
    units, u = _unit(m)
    batches = _batches()
    want = torch.zeros(3, dtype=torch.float64)
    for x, y in batches:
        h = torch.relu(m.bn(m.c1(x))).detach().requires_grad_(True)
        loss = F.cross_entropy(m.fc(m.c2(h).mean((2, 3))), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, h)
        hc = h - h.mean((0, 2, 3), keepdim=True) if center else h
        prod = (hc * g).double()
        if abs_mode == "elementwise":
            per = prod.abs().sum((2, 3))
        elif abs_mode == "after_sum":
            per = prod.sum((2, 3)).abs()
        else:
            per = prod.sum((2, 3)) ** 2
        want += per.mean(0)
    got = get_score("agf", center=center, abs_mode=abs_mode)(m, [u], batches)["c1"]
    torch.testing.assert_close(got.double(), want / len(batches), rtol=1e-5, atol=1e-8)


def test_agf_default_is_centred_after_sum():
    m = ConvBN().eval()
    units, u = _unit(m)
    batches = _batches()
    torch.testing.assert_close(get_score("agf")(m, [u], batches)["c1"],
                               get_score("agf", center=True, abs_mode="after_sum")(m, [u], batches)["c1"])


def test_agf_paper_is_the_plain_reading():
    m = ConvBN().eval()
    units, u = _unit(m)
    batches = _batches()
    plain = get_score("agf", center=False, feature="post", abs_mode="elementwise")(m, [u], batches)["c1"]
    torch.testing.assert_close(get_score("agf-paper")(m, [u], batches)["c1"], plain)


@pytest.mark.parametrize("name", list_scores())
def test_every_score_shape_and_determinism(name):
    m = ConvBN().eval()
    units, u = _unit(m)
    batches = _batches()
    a = get_score(name)(m, [u], batches)["c1"]
    b = get_score(name)(m, [u], batches)["c1"]
    assert a.shape == (3,) and a.dtype == torch.float32 and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)


def test_bad_options_fail_before_any_work(monkeypatch):
    """An unknown score option, budget or normaliser, or labels that do not fit, are one clear error
    before any scoring (the score is never called)."""
    from flowprune.errors import FlowpruneError
    from flowprune.pruning import structural

    m = ConvBN().eval()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 2, 3, 3, generator=g), torch.randint(0, 4, (4,), generator=g))]
    from flowprune.scores.agf import AGF

    called = []
    monkeypatch.setattr(AGF, "compute", lambda *a, **k: called.append(1))
    cases = [({"score_options": {"sharpness": 2}}, "unknown option.*sharpness.*allowed"),
             ({"budget": "greedy"}, "budget.*greedy.*allowed: global, layer, macs"),
             ({"normalize": "zscore"}, "normalize.*zscore.*unit"),
             ({"steps": "many"}, "steps.*'many'")]
    for kw, pattern in cases:
        with pytest.raises(FlowpruneError, match=pattern):
            structural.prune(m, batches, "agf", target_macs=2.0, **kw)
    bad_labels = [(batches[0][0], torch.tensor([0, 1, 2, 9]))]
    with pytest.raises(FlowpruneError, match=r"labels must lie in \[0, 3\]"):
        structural.prune(m, bad_labels, "agf", target_macs=2.0)
    with pytest.raises(FlowpruneError, match="normalizer.*zscore"):
        get_score("agf").as_tp_importance(batches=batches, example_inputs=torch.randn(1, 2, 3, 3), normalizer="zscore")
    assert not called
