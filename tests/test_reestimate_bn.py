"""BatchNorm re-estimation with one-image calibration (1x1 pooling branches) and failing forwards (issue 24)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flowprune.errors import FlowpruneError
from flowprune.train import reestimate_bn


class PooledBranch(nn.Module):
    """conv -> BN -> ReLU, plus an image-pooling branch (1x1 map -> conv -> BN), as DeepLabV3's ASPP."""

    def __init__(self, fail_in_train: bool = False):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.pool, self.pconv, self.pbn = nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        self.fail_in_train = fail_in_train

    def forward(self, x):
        if self.training and self.fail_in_train:
            raise AssertionError("targets should not be none when in training mode")
        h = torch.relu(self.bn(self.conv(x)))
        h = h + self.pbn(self.pconv(self.pool(h)))
        return self.fc(h.mean((2, 3)))


def test_one_image_reestimates_what_it_can_and_keeps_the_rest():
    torch.manual_seed(0)
    m = PooledBranch()
    with torch.no_grad():
        m.pbn.running_mean.fill_(0.5)
        m.pbn.running_var.fill_(2.0)
    x = torch.randn(1, 3, 8, 8)
    reestimate_bn(m, [(x, torch.zeros(1, dtype=torch.long))])
    y = m.conv(x).detach()
    assert torch.allclose(m.bn.running_mean, y.mean((0, 2, 3)), atol=1e-5)  # the batch's own statistics
    assert torch.allclose(m.bn.running_var, y.var((0, 2, 3), unbiased=True), atol=1e-4)
    assert torch.equal(m.pbn.running_mean, torch.full((4,), 0.5))  # one value per channel: kept
    assert torch.equal(m.pbn.running_var, torch.full((4,), 2.0))
    assert not m.training and m.bn.momentum == 0.1


def test_a_failing_train_forward_restores_the_statistics_and_names_the_option():
    m = PooledBranch(fail_in_train=True)
    with torch.no_grad():
        m.bn.running_mean.fill_(0.25)
    with pytest.raises(FlowpruneError, match="reestimate_bn=False"):
        reestimate_bn(m, [(torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))])
    assert torch.equal(m.bn.running_mean, torch.full((4,), 0.25))
    assert m.bn.momentum == 0.1
