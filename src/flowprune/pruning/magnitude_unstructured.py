"""Unstructured magnitude baselines for Hyperflows, on the same budget.

* :func:`one_shot_magnitude`: global magnitude pruning (the ``k`` largest ``|w|`` over all masked
  layers survive) once, then fine-tuning for ``epochs`` with the mask fixed.
* :func:`gradual_magnitude`: Zhu & Gupta (2017) gradual pruning. Sparsity follows the cubic
  schedule ``s(t) = s_f + (s_i - s_f) * (1 - t / n)^3`` for ``t = 1..n`` pruning steps, one per
  epoch at the end of epochs ``1..n`` with ``n = ceil(prune_fraction * epochs)`` (default 0.75,
  the rest is fine-tuning), global magnitude ranking at every step. ``s_i = 0``.

Both use :class:`~flowprune.pruning.masks.FixedMask` parametrizations (so the pruned entries
stay zero under SGD) and :func:`flowprune.train.fit` (checkpoint per epoch, resume); the same
layer selection as Hyperflows (all Conv/Linear incl. the classifier by default). Both return a
dict with ``model`` (baked), ``sparsity``, ``accuracy`` (test) and the history.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import asdict

import torch
from torch import nn

from flowprune.data import DataSplits, make_loader
from flowprune.errors import FlowpruneError, check_fraction, check_positive_int
from flowprune.measure import accuracy
from flowprune.pruning.masks import (
    install_masks,
    masked_modules,
    original_weight,
    select_layers,
    sparsity_report,
)
from flowprune.train import TrainConfig, fit


@torch.no_grad()
def global_magnitude_masks(model: nn.Module, sparsity: float) -> None:
    """Set every FixedMask of ``model`` **in place** so the globally largest ``|w|`` survive."""
    mods = dict(model.named_modules())
    masks = masked_modules(model)
    ws = {n: original_weight(mods[n]).detach().abs() * 1.0 for n in masks}
    flat = torch.cat([w.reshape(-1) for w in ws.values()])
    keep = int(round((1 - sparsity) * flat.numel()))
    if keep <= 0:
        thr = float("inf")
    elif keep >= flat.numel():
        thr = -1.0
    else:
        thr = float(torch.topk(flat, keep).values[-1])
    for n, p in masks.items():
        p.mask.copy_((ws[n] >= thr).float())


def _check(sparsity: float, epochs: int) -> None:
    check_fraction("target sparsity", sparsity, low_open=True, high_open=True)
    check_positive_int("epochs", epochs)


def _result(net: nn.Module, data: DataSplits, history: dict, method: str) -> dict:
    from flowprune.sparse import bake

    rep = sparsity_report(net)
    baked = bake(net)
    return {"method": method, "sparsity": rep["sparsity"], "remaining": rep["remaining"],
            "layers": {k: v["sparsity"] for k, v in rep["layers"].items()},
            "accuracy": accuracy(net, make_loader(data.test, 512)) if len(data.test) else None,
            "history": history["epochs"], "model": baked, "masked_model": net}


def one_shot_magnitude(model: nn.Module, data: DataSplits, sparsity: float, epochs: int,
                       config: TrainConfig | None = None, *, layers: Iterable[str] | None = None,
                       include_classifier: bool = True, checkpoint_dir: str | os.PathLike | None = None,
                       progress: bool | None = None, max_batches_per_epoch: int | None = None) -> dict:
    """Global magnitude pruning of a copy of ``model`` to ``sparsity`` then ``epochs`` of fine-tuning."""
    _check(sparsity, epochs)
    select_layers(model, layers, include_classifier=include_classifier)
    net = install_masks(model, layers, kind="fixed", include_classifier=include_classifier)
    global_magnitude_masks(net, sparsity)
    cfg = TrainConfig(**{**asdict(config or TrainConfig(lr=0.02, label_smoothing=0.1)), "epochs": epochs})
    hist = fit(net, data, cfg, checkpoint_dir=checkpoint_dir, progress=progress,
               max_batches_per_epoch=max_batches_per_epoch)
    return _result(net, data, hist, "one_shot_magnitude")


def cubic_sparsity(step: int, n_steps: int, final: float, initial: float = 0.0) -> float:
    """Zhu & Gupta's ``s_f + (s_i - s_f) * (1 - step / n_steps)^3`` (``step`` clipped to ``[0, n]``)."""
    t = min(max(step, 0), n_steps) / n_steps
    return final + (initial - final) * (1 - t) ** 3


def gradual_magnitude(model: nn.Module, data: DataSplits, sparsity: float, epochs: int,
                      config: TrainConfig | None = None, *, prune_fraction: float = 0.75,
                      layers: Iterable[str] | None = None, include_classifier: bool = True,
                      checkpoint_dir: str | os.PathLike | None = None, progress: bool | None = None,
                      max_batches_per_epoch: int | None = None) -> dict:
    """Gradual magnitude pruning (cubic schedule) of a copy of ``model`` over ``epochs`` epochs."""
    _check(sparsity, epochs)
    check_fraction("prune_fraction", prune_fraction, low_open=True, high_open=False)
    select_layers(model, layers, include_classifier=include_classifier)
    net = install_masks(model, layers, kind="fixed", include_classifier=include_classifier)
    n = max(1, math.ceil(prune_fraction * epochs))
    if epochs == 1:
        global_magnitude_masks(net, sparsity)  # no room for a schedule: prune first, then train
    schedule = []

    def on_epoch_end(epoch: int, m: nn.Module, history: dict) -> bool:
        if epoch <= n and epochs > 1:
            s = cubic_sparsity(epoch, n, sparsity)
            global_magnitude_masks(m, s)
            schedule.append({"epoch": epoch, "sparsity": s})
        return False

    cfg = TrainConfig(**{**asdict(config or TrainConfig(lr=0.02, label_smoothing=0.1)), "epochs": epochs})
    hist = fit(net, data, cfg, checkpoint_dir=checkpoint_dir, progress=progress, on_epoch_end=on_epoch_end,
               max_batches_per_epoch=max_batches_per_epoch)
    if abs(sparsity_report(net)["sparsity"] - sparsity) > 1e-3:
        raise FlowpruneError("internal: gradual magnitude did not reach its target")  # pragma: no cover
    res = _result(net, data, hist, "gradual_magnitude")
    res["schedule"] = schedule
    return res
