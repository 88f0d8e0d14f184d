"""Data sets: real data, stratified deterministic splits, augmentation, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowprune.data import augment_batch, load_dataset, make_loader
from flowprune.errors import FlowpruneError


def test_mnist5k_split_sizes_and_class_balance(mnist5k_data):
    d = mnist5k_data
    assert d.sizes() == {"train": 3500, "val": 500, "test": 1000}
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10
    for split, per_class in ((d.test, 100), (d.val, 50), (d.train, 350)):
        counts = torch.bincount(split.tensors[1], minlength=10)
        assert counts.tolist() == [per_class] * 10  # the 5k set holds 500 per class
    # normalised with the standard MNIST statistics: background pixels map to -0.1307/0.3081
    assert abs(float(d.train.tensors[0].min()) - (-0.1307 / 0.3081)) < 1e-4
    # real digits: a pixel-mean classifier is far above chance
    x, y = d.train.tensors[0].flatten(1), d.train.tensors[1]
    centroids = torch.stack([x[y == c].mean(0) for c in range(10)])
    xt, yt = d.test.tensors[0].flatten(1), d.test.tensors[1]
    acc = (torch.cdist(xt, centroids).argmin(1) == yt).float().mean()
    assert acc > 0.7


def test_splits_are_disjoint_and_deterministic():
    a = load_dataset("digits", seed=3)
    b = load_dataset("digits", seed=3)
    c = load_dataset("digits", seed=4)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])
    rows = {tuple(r.tolist()) for r in a.train.tensors[0].flatten(1)}
    test_rows = [tuple(r.tolist()) for r in a.test.tensors[0].flatten(1)]
    # digits contains a few exact duplicate images; nearly all test rows are unseen in train
    assert sum(r in rows for r in test_rows) < 0.02 * len(test_rows)
    assert sum(a.sizes().values()) == 1797


def test_mnist1d_regenerates_offline(mnist1d_data):
    d = mnist1d_data
    assert d.input_shape == (1, 40) and d.num_classes == 10
    assert sum(d.sizes().values()) == 5000
    assert abs(float(d.train.tensors[0].mean())) < 0.1


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "cifar11"}, "allowed: digits"),
    ({"name": "digits", "val_fraction": 0.5, "test_fraction": 0.5}, "below 1"),
    ({"name": "digits", "test_fraction": 1.5}, r"test_fraction must lie in \[0.0, 1.0\)"),
    ({"name": "digits", "test_fraction": 0.0001}, "empty test split"),
    ({"name": "imagefolder:/no/such/dir"}, "does not exist"),
])
def test_bad_input_names_value(kwargs, match):
    with pytest.raises(FlowpruneError, match=match):
        load_dataset(**kwargs)


def test_torchvision_offline_fails_fast_and_leaves_no_folder(tmp_path, monkeypatch):
    import socket

    def no_network(*args, **kwargs):  # fails fast = never tries the network (no timing to assert)
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    root = tmp_path / "tvdata"
    with pytest.raises(FlowpruneError, match="cannot be downloaded"):
        load_dataset("tv:CIFAR10", root=str(root))
    assert not root.exists() or not any(root.rglob("*"))
    with pytest.raises(FlowpruneError, match="allowed"):
        load_dataset("tv:NoSuchSet", root=str(root))


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(6):
            arr = (rng.random((12, 10, 3)) * 255).astype("uint8")
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
    d = load_dataset(f"imagefolder:{tmp_path}", image_size=16, val_fraction=0.2, test_fraction=0.2)
    assert d.input_shape == (3, 16, 16) and d.num_classes == 2
    assert d.info["classes"] == ["cat", "dog"]
    assert sum(d.sizes().values()) == 12


def test_loader_order_depends_only_on_seed_and_epoch(digits_data):
    a = make_loader(digits_data.train, 64, shuffle=True, seed=1, augment=True)
    b = make_loader(digits_data.train, 64, shuffle=True, seed=1, augment=True)
    a.set_epoch(2)
    b.set_epoch(2)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    b.set_epoch(3)
    assert not torch.equal(next(iter(a))[1], next(iter(b))[1])


@settings(max_examples=25, deadline=None)
@given(shift=st.integers(0, 3), h=st.integers(4, 12), w=st.integers(4, 12), seed=st.integers(0, 1000))
def test_augment_is_a_translation(shift, h, w, seed):
    x = torch.randn(5, 2, h, w)
    g = torch.Generator().manual_seed(seed)
    out = augment_batch(x, g, shift)
    assert out.shape == x.shape
    for i in range(5):  # every output is the input shifted, the border filled with the sample's minimum
        found = False
        for dy in range(-shift, shift + 1):
            for dx in range(-shift, shift + 1):
                ref = torch.full_like(x[i], float(x[i].min()))
                ys, yd = slice(max(0, dy), h + min(0, dy)), slice(max(0, -dy), h + min(0, -dy))
                xs, xd = slice(max(0, dx), w + min(0, dx)), slice(max(0, -dx), w + min(0, -dx))
                ref[:, yd, xd] = x[i][:, ys, xs]
                found |= torch.allclose(out[i], ref, atol=1e-6)
        assert found
