"""Training, fine-tuning and BatchNorm re-estimation (the "recover" step of the flow).

:func:`fit` trains a model **in place** (it says so: training is what it is for), with SGD or
AdamW, a cosine schedule, label smoothing, augmentation, a seed, a progress bar and a checkpoint
at the end of every epoch. Given the same ``checkpoint_dir`` again it resumes from the last
finished epoch and ends with exactly the weights an uninterrupted run would have had: the batch
order and augmentation of epoch ``e`` depend only on ``(seed, e)``, and the global RNG is re-seeded
from ``(seed, e)`` at the start of each epoch (dropout).

Devices and precision: ``device=`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``; default the
model's device, see :func:`flowprune.device.resolve_device`) and ``amp=`` (``none``, ``bf16``,
``fp16``): the forward and loss run under ``torch.autocast``; ``fp16`` (CUDA only) scales the loss
with ``torch.amp.GradScaler``. Weights and optimizer state stay float32.

Under ``torchrun`` (:mod:`flowprune.distributed`) the model is trained through
``DistributedDataParallel``: every rank walks the same global batches and takes its contiguous
slice of each, and the loss is scaled so that the averaged gradient is that of the global batch's
mean loss; a step equals the single-process step on the same global batch (BatchNorm statistics
are per rank, as in any DDP run; the final weights and buffers are rank 0's on every rank). Only
rank 0 writes the checkpoint.
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

from flowprune import distributed
from flowprune.backend import safe_conv_backward
from flowprune.config import ProcedureConfig
from flowprune.data import DataSplits, TensorBatchLoader, make_loader
from flowprune.device import autocast, check_amp, default_amp, resolve_device
from flowprune.errors import FlowpruneError, bad_choice, check_fraction, check_positive_int
from flowprune.measure import accuracy
from flowprune.runstate import atomic_torch_save

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")


@dataclass
class TrainConfig(ProcedureConfig):
    """Everything that decides a training run, JSON-safe (``TrainConfig.resolve(config, overrides)``)."""

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
    warmup_epochs: float = 0.0

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
        w = self.warmup_epochs
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and 0 <= w <= self.epochs):
            raise FlowpruneError(f"warmup_epochs must be a number in [0, epochs={self.epochs}], got {w!r}")
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


ExtraLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
EpochCallback = Callable[[int, nn.Module, dict], bool | None]


def fit(model: nn.Module, data: DataSplits | TensorBatchLoader, config: TrainConfig | None = None, *,
        checkpoint_dir: str | os.PathLike | None = None, resume: bool = True, progress: bool | None = None,
        val_data: Iterable | None = None, extra_loss: ExtraLoss | None = None,
        on_epoch_end: EpochCallback | None = None, device: str | torch.device | None = None,
        max_batches_per_epoch: int | None = None, amp: str | None = None, **overrides) -> dict:
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
        device: where to train (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``; default: the
            model's device); the model is moved there (in place, like the training itself).
        amp: mixed precision, ``none`` (default; inside :func:`flowprune.device.use`, its ``amp``),
            ``bf16`` (CUDA or CPU) or ``fp16`` (CUDA).

    Returns:
        ``{"config": ..., "epochs": [{"epoch", "loss", "val_accuracy", "lr"}...], "stopped_early": bool}``
    """
    cfg = TrainConfig(**{**asdict(config or TrainConfig()), **overrides}).validate()
    if max_batches_per_epoch is not None:
        check_positive_int("max_batches_per_epoch", max_batches_per_epoch)
    dev = resolve_device(device, model)
    amp = check_amp(default_amp() if amp is None else amp, dev)
    world = distributed.world_size()
    if world > 1 and cfg.batch_size < world:
        raise FlowpruneError(f"batch_size {cfg.batch_size} cannot be split over {world} processes; use a batch size "
                             f">= {world} or start fewer processes")
    model.to(dev)
    loader, val_data = _train_loaders(data, cfg, val_data)
    steps_per_epoch = len(loader) if max_batches_per_epoch is None else min(len(loader), max_batches_per_epoch)
    if steps_per_epoch == 0:
        raise FlowpruneError("the training data is empty; nothing to train on")
    opt = make_optimizer(model.parameters(), cfg)
    sched = _make_scheduler(opt, cfg, cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch))
    history: dict = {"config": asdict(cfg), "epochs": [], "stopped_early": False}
    start_epoch = 0
    ckpt_path = Path(checkpoint_dir) / "checkpoint.pt" if checkpoint_dir is not None else None
    if ckpt_path is not None:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        if resume and ckpt_path.exists():
            start_epoch, history = _load_checkpoint(ckpt_path, model, opt, sched, cfg, dev)
    show = sys.stderr.isatty() if progress is None else progress
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    scaler = _make_scaler(amp, ckpt_path if start_epoch > 0 else None)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # rank 0's weights on every rank (DDP broadcasts them), gradients averaged every step
        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    show = show and distributed.is_main()
    try:
        with safe_conv_backward(model):
            _run_epochs(model, loader, cfg, opt, sched, history, start_epoch, steps_per_epoch, dev, show, tqdm,
                        val_data, extra_loss, on_epoch_end, ckpt_path, net=net, amp=amp, scaler=scaler)
    finally:
        del net
    if world > 1:
        distributed.broadcast_module(model)  # buffers (BN statistics) too: one model on every rank
    model.eval()
    return history


