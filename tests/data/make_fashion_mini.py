"""Make tests/data/fashion-mnist-mini/: a fixed 500-image Fashion-MNIST subset for the test suite.

    python tests/data/make_fashion_mini.py [SOURCE_DIR]   # default: Debian's /usr/share/datasets/fashion-mnist

Per class, 40 images of the official training file and 10 of the official test file, drawn from
seed 0 and kept in file order; written as the same four gzip-compressed IDX files Debian ships
(gzip mtime 0, so the bytes are reproducible), so ``load_dataset("fashion", root=DIR)`` reads the
subset through the very code that reads the full set. The tests compare the subset with what this
script makes from the Debian files wherever they are installed.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "fashion-mnist-mini"
PER_CLASS = {"train": 40, "t10k": 10}
SEED = 0


def select(labels: np.ndarray, per_class: int, seed: int = SEED) -> np.ndarray:
    """Sorted indices of ``per_class`` samples of every class, drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)]
    return np.sort(np.concatenate(picks))


def idx_bytes(arr: np.ndarray) -> bytes:
    """An unsigned-byte IDX file: magic 0x0000080N, the big-endian dims, the data."""
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def make(source: str | Path | None = None) -> dict[str, bytes]:
    """The four files of the subset, name -> uncompressed IDX bytes, made from ``source``."""
    from flowprune.fashion import FILES, find_files, read_idx

    files = find_files(source)
    out = {}
    for split, n in PER_CLASS.items():
        key = "train" if split == "train" else "test"
        x, y = read_idx(files[f"{key}_images"]), read_idx(files[f"{key}_labels"])
        keep = select(y, n)
        out[FILES[f"{key}_images"]] = idx_bytes(x[keep])
        out[FILES[f"{key}_labels"]] = idx_bytes(y[keep])
    return out


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, data in make(sys.argv[1] if len(sys.argv) > 1 else None).items():
        with open(OUT / f"{name}.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0,
                                                                    compresslevel=9, filename="") as gz:
            gz.write(data)
    print(f"wrote {OUT}: {sum(p.stat().st_size for p in OUT.iterdir())} bytes")


if __name__ == "__main__":
    main()
