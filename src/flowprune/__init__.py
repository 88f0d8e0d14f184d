"""flowprune: make trained PyTorch networks smaller and faster without losing what they learned.

The data flows one way: calibrate -> plan -> cut -> recover -> measure -> save -> route -> report.
"""

from __future__ import annotations

__version__ = "0.1.0"

from flowprune import export  # noqa: E402  (a callable module: fp.export(model, path), fp.export.OnnxCascade)
from flowprune.api import train_model  # noqa: E402
from flowprune.data import DataSplits, load_dataset, make_loader  # noqa: E402
from flowprune.errors import FlowpruneError  # noqa: E402
from flowprune.io import load, save  # noqa: E402
from flowprune.measure import accuracy, count_macs_params, latency, throughput  # noqa: E402
from flowprune.models import build_model, list_models  # noqa: E402
from flowprune.pruning.structural import prune  # noqa: E402
from flowprune.route.api import route_experts  # noqa: E402
from flowprune.route.io import load_cascade  # noqa: E402
from flowprune.train import TrainConfig, fit  # noqa: E402

__all__ = [
    "__version__",
    "DataSplits",
    "FlowpruneError",
    "accuracy",
    "build_model",
    "export",
    "count_macs_params",
    "fit",
    "TrainConfig",
    "train_model",
    "route_experts",
    "load_cascade",
    "latency",
    "list_models",
    "load",
    "load_dataset",
    "make_loader",
    "prune",
    "save",
    "throughput",
]
