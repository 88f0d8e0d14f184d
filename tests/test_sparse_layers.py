"""The CSR execution path per layer type: output equals the dense layer's within tolerance."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from flowprune.errors import FlowpruneError
from flowprune.models import build_model
from flowprune.sparse import SparseConv1d, SparseConv2d, SparseLinear, sparse_layer, to_sparse_execution


def _sparsify(layer: nn.Module, sparsity: float, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.mul_((torch.rand(layer.weight.shape, generator=g) >= sparsity).float())
    return layer.eval()


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("batch", [1, 5])
def test_each_layer_type_matches_dense(sparsity, batch):
    torch.manual_seed(1)
    cases = [(nn.Linear(20, 7), torch.randn(batch, 20), SparseLinear),
             (nn.Conv2d(6, 5, 3, padding=1), torch.randn(batch, 6, 9, 8), SparseConv2d),
             (nn.Conv2d(6, 5, 1), torch.randn(batch, 6, 9, 8), SparseConv2d),
             (nn.Conv2d(6, 5, 1, stride=2, bias=False), torch.randn(batch, 6, 9, 8), SparseConv2d),
             (nn.Conv1d(4, 6, 3, stride=2, padding=1, bias=False), torch.randn(batch, 4, 17), SparseConv1d),
             (nn.Conv1d(4, 6, 1), torch.randn(batch, 4, 17), SparseConv1d)]
    for layer, x, kind in cases:
        layer = _sparsify(layer, sparsity)
        fast = sparse_layer(layer)
        assert isinstance(fast, kind)
        with torch.no_grad():
            ref, out = layer(x), fast(x)
        assert out.shape == ref.shape
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), (type(layer).__name__, sparsity, batch)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5), st.sampled_from([1, 3, 5]), st.integers(1, 2),
       st.integers(0, 2), st.integers(1, 2), st.booleans(), st.integers(0, 1000))
def test_sparse_conv1d_property(b, cin, cout, k, stride, pad, dil, bias, seed):
    torch.manual_seed(seed)
    conv = _sparsify(nn.Conv1d(cin, cout, k, stride=stride, padding=pad, dilation=dil, bias=bias), 0.8, seed)
    x = torch.randn(b, cin, 23)
    with torch.no_grad():
        assert torch.allclose(SparseConv1d(conv)(x), conv(x), atol=1e-5)


def test_unsupported_convolutions_stay_dense():
    assert sparse_layer(nn.Conv2d(4, 4, 3, groups=2)) is None
    assert sparse_layer(nn.Conv1d(4, 4, 3, padding="same")) is None
    assert sparse_layer(nn.BatchNorm2d(3)) is None
    with pytest.raises(FlowpruneError, match="groups=1"):
        SparseConv1d(nn.Conv1d(4, 4, 3, groups=4))


def test_cnn1d_runs_sparse_and_matches_dense():
    torch.manual_seed(0)
    net = build_model("cnn1d", (1, 40), 10).eval()
    for m in net.modules():
        if isinstance(m, (nn.Conv1d, nn.Linear)):
            _sparsify(m, 0.9)
    fast = to_sparse_execution(net, min_sparsity=0.5)
    assert any(isinstance(m, SparseConv1d) for m in fast.modules())
    x = torch.randn(3, 1, 40)
    with torch.no_grad():
        assert torch.allclose(fast(x), net(x), atol=1e-4, rtol=1e-4)


def test_bad_example_input_and_reps():
    with pytest.raises(FlowpruneError, match="example_input"):
        to_sparse_execution(nn.Sequential(nn.Linear(2, 2)), example_input=[1, 2])
    with pytest.raises(FlowpruneError, match="reps"):
        to_sparse_execution(nn.Sequential(nn.Linear(2, 2)), reps=0)
