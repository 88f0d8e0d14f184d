"""Prunable units on top of Torch-Pruning's DependencyGraph."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flowprune.errors import FlowpruneError
from flowprune.models import build_model
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
    def __init__(self, c):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, c, 1, 1))

    def forward(self, x):
        return x * self.alpha


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.s = Scaled(8)
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
    names = {u.name for u in units}
    assert "c1" not in names  # its channels pass through the unsupported layer
    assert {"c2", "c3"} <= names


def test_bad_kind_and_ignored_layer():
    m = build_model("lenet300", (1, 8, 8), 10)
    with pytest.raises(FlowpruneError, match="unit kind"):
        find_units(m, torch.randn(1, 1, 8, 8), kinds=("filters",))
    units = find_units(m, torch.randn(1, 1, 8, 8), ignored_layers=["body.0"])
    assert [u.name for u in units] == ["body.2"]
