"""Baking masks, compact CSR save/load, and the sparse execution path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from flowprune.errors import FlowpruneError
from flowprune.models import build_model
from flowprune.pruning.masks import install_masks, mask_logits, set_global_topk
from flowprune.sparse import (
    SparseConv2d,
    SparseLinear,
    bake,
    load_sparse,
    save_sparse,
    to_sparse_execution,
    zero_sparsity_report,
)


def _masked(name: str, shape, sparsity: float, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(name, shape, 10)
    net = install_masks(model, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mask_logits(net):
            p.copy_(torch.randn(p.shape, generator=g))
    n = sum(p.numel() for p in mask_logits(net))
    set_global_topk(net, int(round((1 - sparsity) * n)))
    return net.eval()


@pytest.mark.parametrize("name, shape", [("lenet300", (1, 8, 8)), ("resnet20", (1, 8, 8))])
def test_baked_weights_give_identical_outputs(name, shape):
    net = _masked(name, shape, 0.9)
    x = torch.randn(5, *shape)
    with torch.no_grad():
        ref = net(x)
        baked = bake(net)
        out = baked(x)
    assert torch.equal(ref, out)
    assert not any(hasattr(m, "parametrizations") for m in baked.modules())
    assert abs(zero_sparsity_report(baked)["sparsity"] - 0.9) < 0.01  # random weights are never exactly 0
    with torch.no_grad():
        assert torch.equal(net(x), ref)  # the masked original still works after baking a copy
    assert type(baked.fc) is nn.Linear


@pytest.mark.parametrize("sparsity", [0.9, 0.98])
def test_sparse_execution_matches_dense(sparsity):
    for name, shape in [("lenet300", (1, 8, 8)), ("resnet20", (1, 8, 8))]:
        baked = bake(_masked(name, shape, sparsity))
        fast = to_sparse_execution(baked, min_sparsity=0.5)
        assert fast.sparse_layers
        x = torch.randn(3, *shape)
        with torch.no_grad():
            assert torch.allclose(fast(x), baked(x), atol=1e-4, rtol=1e-4)
    assert any(isinstance(m, SparseConv2d) for m in fast.modules())


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 6), st.sampled_from([1, 3]), st.integers(1, 2),
       st.integers(0, 1), st.integers(1, 2), st.booleans(), st.integers(0, 1000))
def test_sparse_conv_property(b, cin, cout, k, stride, pad, dil, bias, seed):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dil, bias=bias)
    with torch.no_grad():
        conv.weight.mul_((torch.rand_like(conv.weight) > 0.8).float())
    x = torch.randn(b, cin, 9, 7)
    with torch.no_grad():
        assert torch.allclose(SparseConv2d(conv)(x), conv(x), atol=1e-5)


def test_sparse_linear_any_leading_dims():
    lin = nn.Linear(6, 4)
    x = torch.randn(2, 3, 6)
    with torch.no_grad():
        assert torch.allclose(SparseLinear(lin)(x), lin(x), atol=1e-5)


def test_compact_save_load_roundtrip(tmp_path):
    net = _masked("lenet300", (1, 8, 8), 0.95)
    d = save_sparse(net, tmp_path / "sp", metadata={"method": "test"})
    size = (d / "model.sparse.safetensors").stat().st_size
    dense_bytes = sum(p.numel() * 4 for p in bake(net).state_dict().values())
    assert size < 0.2 * dense_bytes
    loaded = load_sparse(d)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    assert loaded.flowprune_metadata == {"method": "test"}
    with pytest.raises(FlowpruneError, match="not a sparse flowprune model"):
        load_sparse(tmp_path)


def test_malformed_sparse_file_raises(tmp_path):
    from safetensors.torch import load_file, save_file

    d = save_sparse(_masked("lenet300", (1, 8, 8), 0.9), tmp_path / "sp")
    t = load_file(str(d / "model.sparse.safetensors"))
    key = next(k for k in t if k.endswith("::csr_col"))
    t[key] = t[key] + 10_000  # column indices out of range
    save_file(t, str(d / "model.sparse.safetensors"))
    with pytest.raises(FlowpruneError, match="malformed"):
        load_sparse(d)
    with pytest.raises(FlowpruneError, match="min_sparsity"):
        to_sparse_execution(nn.Linear(2, 2), min_sparsity=1.5)


def test_sparse_execution_with_example_input_keeps_only_faster_layers():
    baked = bake(_masked("lenet300", (1, 8, 8), 0.95))
    x = torch.randn(64, 1, 8, 8)
    fast = to_sparse_execution(baked, min_sparsity=0.5, example_input=x, reps=3)
    assert set(fast.sparse_decisions) == {"body.0", "body.2", "fc"}
    assert fast.sparse_layers == [n for n, d in fast.sparse_decisions.items() if d["sparse"]]
    with torch.no_grad():
        assert torch.allclose(fast(x), baked(x), atol=1e-4, rtol=1e-4)
