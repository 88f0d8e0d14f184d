"""Mean compensation: the removed channels' means folded into their consumers' biases.

For a linear (or 1x1 conv) consumer, E[out] = W E[in] + b, so after compensating and cutting, the
mean of the consumer's output over the calibration batches must equal the uncut model's exactly.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from flowprune.compensate import compensate_means, consumer_input_means
from flowprune.pruning.structural import apply_cuts, prune
from flowprune.units import find_units


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Conv1x1(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 3, 1)  # a 1x1 consumer with a bias, no BN after it
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.c2(torch.relu(self.c1(x))).mean((2, 3)))


def _batches(shape, n=3, b=6, classes=3):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(b, *shape, generator=g), torch.randint(0, classes, (b,), generator=g)) for _ in range(n)]


def test_bias_delta_by_hand_and_mean_output_preserved():
    torch.manual_seed(0)
    m = MLP().eval()
    batches = _batches((5,))
    units = find_units(m, torch.randn(1, 5))
    (u,) = units
    h = torch.cat([torch.relu(m.fc1(x)) for x, _ in batches]).detach()
    means = consumer_input_means(m, units, batches)
    torch.testing.assert_close(means["fc2"], h.mean(0).double())
    cut = {"fc1": torch.tensor([1, 4])}
    work = copy.deepcopy(m)
    want_bias = m.fc2.bias.detach() + m.fc2.weight.detach()[:, [1, 4]] @ h.mean(0)[[1, 4]]
    assert compensate_means(work, units, cut, means) == ["fc2"]
    torch.testing.assert_close(work.fc2.bias.detach(), want_bias)
    small = apply_cuts(work, cut, example_inputs=torch.randn(1, 5))
    xs = torch.cat([x for x, _ in batches])
    torch.testing.assert_close(small(xs).mean(0), m(xs).mean(0), rtol=1e-5, atol=1e-6)
    # without compensation the mean output moves
    plain = apply_cuts(m, cut, example_inputs=torch.randn(1, 5))
    assert (plain(xs).mean(0) - m(xs).mean(0)).abs().max() > 1e-3
    # the caller's model is untouched by the cut of the compensated copy
    assert not torch.equal(m.fc2.bias, work.fc2.bias)


def test_conv_consumer_mean_preserved():
    torch.manual_seed(1)
    m = Conv1x1().eval()
    batches = _batches((2, 5, 5), classes=2)
    units = find_units(m, torch.randn(1, 2, 5, 5))
    by = units.by_name()
    cut = {"c1": torch.tensor([0, 2])}
    work = copy.deepcopy(m)
    assert compensate_means(work, list(by.values()), cut, consumer_input_means(work, units, batches)) == ["c2"]
    small = apply_cuts(work, cut, example_inputs=torch.randn(1, 2, 5, 5))
    xs = torch.cat([x for x, _ in batches])
    c2_in = torch.relu(m.c1(xs))
    want = m.c2(c2_in).mean((0, 2, 3))
    got = small.c2(torch.relu(small.c1(xs))).mean((0, 2, 3))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_prune_records_compensation_and_never_mutates(trained_cnn1d_mnist1d, mnist1d_data):
    m = trained_cnn1d_mnist1d
    before = copy.deepcopy(m.state_dict())
    res = prune(m, mnist1d_data, "agf", target_macs=2.0, calib_batches=2, calib_batch_size=64, compensate=True)
    assert res.history[-1]["compensated"] == ["fc"]  # conv consumers have no bias; the classifier does
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_compare_one_shot_with_compensation_hits_the_target(trained_cnn1d_mnist1d, mnist1d_data):
    """The compensated model is cut again from the verified plan: the MACs target still holds (3%)."""
    from flowprune.compare import flowprune_one_shot
    from flowprune.measure import count_macs_params

    m = trained_cnn1d_mnist1d
    batches = mnist1d_data.calibration_batches(64, 2, seed=0)
    pruned, _cuts, info = flowprune_one_shot(m, "agf", 8.0, input_shape=(1, 40), batches=batches)
    assert info["compensated"] == ["fc"]
    dense, _ = count_macs_params(m, (1, 40))
    macs, _ = count_macs_params(pruned, (1, 40))
    assert abs(dense / macs / 8.0 - 1) <= 0.03