def _train_loaders(data: DataSplits | TensorBatchLoader, cfg: TrainConfig,
                   val_data: Iterable | None) -> tuple[Iterable, Iterable | None]:
    """The training loader (shuffled and augmented per ``cfg`` for a :class:`DataSplits`, else
    ``data`` itself) and the validation batches (default: ``data.val`` when it is not empty)."""
    if isinstance(data, DataSplits):
        loader = make_loader(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed, augment=cfg.augment,
                             drop_last=len(data.train) > cfg.batch_size)
        if val_data is None and len(data.val) > 0:
            val_data = make_loader(data.val, 512)
    else:
        loader = data
    return loader, val_data


def lr_factor(step: int, total: int, warmup: int = 0, schedule: str = "cosine") -> float:
    """The learning-rate multiplier at optimizer step ``step`` of ``total``.

    A linear warm-up over the first ``warmup`` steps (``(step + 1) / warmup``: the first step is
    not at lr 0), then cosine decay to 0 over the remaining ``total - warmup`` steps (or constant).
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule != "cosine":
        return 1.0
    span = max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup, span) / span))


def _make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total: int, warmup: int = 0):
    """Per-step learning-rate schedule over ``total`` steps: linear warm-up over ``warmup`` steps, then
    cosine to 0 (or constant); see :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, cfg.schedule))


def _load_checkpoint(ckpt_path: Path, model: nn.Module, opt, sched, cfg: TrainConfig, dev) -> tuple[int, dict]:
    """Restore model, optimizer and scheduler from ``ckpt_path`` (written with the same ``cfg``, else
    FlowpruneError); returns ``(finished epochs, history)``."""
    # weights_only=True: the unpickler only builds tensors and plain containers, no code.
    state = torch.load(ckpt_path, map_location=dev, weights_only=True)
    if state.get("config") != asdict(cfg):
        raise FlowpruneError(f"checkpoint {ckpt_path} was written with another training config; "
                             "use a fresh --out directory or pass resume=False")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return int(state["epoch"]), state["history"]


def _make_scaler(amp: str, ckpt_path: Path | None):
    """fp16's ``GradScaler`` (None for other precisions); with ``ckpt_path`` (a resumed run), the
    scaler state saved in that checkpoint."""
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    if scaler is not None and ckpt_path is not None:
        sstate = torch.load(ckpt_path, map_location="cpu", weights_only=True).get("scaler")
        if sstate:
            scaler.load_state_dict(sstate)
    return scaler


