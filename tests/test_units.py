"""Prunable units on top of Torch-Pruning's DependencyGraph."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flowprune.errors import FlowpruneError
from flowprune.models import build_model
from flowprune.pruning.structural import apply_cuts
from flowprune.units import find_units, unsupported_layers


def test_resnet_units_couple_residual_channels():
    m = build_model("resnet20", (1, 8, 8), 10)
    units = find_units(m, torch.randn(1, 1, 8, 8)).by_name()
    stream = units["conv1"]  # stem + every stage-1 conv2 share channels through the residual adds
    outs = {p.module_name for p in stream.producers}
    assert {"conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"} <= outs
    assert stream.kind == "channel" and stream.size == 16
    assert units["layer1.0.conv1"].size == 16 and len(units["layer1.0.conv1"].producers) == 1
    assert "fc" not in units  # classifier excluded


def test_vit_heads_and_neurons_and_exclusions():
    m = build_model("vit", (1, 8, 8), 10)
    units = find_units(m, torch.randn(1, 1, 8, 8))
    kinds = {u.name: u.kind for u in units}
    assert kinds["blocks.0.attn"] == "head" and kinds["blocks.0.mlp.fc1"] == "neuron"
    assert units.by_name()["blocks.0.attn"].size == 4
    assert not any("patch_embed" in n or n == "head" for n in kinds)
    only_heads = find_units(m, torch.randn(1, 1, 8, 8), kinds=("head",))
    assert all(u.kind == "head" for u in only_heads) and len(only_heads) == 4


class Scaled(nn.Module):
    """A per-channel scale held directly by a container (ConvNeXt's ``layer_scale`` style)."""

    def __init__(self, c):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, c, 1, 1))

    def forward(self, x):
        return x * self.alpha


class Mixer(nn.Module):
    """A channel-mixing matrix held directly: no cutting rule exists for it."""

    def __init__(self, c):
        super().__init__()
        self.mix = nn.Parameter(torch.eye(c) + 0.1)

    def forward(self, x):
        return torch.einsum("bchw,cd->bdhw", x, self.mix)


class Odd(nn.Module):
    def __init__(self, layer=Mixer):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.s = layer(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.c2(self.s(self.c1(x)).relu()).relu()
        return self.fc(self.c3(x).relu().mean((2, 3)))


def test_unsupported_layer_left_intact_and_reported(caplog):
    m = Odd()
    assert unsupported_layers(m) == ["s"]
    units = find_units(m, torch.randn(1, 1, 6, 6))
    assert units.unsupported == ["s"]
    assert "mix" in units.reasons["s"] and "(8, 8)" in units.reasons["s"]
    names = {u.name for u in units}
    assert "c1" not in names  # its channels pass through the unsupported layer
    assert {"c2", "c3"} <= names


def test_per_channel_scale_parameter_is_cut_with_its_channels():
    m = Odd(Scaled)
    assert unsupported_layers(m) == []
    x = torch.randn(2, 1, 6, 6)
    units = find_units(m, x[:1]).by_name()
    assert "c1" in units
    new = apply_cuts(m, {"c1": [0, 2, 5]}, example_inputs=x[:1])
    assert new.s.alpha.shape == (1, 5, 1, 1) and new.c1.out_channels == 5 and new.c2.in_channels == 5
    assert m.s.alpha.shape == (1, 8, 1, 1)  # the caller's model is untouched
    assert new(x).shape == (2, 3)


class GroupedBlock(nn.Module):
    """ResNeXt-style bottleneck: 1x1 -> grouped 3x3 (4 groups) -> GroupNorm -> 1x1, plus depthwise."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 1)
        self.bn_a = nn.BatchNorm2d(16)
        self.b = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.gn = nn.GroupNorm(2, 16)
        self.c = nn.Conv2d(16, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x).relu()
        y = self.c(self.gn(self.b(self.bn_a(self.a(x)).relu())).relu())
        x = self.dw(x + y).relu()
        return self.fc(x.mean((2, 3)))


def test_grouped_conv_units_are_offset_classes_and_cut_consistently():
    m = GroupedBlock().eval()
    x = torch.randn(2, 3, 8, 8)
    units = find_units(m, x[:1]).by_name()
    a, b = units["a"], units["b"]
    # a's channels feed the 4-group conv b: a unit is one offset of the 4 groups (16 / 4 = 4 offsets)
    assert a.size == 4 and a.channel_groups == 4 and a.channels([1]) == [1, 5, 9, 13]
    # b's own 4 groups and the GroupNorm's 2 tie its outputs the same way: 4 offsets
    assert b.size == 4 and b.channels([0]) == [0, 4, 8, 12]
    new = apply_cuts(m, {"a": [1, 2], "b": [3]}, example_inputs=x[:1])
    assert new.a.out_channels == 8 and new.b.in_channels == 8 and new.b.groups == 4
    assert new.b.out_channels == 12 and new.gn.num_channels == 12 and new.c.in_channels == 12
    new.train()
    new(x).sum().backward()
    with pytest.raises(FlowpruneError, match="removes all 4 units"):
        apply_cuts(m, {"a": [0, 1, 2, 3]}, example_inputs=x[:1])


class Aux(nn.Module):
    """An auxiliary head that runs only in training (GoogLeNet / Inception-v3 style)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.aux = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.c1(x).relu()
        out = self.fc(self.c2(h).relu().mean((2, 3)))
        if self.training:
            return out, self.aux(h).mean((2, 3))
        return out


def test_train_only_branches_are_traced_and_output_layers_excluded():
    m = Aux()
    x = torch.randn(2, 3, 6, 6)
    units = find_units(m, x[:1]).by_name()
    assert "aux" not in units  # its outputs are a model output
    assert {c.module_name for c in units["c1"].consumers} == {"c2", "aux"}
    assert m.training  # flags restored
    new = apply_cuts(m, {"c1": [0, 1, 2]}, example_inputs=x[:1])
    out, aux = new.train()(x)
    assert aux.shape == (2, 4) and new.aux.in_channels == 5


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc(self.c(x).mean((2, 3)))


def test_untraceable_model_gives_one_clear_error():
    with pytest.raises(FlowpruneError, match="module 'fc'"):
        find_units(Broken(), torch.randn(1, 3, 6, 6))


def test_bad_kind_and_ignored_layer():
    m = build_model("lenet300", (1, 8, 8), 10)
    with pytest.raises(FlowpruneError, match="unit kind"):
        find_units(m, torch.randn(1, 1, 8, 8), kinds=("filters",))
    units = find_units(m, torch.randn(1, 1, 8, 8), ignored_layers=["body.0"])
    assert [u.name for u in units] == ["body.2"]
