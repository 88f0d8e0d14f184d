"""Hyperflows: unstructured pruning by global pressure and regrowth (METHODS.md §4).

Every selected Conv/Linear weight gets a mask logit (:mod:`flowprune.pruning.masks`); the
forward uses ``w * 1[m >= 0]`` and the logits receive the straight-through flow
``s * w * dL/dw_eff``. Training minimises::

    CE(label smoothing 0.1) + gamma^1.5 * mean(m)        (mean over all N masked weights)

with SGD for the weights and Adam (no weight decay) for the logits. Two phases:

1. **Pruning** (``prune_epochs``): gamma is steered ``updates_per_epoch`` times per epoch by the
   :class:`~flowprune.pruning.pressure.PressureScheduler` so the remaining fraction follows the
   sigmoid trajectory to ``prune_aim * target_remaining`` (the pruning phase aims below the final
   target because regrowth adds weights back; ``prune_aim=0.9`` by default).
2. **Regrowth** (``regrow_epochs``): no pressure; the logit learning rate decays (cosine) from
   ``mask_lr`` to 0, so weights whose flow is consistently useful grow back.

Final exact correction (``final_correction="topk"``, the default): one global threshold is
subtracted from all logits so that exactly ``round(target_remaining * N)`` logits are >= 0 (the
weights closest to the threshold flip; nothing else changes), then BatchNorm statistics are
re-estimated on 10 training batches when the model has BN. The sparsity before the correction
and the number of flipped weights are reported, so the scheduler's own accuracy stays visible.

Choices the paper leaves open, as options with defaults (:class:`HyperflowsConfig`):

* ``mask_lr=None`` -> ``clip(5 / pruning_steps, 1e-3, 0.05)``. The authors use Adam lr 1e-3 for
  ~39k pruning steps (100 CIFAR epochs); our data sets give a few hundred steps, at which 1e-3
  cannot move a logit from its initial U[0.2, 0.5] across 0 for most of the run. The rate is
  scaled so a logit can travel ~5 units over the pruning phase (LeNet-300 on mnist5k, 10 epochs:
  0.0185; measured to follow the trajectory better than 0.01 or 0.05). ``mask_lr=1e-3`` gives
  the authors' value; long runs reach it through the lower clip.
* Scheduler: ``updates_per_epoch=4`` (the paper steps gamma once per epoch over 100 epochs; with
  ~10 epochs four updates per epoch keep the controller's time resolution; ``1`` gives the
  paper's rule), ``gain=0.5``, ``inertia=0.0``. Inertia (momentum on the log-gamma step) is an
  option; on 10-epoch LeNet runs ``inertia=0.3`` overshot the trajectory more (final sparsity
  before correction 0.9275/0.9624/0.9842 for targets 0.90/0.95/0.98, vs 0.9199/0.9564/0.9808
  without), because the logits already integrate the pressure.
* ``gamma0=None`` -> 1.0, or the value a fitted law predicts for the pruning target (``law=``).
* Weights: SGD (Nesterov, momentum 0.9, lr 0.02, weight decay 5e-4), cosine over both phases.

Checkpoint: ``checkpoint_dir/hyperflows.pt`` after every epoch (tensors and plain containers
only, loadable with ``torch.load(weights_only=True)``); the same call with the same directory
and config resumes. A NaN/inf loss raises ``FloatingPointError`` and leaves the last good
checkpoint in place.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flowprune.data import DataSplits, make_loader
from flowprune.errors import FlowpruneError, bad_choice, check_fraction, check_positive_int
from flowprune.measure import accuracy
from flowprune.pruning.masks import (
    install_masks,
    keep_masks,
    mask_logits,
    select_layers,
    set_global_topk,
    sparsity_report,
    weight_parameters,
)
from flowprune.pruning.pressure import ConstantPressure, PressureScheduler, fit_power_law, gamma_for_remaining

CORRECTIONS = ("topk", "none")
CHECKPOINT = "hyperflows.pt"


@dataclass
class HyperflowsConfig:
    """Everything that decides a Hyperflows run (JSON-safe). See the module docstring."""

    target_sparsity: float = 0.9
    prune_epochs: int = 10
    regrow_epochs: int = 5
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    mask_lr: float | None = None
    scale: float = 0.25
    init_low: float = 0.2
    init_high: float = 0.5
    pressure_exponent: float = 1.5
    label_smoothing: float = 0.1
    batch_size: int = 128
    augment: bool = True
    seed: int = 0
    gamma0: float | None = None
    inertia: float = 0.0
    gain: float = 0.5
    updates_per_epoch: int = 4
    prune_aim: float = 0.9
    final_correction: str = "topk"
    include_classifier: bool = True
    layers: list[str] | None = None
    constant_gamma: float | None = field(default=None)

    def validate(self) -> HyperflowsConfig:
        check_fraction("target_sparsity", self.target_sparsity, low_open=True, high_open=True)
        check_positive_int("prune_epochs", self.prune_epochs)
        if isinstance(self.regrow_epochs, bool) or not isinstance(self.regrow_epochs, int) or self.regrow_epochs < 0:
            raise FlowpruneError(f"regrow_epochs must be an integer >= 0, got {self.regrow_epochs!r}")
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("updates_per_epoch", self.updates_per_epoch)
        for name in ("lr", "scale", "pressure_exponent"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise FlowpruneError(f"{name} must be a positive number, got {v!r}")
        for name in ("mask_lr", "gamma0", "constant_gamma"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise FlowpruneError(f"{name} (a pressure or learning rate) must be a positive number, got {v!r}")
        check_fraction("prune_aim", self.prune_aim, low_open=True, high_open=False)
        check_fraction("label_smoothing", self.label_smoothing)
        if self.final_correction not in CORRECTIONS:
            raise bad_choice("final_correction", self.final_correction, CORRECTIONS)
        if not self.init_low <= self.init_high:
            raise FlowpruneError(f"init_low ({self.init_low}) must not exceed init_high ({self.init_high})")
        return self

    @property
    def target_remaining(self) -> float:
        return 1.0 - self.target_sparsity


def _mean_logit(logits: list[torch.Tensor], n: int) -> torch.Tensor:
    return sum(p.sum() for p in logits) / n


def _pressure(gamma: float, exponent: float) -> float:
    """``gamma ** exponent``, ``inf`` on overflow (the loss check then stops the run)."""
    try:
        return float(gamma) ** float(exponent)
    except OverflowError:
        return math.inf


def auto_mask_lr(pruning_steps: int) -> float:
    """``clip(5 / pruning_steps, 1e-3, 0.05)`` (see the module docstring)."""
    return float(min(0.05, max(1e-3, 5.0 / max(1, pruning_steps))))


def _save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def hyperflows_prune(model: nn.Module, data: DataSplits, config: HyperflowsConfig | None = None, *,
                     checkpoint_dir: str | os.PathLike | None = None, resume: bool = True,
                     progress: bool | None = None, law: dict | None = None,
                     max_batches_per_epoch: int | None = None, device: str | torch.device | None = None,
                     **overrides) -> dict:
    """Prune a copy of ``model`` with Hyperflows; the caller's model is not changed.

    ``device``: where the copy is trained (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``; default: the
    model's device, see :func:`flowprune.device.resolve_device`).

    Args:
        model: a trained model (Conv/Linear weights get masks).
        data: train split for training, val split for per-epoch accuracy, test for the result.
        config: a :class:`HyperflowsConfig`; keyword ``overrides`` replace its fields.
        checkpoint_dir: ``hyperflows.pt`` is written there every epoch; with ``resume`` a run resumes.
        law: a fit from :func:`fit_power_law` (or a sweep's results) to seed the initial gamma.
        max_batches_per_epoch: cap on steps per epoch (short runs, tests).

    Returns:
        dict with ``masked_model`` (parametrized), ``model`` (masks baked into weights, plain
        modules), ``accuracy`` (test), ``val_accuracy``, ``sparsity``/``remaining``/``layers``
        (weight sparsity over masked weights), ``epochs`` (per-epoch records: phase, gamma,
        remaining, expected, regrew, pruned, loss, val accuracy), ``gamma_trajectory``,
        ``remaining_per_epoch``, ``regrew_total`` (weights off after pruning and on at the end),
        ``correction`` and ``config``.
    """
    from flowprune.sparse import bake

    cfg = HyperflowsConfig(**{**asdict(config or HyperflowsConfig()), **overrides}).validate()
    if max_batches_per_epoch is not None:
        check_positive_int("max_batches_per_epoch", max_batches_per_epoch)
    select_layers(model, cfg.layers, include_classifier=cfg.include_classifier)  # raises before work
    if not isinstance(data, DataSplits):
        raise FlowpruneError("hyperflows_prune needs a DataSplits (flowprune.data.load_dataset(...))")
    if len(data.train) == 0:
        raise FlowpruneError("the training split is empty; nothing to train on")

    from flowprune.device import resolve_device

    dev = resolve_device(device, model)
    torch.manual_seed(cfg.seed)
    net = install_masks(model, cfg.layers, init=(cfg.init_low, cfg.init_high), scale=cfg.scale,
                        include_classifier=cfg.include_classifier, seed=cfg.seed).to(dev)
    logits = mask_logits(net)
    n_masked = sum(p.numel() for p in logits)
    loader = make_loader(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed, augment=cfg.augment,
                         drop_last=len(data.train) > cfg.batch_size)
    val = make_loader(data.val, 512) if len(data.val) else None
    steps = len(loader) if max_batches_per_epoch is None else min(len(loader), max_batches_per_epoch)
    total_epochs = cfg.prune_epochs + cfg.regrow_epochs
    total_steps = total_epochs * steps
    mask_lr = cfg.mask_lr if cfg.mask_lr is not None else auto_mask_lr(cfg.prune_epochs * steps)

    opt_w = torch.optim.SGD(weight_parameters(net), lr=cfg.lr, momentum=cfg.momentum,
                            weight_decay=cfg.weight_decay, nesterov=True)
    opt_m = torch.optim.Adam(logits, lr=mask_lr, weight_decay=0.0)

    prune_target = cfg.target_remaining * cfg.prune_aim
    gamma0 = cfg.gamma0
    if gamma0 is None:
        gamma0 = gamma_for_remaining(law, prune_target) if law is not None else 1.0
    if cfg.constant_gamma is not None:
        gamma0 = cfg.constant_gamma
    sched: PressureScheduler | ConstantPressure
    if cfg.constant_gamma is None:
        sched = PressureScheduler(prune_target, cfg.prune_epochs, gamma=float(gamma0), inertia=cfg.inertia,
                                  gain=cfg.gain, resolution=cfg.updates_per_epoch)
    else:
        sched = ConstantPressure(float(cfg.constant_gamma))

    history: list[dict] = []
    start_epoch = 0
    keep_after_prune: dict | None = None
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    if ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        if resume and ckpt.exists():
            state = torch.load(ckpt, map_location=dev, weights_only=True)
            if state.get("config") != asdict(cfg):
                raise FlowpruneError(f"checkpoint {ckpt} was written with another Hyperflows config; "
                                     "use a fresh directory or resume=False")
            net.load_state_dict(state["model"])
            opt_w.load_state_dict(state["opt_w"])
            opt_m.load_state_dict(state["opt_m"])
            sched.load_state_dict(state["scheduler"])
            start_epoch = int(state["epoch"])
            history = list(state["history"])
            keep_after_prune = state.get("keep_after_prune")

    show = sys.stderr.isatty() if progress is None else progress
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None

    t_start = time.perf_counter()
    for epoch in range(start_epoch, total_epochs):
        pruning = epoch < cfg.prune_epochs
        torch.manual_seed(cfg.seed * 1_000_003 + epoch)
        loader.set_epoch(epoch)
        net.train()
        before = keep_masks(net)
        run_loss, run_ce, n_seen = 0.0, 0.0, 0
        bar = tqdm(total=steps, desc=f"{'prune' if pruning else 'regrow'} {epoch + 1}/{total_epochs}",
                   leave=False, file=sys.stderr) if (show and tqdm is not None) else None
        upd_every = max(1, steps // cfg.updates_per_epoch) if cfg.constant_gamma is None else 0
        for step, (x, y) in enumerate(loader):
            if step >= steps:
                break
            g_step = epoch * steps + step
            for grp in opt_w.param_groups:
                grp["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * g_step / total_steps))
            if not pruning:
                r_step = (epoch - cfg.prune_epochs) * steps + step
                for grp in opt_m.param_groups:
                    grp["lr"] = mask_lr * 0.5 * (1 + math.cos(math.pi * r_step / (cfg.regrow_epochs * steps)))
            x, y = x.to(dev), y.to(dev)
            out = net(x)
            ce = F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
            loss = ce
            if pruning:
                loss = ce + _pressure(sched.gamma, cfg.pressure_exponent) * _mean_logit(logits, n_masked)
            if not torch.isfinite(loss.detach()):
                if bar is not None:
                    bar.close()
                raise FloatingPointError(
                    f"loss became {float(loss.detach())} at epoch {epoch + 1}, step {step + 1} (gamma={sched.gamma:.4g}); "
                    f"lower lr ({cfg.lr}) or mask_lr ({mask_lr}). The last good checkpoint is kept"
                    + (f" in {ckpt}" if ckpt else "") + ".")
            opt_w.zero_grad(set_to_none=True)
            opt_m.zero_grad(set_to_none=True)
            loss.backward()
            opt_w.step()
            opt_m.step()
            run_loss += loss.item() * len(y)
            run_ce += ce.item() * len(y)
            n_seen += len(y)
            # intra-epoch scheduler updates (updates_per_epoch > 1); the last one is at epoch end
            if pruning and upd_every and cfg.updates_per_epoch > 1 and (step + 1) % upd_every == 0 \
                    and (step + 1) < steps:
                sched.step(epoch + (step + 1) / steps, sparsity_report(net)["remaining"])
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        after = keep_masks(net)
        regrew = sum(int((~before[k] & after[k]).sum()) for k in after)
        pruned = sum(int((before[k] & ~after[k]).sum()) for k in after)
        rep = sparsity_report(net)
        rec = {"epoch": epoch + 1, "phase": "prune" if pruning else "regrow", "gamma": sched.gamma if pruning else 0.0,
               "remaining": rep["remaining"], "expected": sched.expected(epoch + 1) if pruning else None,
               "regrew": regrew, "pruned": pruned, "loss": run_loss / max(n_seen, 1), "ce": run_ce / max(n_seen, 1),
               "mask_lr": opt_m.param_groups[0]["lr"]}
        if val is not None:
            rec["val_accuracy"] = accuracy(net, val)
        if pruning and cfg.constant_gamma is None:
            sched.step(epoch + 1, rep["remaining"])
        history.append(rec)
        if epoch + 1 == cfg.prune_epochs:
            keep_after_prune = {k: v.clone() for k, v in after.items()}
        if ckpt is not None:
            _save_atomic({"model": net.state_dict(), "opt_w": opt_w.state_dict(), "opt_m": opt_m.state_dict(),
                          "scheduler": sched.state_dict(), "epoch": epoch + 1, "history": history,
                          "keep_after_prune": keep_after_prune, "config": asdict(cfg)}, ckpt)
    train_seconds = time.perf_counter() - t_start

    final_keep = keep_masks(net)
    regrew_total = 0
    if keep_after_prune is not None and cfg.regrow_epochs > 0:
        regrew_total = sum(int((~keep_after_prune[k] & final_keep[k]).sum()) for k in final_keep)
    before_corr = sparsity_report(net)
    correction = {"method": cfg.final_correction, "sparsity_before": before_corr["sparsity"], "flipped": 0}
    if cfg.final_correction == "topk" and cfg.constant_gamma is None:
        want = int(round(cfg.target_remaining * n_masked))
        set_global_topk(net, want)
        now = keep_masks(net)
        correction["flipped"] = sum(int((now[k] != final_keep[k]).sum()) for k in now)
        if correction["flipped"] and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
            from flowprune.train import reestimate_bn

            reestimate_bn(net, data.calibration_batches(cfg.batch_size, 10, seed=cfg.seed))
            correction["bn_reestimated"] = True
    rep = sparsity_report(net)
    correction["sparsity_after"] = rep["sparsity"]
    net.eval()
    baked = bake(net)
    res = {"method": "hyperflows", "config": asdict(cfg), "mask_lr": mask_lr, "masked_weights": n_masked,
           "sparsity": rep["sparsity"], "remaining": rep["remaining"], "kept": rep["kept"],
           "layers": {k: v["sparsity"] for k, v in rep["layers"].items()},
           "accuracy": accuracy(net, make_loader(data.test, 512)) if len(data.test) else None,
           "val_accuracy": accuracy(net, val) if val is not None else None,
           "epochs": history, "gamma_trajectory": [h["gamma"] for h in history if h["phase"] == "prune"],
           "remaining_per_epoch": [h["remaining"] for h in history], "regrew_total": regrew_total,
           "correction": correction, "s0": sched.s0, "prune_target_remaining": prune_target,
           "initial_gamma": float(gamma0), "train_seconds": train_seconds,
           "masked_model": net, "model": baked}
    return res


def pressure_sweep(model: nn.Module, data: DataSplits, gammas: list[float], config: HyperflowsConfig | None = None,
                   *, out_dir: str | os.PathLike | None = None, resume: bool = True, progress: bool | None = None,
                   max_batches_per_epoch: int | None = None, **overrides) -> dict:
    """Train copies of ``model`` under each constant pressure and fit the pressure -> sparsity law.

    Each run uses ``config.prune_epochs`` epochs of constant gamma, no regrowth and no correction.
    Returns ``{"runs": [{"gamma", "remaining", "sparsity", "accuracy"}...], "fit": fit_power_law(...)}``;
    runs with nothing pruned (remaining 1.0) are kept in ``runs`` but left out of the fit (a power
    law cannot describe a saturated point), as are runs with nothing left.
    """
    if not gammas or len(gammas) < 2:
        raise FlowpruneError(f"a sweep needs at least two pressures, got {gammas!r}")
    for g in gammas:
        if not (isinstance(g, (int, float)) and g > 0 and math.isfinite(g)):
            raise FlowpruneError(f"every pressure gamma must be a positive number, got {g!r}")
    base = HyperflowsConfig(**{**asdict(config or HyperflowsConfig()), **overrides})
    base = HyperflowsConfig(**{**asdict(base), "regrow_epochs": 0, "final_correction": "none"}).validate()
    select_layers(model, base.layers, include_classifier=base.include_classifier)
    runs = []
    for g in gammas:
        sub = Path(out_dir) / f"gamma_{g:g}" if out_dir is not None else None
        r = hyperflows_prune(model, data, base, constant_gamma=float(g), checkpoint_dir=sub, resume=resume,
                             progress=progress,
                             max_batches_per_epoch=max_batches_per_epoch)
        runs.append({"gamma": float(g), "remaining": r["remaining"], "sparsity": r["sparsity"],
                     "accuracy": r["accuracy"], "remaining_per_epoch": r["remaining_per_epoch"]})
    usable = [r for r in runs if 0 < r["remaining"] < 1]
    fit = fit_power_law([r["gamma"] for r in usable], [r["remaining"] for r in usable]) if len(usable) >= 2 else None
    return {"runs": runs, "fit": fit, "config": asdict(base), "fitted_points": len(usable)}