def _run_epochs(model, loader, cfg, opt, sched, history, start_epoch, steps_per_epoch, dev, show, tqdm,
                val_data, extra_loss, on_epoch_end, ckpt_path, *, net=None, amp: str = "none",
                scaler=None) -> None:
    net = model if net is None else net
    world = distributed.world_size()
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
            n_global = len(y)
            if world > 1:
                if n_global < world:  # a last partial batch too small to give every rank a sample
                    continue
                sl = distributed.batch_slice(n_global)
                x, y = x[sl], y[sl]
            x, y = x.to(dev), y.to(dev)
            with autocast(dev, amp):
                logits = net(x)
                if world > 1:  # sum over my slice / global count, times world: DDP's mean gives the global mean
                    loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing,
                                           reduction="sum") * (world / n_global)
                else:
                    loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                if extra_loss is not None:
                    extra = extra_loss(model, x, y, logits)
                    if world > 1:  # a mean over my slice -> my share of the global mean, as for the CE above
                        extra = extra * (len(y) * world / n_global)
                    loss = loss + extra
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"loss became {float(loss)} at epoch {epoch + 1}, step {step + 1}; "
                                         f"lower the learning rate (lr={cfg.lr}). The last good checkpoint is kept.")
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            sched.step()
            running += loss.item() * (n_global / world if world > 1 else len(y))
            n_seen += len(y)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running / n_seen:.3f}")
        if bar is not None:
            bar.close()
        if world > 1:
            tot = distributed.all_reduce_sum(torch.tensor([running, n_seen], dtype=torch.float64))
            running, n_seen = float(tot[0]), int(tot[1])
        rec = {"epoch": epoch + 1, "loss": running / max(n_seen, 1), "lr": opt.param_groups[0]["lr"],
               "samples": n_seen}
        if val_data is not None:
            rec["val_accuracy"] = accuracy(model, val_data)
        history["epochs"].append(rec)
        stop = bool(on_epoch_end(epoch + 1, model, history)) if on_epoch_end is not None else False
        stop = distributed.broadcast_object(stop)  # rank 0 decides: every rank stops together
        if ckpt_path is not None and distributed.is_main():
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "epoch": epoch + 1, "history": history,
                     "config": asdict(cfg)}
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            atomic_torch_save(state, ckpt_path)
        if stop:
            history["stopped_early"] = True
            break


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on ``batches``, **in place**; no weight changes.

    Running statistics are reset and replaced by the exact average over the batches
    (``momentum=None``). A BatchNorm that sees one value per channel (a single image through a
    1x1 pooling branch, e.g. DeepLabV3's ASPP) cannot estimate a variance: for such a call it runs
    on the statistics it has (its old ones until it sees a larger input), so one-image calibration
    works. If a forward fails, every statistic is restored and a FlowpruneError says so.
    Returns the model, in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model.eval()
    batches = list(batches)
    if not batches:
        raise FlowpruneError("reestimate_bn needs at least one batch")
    saved = {m: (m.momentum, {k: b.clone() for k, b in m.named_buffers()}) for m in bns}
    fresh: set = set()

    def pre(m, args):  # reset a BatchNorm's statistics at its first input with more than one value per channel
        x = args[0]
        if x.numel() > x.shape[1]:
            if m not in fresh:
                m.reset_running_stats()
                m.momentum = None
                fresh.add(m)
            m.train()
        else:
            m.eval()

    handles = [m.register_forward_pre_hook(pre) for m in bns]
    dev = next(model.parameters()).device
    model.train()
    try:
        for x, _ in batches:
            model(x.to(dev))
    except Exception as e:
        for m, (_mom, bufs) in saved.items():
            for k, b in m.named_buffers():
                b.copy_(bufs[k])
        raise FlowpruneError(f"BatchNorm re-estimation failed in a train-mode forward ({type(e).__name__}: "
                             f"{str(e)[:200]}); the statistics are restored. Pass reestimate_bn=False (prune) or "
                             "calibration batches this model accepts in train mode") from None
    finally:
        for h in handles:
            h.remove()
        for m, (mom, _bufs) in saved.items():
            m.momentum = mom
    return model.eval()
