"""Fashion-MNIST from the IDX files of Debian's ``dataset-fashion-mnist`` package.

Fashion-MNIST (Xiao, Rasul and Vollgraf 2017, MIT licence): 70,000 real 28x28 grey images of
clothing in 10 classes, 7,000 per class (60,000 in the official training file, 10,000 in the
official test file). Debian ships the four original gzip-compressed IDX files under
``/usr/share/datasets/fashion-mnist/``; ``load_dataset("fashion", root=DIR)`` reads them from any
other directory holding the same four files (compressed or not), such as the fixed 500-image subset
the test suite keeps in ``tests/data/fashion-mnist-mini/``.

The IDX reader is written here (about 30 lines of numpy) because torchvision, which has one, is an
optional dependency of flowprune and reads only uncompressed files.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from flowprune.errors import FlowpruneError

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = f"sudo apt-get update && sudo apt-get install -y {DEBIAN_PACKAGE}"
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
# the standard statistics of the 60,000 official training images (pixel values in [0, 1])
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
_UBYTE = 0x08


def find_files(root: str | Path | None = None) -> dict[str, Path]:
    """The paths of the four IDX files in ``root`` (default: Debian's directory).

    Each file may be gzip-compressed (``NAME.gz``, as Debian ships them) or not (``NAME``).

    Raises:
        FlowpruneError: a file is missing; the message names the Debian package and how to install it.
    """
    base = Path(root) if root is not None else Path(DEFAULT_ROOT)
    found, missing = {}, []
    for key, name in FILES.items():
        for cand in (base / f"{name}.gz", base / name):
            if cand.is_file():
                found[key] = cand
                break
        else:
            missing.append(f"{name}.gz")
    if missing:
        raise FlowpruneError(
            f"data set 'fashion' needs the Fashion-MNIST IDX files {', '.join(missing)} in {str(base)!r}. "
            f"They come with Debian's package {DEBIAN_PACKAGE!r}: install it with `{INSTALL_HINT}` "
            "(`make test` and `make bench` do this where they can), or point root=DIR (CLI --data-root DIR) "
            "at a directory that holds them")
    return found


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's format) as a numpy ``uint8`` array of its shape.

    Raises:
        FlowpruneError: the file is not an IDX file of unsigned bytes, or its size disagrees with its header.
    """
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as e:
        raise FlowpruneError(f"cannot read IDX file {str(p)!r}: {e}; reinstall {DEBIAN_PACKAGE!r}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _UBYTE or not 1 <= data[3] <= 4:
        raise FlowpruneError(f"{str(p)!r} is not an IDX file of unsigned bytes (magic {data[:4].hex()!r}, "
                             f"expected 0000080N); reinstall {DEBIAN_PACKAGE!r}")
    nd = data[3]
    header = 4 + 4 * nd
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(nd))
    if len(data) != header + int(np.prod(shape)):
        raise FlowpruneError(f"IDX file {str(p)!r} holds {len(data) - header} bytes of data but its header "
                             f"says shape {shape}; the file is truncated or corrupt, reinstall {DEBIAN_PACKAGE!r}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_raw(root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """All images ``(N, 28, 28)`` uint8 and labels ``(N,)`` int64, official training file first.

    Returns ``(images, labels, n_official_train)``: the first ``n_official_train`` rows come from the
    official training file, the rest from the official test file.
    """
    files = find_files(root)
    parts = []
    for split in ("train", "test"):
        x, y = read_idx(files[f"{split}_images"]), read_idx(files[f"{split}_labels"])
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.ndim != 1 or len(x) != len(y):
            raise FlowpruneError(f"Fashion-MNIST {split} files disagree: images {x.shape}, labels {y.shape} "
                                 "(expected (N, 28, 28) and (N,))")
        if len(y) and int(y.max()) >= len(CLASSES):
            raise FlowpruneError(f"Fashion-MNIST {split} labels go up to {int(y.max())}; expected 0..9")
        parts.append((x, y.astype(np.int64)))
    n_train = len(parts[0][1])
    return np.concatenate([parts[0][0], parts[1][0]]), np.concatenate([parts[0][1], parts[1][1]]), n_train


def fashion_arrays(root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Normalised images ``(N, 1, 28, 28)`` float32, labels, and an info dict, for ``load_dataset``.

    The official training and test files are pooled (as ``mnist1d`` pools its own); ``load_dataset``
    then splits the pool train/val/test, stratified, from its seed.
    """
    raw, y, n_train = read_raw(root)
    x = raw.reshape(-1, 1, 28, 28).astype(np.float32)
    x *= np.float32(1.0 / 255.0)
    x -= np.float32(FASHION_MEAN)
    x /= np.float32(FASHION_STD)
    files = find_files(root)
    info = {"source": str(files["train_images"].parent), "package": DEBIAN_PACKAGE,
            "licence": "Fashion-MNIST (Xiao, Rasul, Vollgraf 2017), MIT", "classes": list(CLASSES),
            "mean": FASHION_MEAN, "std": FASHION_STD, "official_train": n_train, "official_test": len(y) - n_train}
    return x, y, info
