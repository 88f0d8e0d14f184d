"""High-level one-call functions that tie the flow's steps together (used by the CLI too)."""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from flowprune.config import RecordResult
from flowprune.data import DataSplits, make_loader
from flowprune.io import save
from flowprune.measure import accuracy, count_macs_params, speed_report
from flowprune.models import build_model
from flowprune.report import write_results
from flowprune.train import TrainConfig, fit


def train_model(model: str | nn.Module, data: DataSplits, config: TrainConfig | dict | None = None, *,
                out_dir: str | os.PathLike | None = None, resume: bool = True, measure_speed: bool = True,
                progress: bool | None = None, model_kwargs: dict | None = None,
                device: str | torch.device | None = None, amp: str | None = None, **overrides) -> RecordResult:
    """Build (or take) a model, train it on ``data``, measure it, and save it to ``out_dir``.

    Called like every procedure: ``train_model(model, data, config=None, **overrides)`` with a
    :class:`~flowprune.train.TrainConfig` (or a dict of its fields) and/or its fields as keywords
    (``train_model("resnet20", data, epochs=15, lr=0.05)``).

    Returns a :class:`~flowprune.config.RecordResult`: ``.model`` is the trained model and
    ``.record`` (also written to ``out_dir/results.json``) holds ``accuracy`` (test),
    ``val_accuracy``, ``macs``, ``params``, ``epochs``, ``seed``, timings, and the history; it reads
    like the dict earlier versions returned (``res["accuracy"]``, ``res["model"]``).

    ``device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (default: a given model's device; for
    a model name, CUDA when available); ``amp``: ``none``, ``bf16`` or ``fp16`` (see :func:`fit`).
    Under torchrun only rank 0 writes ``out_dir``.
    """
    from flowprune import distributed
    from flowprune.device import resolve_device

    cfg = TrainConfig.resolve(config, overrides)
    dev = resolve_device(device, None if isinstance(model, str) else model)
    if isinstance(model, str):
        torch.manual_seed(cfg.seed)
        net = build_model(model, data.input_shape, data.num_classes, **(model_kwargs or {}))
        name = model
    else:
        net, name = model, getattr(model, "flowprune_base", {}).get("name", type(model).__name__)
    t0 = time.perf_counter()
    history = fit(net, data, cfg, checkpoint_dir=out_dir, resume=resume, progress=progress, device=dev, amp=amp)
    train_seconds = time.perf_counter() - t0
    test = make_loader(data.test, 512)
    macs, params = count_macs_params(net, data.input_shape)
    res = {"model_name": name, "data": data.name, "accuracy": accuracy(net, test),
           "val_accuracy": accuracy(net, make_loader(data.val, 512)) if len(data.val) else None,
           "macs": macs, "params": params, "epochs": cfg.epochs, "seed": cfg.seed,
           "train_seconds": train_seconds, "config": asdict(cfg), "splits": data.sizes(),
           "history": history["epochs"]}
    if measure_speed:
        res.update(speed_report(net, data.input_shape))
    if out_dir is not None and distributed.is_main():
        save(net, out_dir, metadata={"stage": "dense", "data": data.name, "accuracy": res["accuracy"],
                                     "seed": cfg.seed})
        write_results(Path(out_dir) / "results.json", res)
    return RecordResult(model=net, record=res)
