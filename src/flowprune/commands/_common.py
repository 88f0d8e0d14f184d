"""Arguments and steps that several CLI commands share."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from flowprune.data import DataSplits, available_datasets, load_dataset
from flowprune.errors import FlowpruneError, check_positive_int
from flowprune.train import TrainConfig


def add_data_arguments(p: argparse.ArgumentParser, default: str = "mnist5k") -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=default,
                   help=f"data set: {', '.join(available_datasets())} (default {default})")
    g.add_argument("--seed", type=int, default=0, help="seed for the split, the init and the batch order")
    g.add_argument("--val-fraction", type=float, default=0.1, help="share of every class held out for validation")
    g.add_argument("--test-fraction", type=float, default=0.2, help="share of every class held out for test")
    g.add_argument("--data-root", default=None, help="where tv:NAME data sets live")


def add_train_arguments(p: argparse.ArgumentParser, *, epochs: int = 15, lr: float = 0.05) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--optimizer", default="sgd", help="sgd or adamw")
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--no-augment", action="store_true", help="turn off random translation of training inputs")


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, lr=args.lr, optimizer=args.optimizer, weight_decay=args.weight_decay,
                       batch_size=args.batch_size, label_smoothing=args.label_smoothing,
                       augment=not args.no_augment, seed=args.seed).validate()


def load_data(args: argparse.Namespace) -> DataSplits:
    return load_dataset(args.data, seed=args.seed, val_fraction=args.val_fraction,
                        test_fraction=args.test_fraction, root=args.data_root)


def check_out_dir(out: str) -> Path:
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise FlowpruneError(f"--out {out!r} exists and is not a directory; pick a directory path")
    p.mkdir(parents=True, exist_ok=True)
    return p


def load_model_arg(path: str, what: str = "--checkpoint"):
    """Load a saved model given on the command line, with an error that names the option."""
    from flowprune.io import load

    if not Path(path).exists():
        raise FlowpruneError(f"{what} {path!r} does not exist; pass a directory written by `flowprune train --out DIR`")
    return load(path)


def check_data_fits_model(model, data: DataSplits, what: str = "model") -> None:
    base = getattr(model, "flowprune_base", {}) or {}
    shape = tuple(base.get("input_shape", ()))
    if shape and tuple(shape) != tuple(data.input_shape):
        raise FlowpruneError(f"{what} takes inputs of shape {shape} but data set {data.name!r} has {data.input_shape}; "
                             "use the data set the model was trained on")
    nc = base.get("num_classes")
    if nc is not None and nc < data.num_classes:
        raise FlowpruneError(f"{what} has {nc} classes but data set {data.name!r} has {data.num_classes} labels")


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def positive(name: str, value: int) -> int:
    return check_positive_int(name, value)
