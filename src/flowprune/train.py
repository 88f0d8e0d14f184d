"""Training, fine-tuning and BatchNorm re-estimation (the "recover" step of the flow).

:func:`fit` trains a model **in place** (it says so: training is what it is for), with SGD or
AdamW, a cosine schedule, label smoothing, augmentation, a seed, a progress bar and a checkpoint
at the end of every epoch. Given the same ``checkpoint_dir`` again it resumes from the last
finished epoch and ends with exactly the weights an uninterrupted run would have had: the batch
order and augmentation of epoch ``e`` depend only on ``(seed, e)``, and the global RNG is re-seeded
from ``(seed, e)`` at the start of each epoch (dropout).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flowprune.backend import safe_conv_backward
from flowprune.data import DataSplits, TensorBatchLoader, make_loader
from flowprune.errors import FlowpruneError, bad_choice, check_fraction, check_positive_int
from flowprune.measure import accuracy

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")


@dataclass
class TrainConfig:
    """Everything that decides a training run, JSON-safe."""

    epochs: int = 10
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    batch_size: int = 128
    augment: bool = True
    schedule: str = "cosine"
    seed: int = 0

    def validate(self) -> TrainConfig:
        check_positive_int("epochs", self.epochs)
        check_positive_int("batch_size", self.batch_size)
        if isinstance(self.lr, bool) or not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise FlowpruneError(f"lr must be a positive number, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise bad_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.schedule not in SCHEDULES:
            raise bad_choice("schedule", self.schedule, SCHEDULES)
        check_fraction("label_smoothing", self.label_smoothing)
        for name in ("weight_decay", "momentum"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
                raise FlowpruneError(f"{name} must be a finite number >= 0, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**31:
            raise FlowpruneError(f"seed must be an integer in [0, 2147483647], got {self.seed!r}")
        return self


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


ExtraLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
EpochCallback = Callable[[int, nn.Module, dict], bool | None]


def fit(model: nn.Module, data: DataSplits | TensorBatchLoader, config: TrainConfig | None = None, *,
        checkpoint_dir: str | os.PathLike | None = None, resume: bool = True, progress: bool | None = None,
        val_data: Iterable | None = None, extra_loss: ExtraLoss | None = None,
        on_epoch_end: EpochCallback | None = None, device: str | torch.device | None = None,
        max_batches_per_epoch: int | None = None, **overrides) -> dict:
    """Train ``model`` in place and return the history.

    Args:
        model: trained in place.
        data: a :class:`DataSplits` (trains on ``train``, reports ``val`` accuracy) or a loader.
        config: a :class:`TrainConfig`; keyword ``overrides`` replace its fields (``epochs=3``).
        checkpoint_dir: where ``checkpoint.pt`` is written after every epoch; with ``resume``
            a run finds it there and continues from the last finished epoch.
        val_data: batches to report accuracy on after each epoch (default: ``data.val``).
        extra_loss: ``f(model, x, y, logits) -> scalar`` added to cross-entropy (distillation,
            penalties).
        on_epoch_end: ``f(epoch, model, history) -> stop?``; returning True ends training early.
        max_batches_per_epoch: cap on steps per epoch (short recoveries).

    Returns:
        ``{"config": ..., "epochs": [{"epoch", "loss", "val_accuracy", "lr"}...], "stopped_early": bool}``
    """
    cfg = TrainConfig(**{**asdict(config or TrainConfig()), **overrides}).validate()
    if max_batches_per_epoch is not None:
        check_positive_int("max_batches_per_epoch", max_batches_per_epoch)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    if isinstance(data, DataSplits):
        loader = make_loader(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed, augment=cfg.augment,
                             drop_last=len(data.train) > cfg.batch_size)
        if val_data is None and len(data.val) > 0:
            val_data = make_loader(data.val, 512)
    else:
        loader = data
    steps_per_epoch = len(loader) if max_batches_per_epoch is None else min(len(loader), max_batches_per_epoch)
    if steps_per_epoch == 0:
        raise FlowpruneError("the training data is empty; nothing to train on")
    opt = make_optimizer(model.parameters(), cfg)
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    history: dict = {"config": asdict(cfg), "epochs": [], "stopped_early": False}
    start_epoch = 0
    ckpt_path = Path(checkpoint_dir) / "checkpoint.pt" if checkpoint_dir is not None else None
    if ckpt_path is not None:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        if resume and ckpt_path.exists():
            # weights_only=True: the unpickler only builds tensors and plain containers, no code.
            state = torch.load(ckpt_path, map_location=dev, weights_only=True)
            if state.get("config") != asdict(cfg):
                raise FlowpruneError(f"checkpoint {ckpt_path} was written with another training config; "
                                     "use a fresh --out directory or pass resume=False")
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start_epoch = int(state["epoch"])
            history = state["history"]
    show = sys.stderr.isatty() if progress is None else progress
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    with safe_conv_backward(model):
        _run_epochs(model, loader, cfg, opt, sched, history, start_epoch, steps_per_epoch, dev, show, tqdm,
                    val_data, extra_loss, on_epoch_end, ckpt_path)
    model.eval()
    return history


def _run_epochs(model, loader, cfg, opt, sched, history, start_epoch, steps_per_epoch, dev, show, tqdm,
                val_data, extra_loss, on_epoch_end, ckpt_path) -> None:
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(cfg.seed * 1_000_003 + epoch)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        model.train()
        running, n_seen = 0.0, 0
        it = loader
        bar = None
        if show and tqdm is not None:
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, file=sys.stderr)
        for step, (x, y) in enumerate(it):
            if step >= steps_per_epoch:
                break
            x, y = x.to(dev), y.to(dev)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            if extra_loss is not None:
                loss = loss + extra_loss(model, x, y, logits)
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"loss became {float(loss)} at epoch {epoch + 1}, step {step + 1}; "
                                         f"lower the learning rate (lr={cfg.lr}). The last good checkpoint is kept.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item() * len(y)
            n_seen += len(y)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running / n_seen:.3f}")
        if bar is not None:
            bar.close()
        rec = {"epoch": epoch + 1, "loss": running / max(n_seen, 1), "lr": opt.param_groups[0]["lr"]}
        if val_data is not None:
            rec["val_accuracy"] = accuracy(model, val_data)
        history["epochs"].append(rec)
        stop = bool(on_epoch_end(epoch + 1, model, history)) if on_epoch_end is not None else False
        if ckpt_path is not None:
            _save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                          "scheduler": sched.state_dict(), "epoch": epoch + 1, "history": history,
                          "config": asdict(cfg)}, ckpt_path)
        if stop:
            history["stopped_early"] = True
            break


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on ``batches``, **in place**; no weight changes.

    Running statistics are reset and replaced by the exact average over the batches
    (``momentum=None``). Returns the model, in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model.eval()
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    dev = next(model.parameters()).device
    model.train()
    n = 0
    for x, _ in batches:
        model(x.to(dev))
        n += 1
    for m, mom in saved:
        m.momentum = mom
    if n == 0:
        raise FlowpruneError("reestimate_bn needs at least one batch")
    return model.eval()
