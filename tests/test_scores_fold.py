"""The BatchNorm fold of every magnitude-type score, by hand, on nets with several producers per unit.

``ResStage`` has a residual stage: the stem conv and the second conv of two residual blocks all
write into the same sum, so the stage's unit has three producers, each followed by its own
BatchNorm; a downsampling block adds a unit with two producers (its conv and its 1x1 shortcut
conv, each with a BN). Torch-Pruning's group reaches most of these producers BN -> conv, backwards
through the sum; before issue 20 the fold followed only conv -> BN links and left them unfolded.
``ConvBNLinear`` is conv -> BN2d -> linear -> BN1d -> linear: a channel unit and a neuron unit.

Every expected score below is written out from the weights: the folded weight of producer P is
``W_P * |gamma_P| / sqrt(var_P + eps)`` (row-wise), then the score's own formula on it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flowprune.scores import get_score
from flowprune.units import find_units

CASES = [("l1", {}), ("l2", {}), ("l1", {"group": "all"}), ("l2", {"group": "all"}),
         ("wanda", {}), ("ria", {}), ("ria", {"power": 1.0})]


def _bn(c: int, g: torch.Generator, one_d: bool = False) -> nn.Module:
    bn = nn.BatchNorm1d(c) if one_d else nn.BatchNorm2d(c)
    with torch.no_grad():  # gammas of both signs and far from 1, variances far from 1: the fold matters
        bn.weight.copy_((torch.rand(c, generator=g) * 3 + 0.2) * torch.where(torch.rand(c, generator=g) < 0.3, -1, 1))
        bn.bias.copy_(torch.randn(c, generator=g) * 0.1)
        bn.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
        bn.running_var.copy_(torch.rand(c, generator=g) * 4 + 0.05)
    return bn


class ResStage(nn.Module):
    """stem(2->4) + 2 residual blocks at 4 channels + a downsampling block 4->6 with a 1x1 shortcut."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.stem, self.stem_bn = nn.Conv2d(2, 4, 3, padding=1, bias=False), _bn(4, g)
        for b in ("a", "b"):
            setattr(self, f"{b}1", nn.Conv2d(4, 3, 3, padding=1, bias=False))
            setattr(self, f"{b}1_bn", _bn(3, g))
            setattr(self, f"{b}2", nn.Conv2d(3, 4, 3, padding=1, bias=False))
            setattr(self, f"{b}2_bn", _bn(4, g))
        self.c1, self.c1_bn = nn.Conv2d(4, 5, 3, stride=2, padding=1, bias=False), _bn(5, g)
        self.c2, self.c2_bn = nn.Conv2d(5, 6, 3, padding=1, bias=False), _bn(6, g)
        self.sc, self.sc_bn = nn.Conv2d(4, 6, 1, stride=2, bias=False), _bn(6, g)
        self.fc = nn.Linear(6, 3)

    def trace(self, x):
        """The forward, returning the input of every conv / linear by name (the tests' ||X||)."""
        seen = {}

        def run(name, t):
            seen[name] = t
            return getattr(self, name)(t)

        h = torch.relu(self.stem_bn(run("stem", x)))
        for b in ("a", "b"):
            r = torch.relu(getattr(self, f"{b}1_bn")(run(f"{b}1", h)))
            h = torch.relu(h + getattr(self, f"{b}2_bn")(run(f"{b}2", r)))
        r = torch.relu(self.c1_bn(run("c1", h)))
        h = torch.relu(self.c2_bn(run("c2", r)) + self.sc_bn(run("sc", h)))
        return run("fc", h.mean((2, 3))), seen

    def forward(self, x):
        return self.trace(x)[0]


