"""Shared fixtures: real data sets and small models trained once per test session.

Trained fixtures are cached on disk for the session (safetensors via flowprune.io) and every
test gets a fresh copy, so no test can change another's model.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One torch thread for the whole suite by default: the test models are small, and on a 2-core machine
# that is shared (or runs pytest next to other work) two OpenMP threads make them several times slower.
# FLOWPRUNE_TEST_THREADS=N runs it with N (CI's second pass uses 2; see docs/ci.md).
TEST_THREADS = int(os.environ.get("FLOWPRUNE_TEST_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)

from flowprune.data import load_dataset  # noqa: E402
from flowprune.models import build_model  # noqa: E402
from flowprune.train import TrainConfig, fit  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_global_state():
    """Each test starts from the same torch RNG state and thread count whatever ran before it (the
    suite also runs in shuffled order), and a test (or an in-process CLI call with ``--threads``)
    that changes the thread count does not change it for the tests after it."""
    torch.manual_seed(0)
    yield
    if torch.get_num_threads() != TEST_THREADS:
        torch.set_num_threads(TEST_THREADS)


@pytest.fixture(scope="session")
def digits_data():
    """scikit-learn digits, 1x8x8, 10 classes (fast)."""
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="session")
def mnist5k_data():
    """The 5,000 real MNIST digits, 1x28x28: 3,500 / 500 / 1,000."""
    return load_dataset("mnist5k", seed=0)


@pytest.fixture(scope="session")
def mnist1d_data():
    """MNIST-1D, 1x40 signals: 3,500 / 500 / 1,000."""
    return load_dataset("mnist1d", seed=0)


FASHION_MINI = os.path.join(os.path.dirname(__file__), "data", "fashion-mnist-mini")


@pytest.fixture(scope="session")
def fashion_mini_data():
    """The committed 500-image Fashion-MNIST subset (tests/data/fashion-mnist-mini), 1x28x28: 350 / 50 / 100.

    Read by ``load_dataset("fashion", root=...)`` like the full set, so no test needs Debian's package.
    """
    return load_dataset("fashion", root=FASHION_MINI, seed=0)


_CACHE: dict[str, torch.nn.Module] = {}


def _trained(key: str, make, data, cfg: TrainConfig) -> torch.nn.Module:
    if key not in _CACHE:
        torch.manual_seed(cfg.seed)
        model = make()
        fit(model, data, cfg, progress=False)
        _CACHE[key] = model.eval()
    return copy.deepcopy(_CACHE[key])


@pytest.fixture
def trained_lenet_mnist(mnist5k_data):
    """LeNet-300-100 trained 3 epochs on mnist5k (about 95% test accuracy), a fresh copy per test."""
    return _trained("lenet", lambda: build_model("lenet300", mnist5k_data.input_shape, 10), mnist5k_data,
                    TrainConfig(epochs=3, lr=0.05, augment=False))


@pytest.fixture
def trained_resnet20_digits(digits_data):
    """ResNet-20 trained 4 epochs on 8x8 digits (about 95%), a fresh copy per test."""
    return _trained("resnet20_digits", lambda: build_model("resnet20", digits_data.input_shape, 10), digits_data,
                    TrainConfig(epochs=4, lr=0.05, batch_size=64, augment=False))


@pytest.fixture
def trained_vit_digits(digits_data):
    """The small timm ViT (4 blocks, 4 heads, dim 64) trained 6 epochs on 8x8 digits."""
    return _trained("vit_digits", lambda: build_model("vit", digits_data.input_shape, 10), digits_data,
                    TrainConfig(epochs=6, lr=2e-3, optimizer="adamw", weight_decay=0.05, batch_size=64,
                                augment=False))


@pytest.fixture
def trained_cnn1d_mnist1d(mnist1d_data):
    """The 1-D CNN trained 4 epochs on MNIST-1D."""
    return _trained("cnn1d", lambda: build_model("cnn1d", mnist1d_data.input_shape, 10), mnist1d_data,
                    TrainConfig(epochs=4, lr=0.05, augment=False))
