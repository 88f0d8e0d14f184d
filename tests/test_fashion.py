"""Fashion-MNIST: the loader on the committed 500-image subset, and on Debian's files where installed."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from flowprune.data import available_datasets, load_dataset
from flowprune.errors import FlowpruneError
from flowprune.fashion import DEFAULT_ROOT, FASHION_MEAN, FASHION_STD, FILES, read_idx, read_raw

MINI = Path(__file__).resolve().parent / "data" / "fashion-mnist-mini"
DEBIAN = Path(DEFAULT_ROOT)
HAVE_DEBIAN = all((DEBIAN / f"{n}.gz").is_file() for n in FILES.values())
LOW, HIGH = -FASHION_MEAN / FASHION_STD, (1 - FASHION_MEAN) / FASHION_STD  # pixel 0 and pixel 255


def _labels(d, split):
    return getattr(d, split).tensors[1]


def test_fashion_is_a_named_data_set():
    assert "fashion" in available_datasets()


def test_mini_subset_splits_stratified_and_normalised(fashion_mini_data):
    d = fashion_mini_data
    assert d.name == "fashion" and d.input_shape == (1, 28, 28) and d.num_classes == 10
    assert d.sizes() == {"train": 350, "val": 50, "test": 100}  # 50 per class: 35 / 5 / 10
    for split, per_class in (("train", 35), ("val", 5), ("test", 10)):
        assert torch.bincount(_labels(d, split), minlength=10).tolist() == [per_class] * 10
    assert d.info["official_train"] == 400 and d.info["official_test"] == 100
    x = torch.cat([d.train.tensors[0], d.val.tensors[0], d.test.tensors[0]])
    assert x.dtype == torch.float32
    assert abs(float(x.min()) - LOW) < 1e-5 and abs(float(x.max()) - HIGH) < 1e-5
    # every value is (k/255 - mean) / std for an integer k
    k = (x * FASHION_STD + FASHION_MEAN) * 255
    assert float((k - k.round()).abs().max()) < 1e-3
    # real images: nearest class centroid is far above chance (0.62-0.66 over seeds 0-4; chance 0.10)
    xtr, ytr = d.train.tensors[0].flatten(1), d.train.tensors[1]
    centroids = torch.stack([xtr[ytr == c].mean(0) for c in range(10)])
    xt, yt = d.test.tensors[0].flatten(1), d.test.tensors[1]
    assert float((torch.cdist(xt, centroids).argmin(1) == yt).float().mean()) > 0.45


def test_mini_split_is_a_function_of_the_seed():
    a = load_dataset("fashion", root=str(MINI), seed=5)
    b = load_dataset("fashion", root=str(MINI), seed=5)
    c = load_dataset("fashion", root=str(MINI), seed=6)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(a, split).tensors[0], getattr(b, split).tensors[0])
        assert torch.equal(_labels(a, split), _labels(b, split))
    assert not torch.equal(a.test.tensors[0], c.test.tensors[0])
    # the three splits partition the 500 images: no image is lost or seen twice
    raw, _, _ = read_raw(MINI)
    pooled = torch.cat([a.train.tensors[0], a.val.tensors[0], a.test.tensors[0]])
    got = sorted(map(bytes, np.rint((pooled.numpy() * FASHION_STD + FASHION_MEAN) * 255).astype(np.uint8)
                     .reshape(len(pooled), -1)))
    assert got == sorted(map(bytes, raw.reshape(len(raw), -1)))


def test_limit_keeps_a_stratified_subset():
    d = load_dataset("fashion", root=str(MINI), seed=0, limit=200)
    assert sum(d.sizes().values()) == 200
    assert d.info["class_counts"] == [20] * 10


def test_missing_files_name_the_debian_package(tmp_path, monkeypatch):
    with pytest.raises(FlowpruneError, match=r"dataset-fashion-mnist.*apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion", root=str(tmp_path))
    monkeypatch.setattr("flowprune.fashion.DEFAULT_ROOT", str(tmp_path / "not-installed"))
    with pytest.raises(FlowpruneError, match=r"train-images-idx3-ubyte.gz.*'dataset-fashion-mnist'"):
        load_dataset("fashion")


def test_corrupt_files_are_refused(tmp_path):
    for name in FILES.values():
        (tmp_path / f"{name}.gz").write_bytes((MINI / f"{name}.gz").read_bytes())
    data = gzip.decompress((MINI / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(data[:-3]))  # truncated
    with pytest.raises(FlowpruneError, match="truncated or corrupt"):
        load_dataset("fashion", root=str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + data[4:]))  # floats
    with pytest.raises(FlowpruneError, match="not an IDX file of unsigned bytes"):
        load_dataset("fashion", root=str(tmp_path))


def test_uncompressed_files_read_the_same(tmp_path):
    for name in FILES.values():
        (tmp_path / name).write_bytes(gzip.decompress((MINI / f"{name}.gz").read_bytes()))
    a = load_dataset("fashion", root=str(tmp_path), seed=1)
    b = load_dataset("fashion", root=str(MINI), seed=1)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0]) and torch.equal(a.test.tensors[1], b.test.tensors[1])


@pytest.mark.skipif(not HAVE_DEBIAN, reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_files_give_the_full_set():
    d = load_dataset("fashion", seed=0)
    assert d.sizes() == {"train": 49000, "val": 7000, "test": 14000}
    for split, per_class in (("train", 4900), ("val", 700), ("test", 1400)):
        assert torch.bincount(_labels(d, split), minlength=10).tolist() == [per_class] * 10
    assert d.info["official_train"] == 60000 and d.info["official_test"] == 10000
    x = d.train.tensors[0]
    assert x.shape == (49000, 1, 28, 28)
    assert abs(float(x.min()) - LOW) < 1e-5 and abs(float(x.max()) - HIGH) < 1e-5
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01  # the standard statistics
    e = load_dataset("fashion", seed=0)
    f = load_dataset("fashion", seed=1)
    assert torch.equal(d.test.tensors[0], e.test.tensors[0]) and torch.equal(d.val.tensors[1], e.val.tensors[1])
    assert not torch.equal(d.test.tensors[0], f.test.tensors[0])
    # the pooled set is the two official files: the pixel sums of the splits add up to the files'
    raw, y, n_train = read_raw()
    assert n_train == 60000 and raw.shape == (70000, 28, 28)
    assert np.bincount(y[:n_train]).tolist() == [6000] * 10 and np.bincount(y[n_train:]).tolist() == [1000] * 10
    total = sum(float(((getattr(d, s).tensors[0].double() * FASHION_STD + FASHION_MEAN) * 255).sum())
                for s in ("train", "val", "test"))
    assert abs(total - float(raw.sum(dtype=np.int64))) < 1e-6 * total


@pytest.mark.skipif(not HAVE_DEBIAN, reason="Debian's dataset-fashion-mnist is not installed")
def test_committed_subset_is_what_the_script_makes_from_debian():
    spec = importlib.util.spec_from_file_location("make_fashion_mini", MINI.parent / "make_fashion_mini.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    made = mod.make()
    for name, data in made.items():
        assert gzip.decompress((MINI / f"{name}.gz").read_bytes()) == data
    assert read_idx(MINI / "train-images-idx3-ubyte.gz").shape == (400, 28, 28)