class ConvBNLinear(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.conv, self.conv_bn = nn.Conv2d(2, 4, 3, padding=1, bias=False), _bn(4, g)
        self.fc1, self.fc1_bn = nn.Linear(4 * 3 * 3, 5), _bn(5, g, one_d=True)
        self.fc2 = nn.Linear(5, 3)

    def trace(self, x):
        seen = {"conv": x}
        h = torch.relu(self.conv_bn(self.conv(x))).flatten(1)
        seen["fc1"] = h
        h = torch.relu(self.fc1_bn(self.fc1(h)))
        seen["fc2"] = h
        return self.fc2(h), seen

    def forward(self, x):
        return self.trace(x)[0]


# unit -> [(producer, its BatchNorm)], and the unit's consumers (input columns read by group="all")
RES_UNITS = {"stem": ([("stem", "stem_bn"), ("a2", "a2_bn"), ("b2", "b2_bn")], ["a1", "b1", "c1", "sc"]),
             "a1": ([("a1", "a1_bn")], ["a2"]), "b1": ([("b1", "b1_bn")], ["b2"]),
             "c1": ([("c1", "c1_bn")], ["c2"]), "c2": ([("c2", "c2_bn"), ("sc", "sc_bn")], ["fc"])}
LIN_UNITS = {"conv": ([("conv", "conv_bn")], ["fc1"]), "fc1": ([("fc1", "fc1_bn")], ["fc2"])}


def folded(model, conv: str, bn: str) -> torch.Tensor:
    """W * |gamma| / sqrt(var + eps), row by row, float64, flattened to (out, fan_in)."""
    w, b = getattr(model, conv).weight.detach().double(), getattr(model, bn)
    f = b.weight.detach().double().abs() / torch.sqrt(b.running_var.double() + b.eps)
    return (w * f.reshape(-1, *([1] * (w.dim() - 1)))).flatten(1)


def input_norm(model, name: str, xs: list[torch.Tensor]) -> torch.Tensor:
    """||X_j||_2 per input channel j of layer ``name`` over all samples and positions, laid out like
    the flattened weight (out, in * kh * kw) (a linear's input feature j is column j)."""
    sq = 0
    for x in xs:
        t = model.trace(x)[1][name].double()
        sq = sq + ((t ** 2).transpose(0, 1).flatten(1).sum(1) if t.dim() == 4 else (t ** 2).sum(0))
    n = sq.sqrt()
    w = getattr(model, name).weight
    k = w[0, 0].numel() if w.dim() == 4 else 1
    return n.repeat_interleave(k)[None, :].expand(w.shape[0], -1)


def expected(model, name: str, opts: dict, producers, consumers, xs) -> torch.Tensor:
    total = 0
    for conv, bn in producers:
        wf = folded(model, conv, bn)
        a = wf.abs()
        if name == "l1":
            total = total + a.sum(1)
        elif name == "l2":
            total = total + (wf ** 2).sum(1)
        elif name == "wanda":
            total = total + (a * input_norm(model, conv, xs)).sum(1)
        else:  # ria: (|W| / row sum + |W| / column sum) * ||X||^power, on the folded weights
            rel = a / a.sum(1, keepdim=True) + a / a.sum(0, keepdim=True)
            total = total + (rel * input_norm(model, conv, xs) ** opts.get("power", 0.5)).sum(1)
    if opts.get("group") == "all":
        for c in consumers:
            w = getattr(model, c).weight.detach().double()
            cols = w.transpose(0, 1).flatten(1) if w.dim() == 4 else w.t()
            if c == "fc1" and name.startswith("l"):  # fc1 reads conv channel j at 9 positions
                cols = w.reshape(w.shape[0], 4, 9).transpose(0, 1).flatten(1)
            total = total + (cols.abs().sum(1) if name == "l1" else (cols ** 2).sum(1))
    return total.sqrt() if name == "l2" else total


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    res, lin = ResStage().eval(), ConvBNLinear().eval()
    out = {}
    for model, shape, table in ((res, (2, 6, 6), RES_UNITS), (lin, (2, 3, 3), LIN_UNITS)):
        units = find_units(model, torch.randn(1, *shape))
        by = units.by_name()
        assert set(table) <= set(by), sorted(by)
        for u, (prods, _cons) in table.items():  # the units are what the hand formulas assume
            assert sorted(p.module_name for p in by[u].producers) == sorted(p for p, _ in prods)
        xs = [torch.randn(8, *shape, generator=torch.Generator().manual_seed(i)) for i in range(2)]
        out[type(model).__name__] = (model, units, table, xs)
    return out


@pytest.mark.parametrize("net", ["ResStage", "ConvBNLinear"])
@pytest.mark.parametrize("name, opts", CASES, ids=[f"{n}{'-' + '-'.join(map(str, o.values())) if o else ''}"
                                                   for n, o in CASES])
def test_magnitude_scores_fold_every_producer_by_hand(nets, net, name, opts):
    model, units, table, xs = nets[net]
    got = get_score(name, **opts)(model, list(units), [(x, torch.zeros(len(x), dtype=torch.long)) for x in xs])
    for u, (prods, cons) in table.items():
        want = expected(model, name, opts, prods, cons, xs)
        torch.testing.assert_close(got[u].double(), want, rtol=1e-5, atol=1e-8, msg=f"{name} {opts} unit {u}")


def test_every_resnet_producer_is_paired_with_its_own_batchnorm():
    from flowprune.models import build_model
    from flowprune.scores.magnitude import bn_after

    m = build_model("resnet20", (1, 16, 16), 10).eval()
    units = find_units(m, torch.randn(1, 1, 16, 16))
    name_of = {mod: n for n, mod in m.named_modules()}
    multi = 0
    for u in units:
        pairs = {p: name_of[bn] for p, bn in bn_after(m, u).items()}
        want = {p.module_name: (p.module_name[:-1] + "1" if p.module_name.endswith("shortcut.0")
                                else p.module_name.replace("conv", "bn")) for p in u.producers}
        assert pairs == want, u.name
        multi += len(u.producers) > 1
    assert multi == 3  # one unit per residual stage, each with 4 producers (3 blocks + stem or shortcut)
