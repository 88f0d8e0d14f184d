"""Torch-Pruning's importances through Torch-Pruning's own pruner: the anchors flowprune must beat.

``tp-magnitude`` (``GroupMagnitudeImportance(p=2)``), ``tp-l1`` (``p=1``), ``tp-taylor``
(``GroupTaylorImportance``, gradients accumulated over the calibration batches), ``tp-bn-scale``
(``BNScaleImportance``), ``tp-lamp`` (``LAMPImportance(p=2)``), ``tp-fpgm`` (``FPGMImportance(p=2)``),
``tp-hessian`` (``GroupHessianImportance``: the mean of per-sample squared gradients over
``HESSIAN_SAMPLES`` calibration samples, accumulated here because 1.6.1's ``accumulate_grad``
keys its buffer by parameter but tests the name, so it keeps only the last sample) and
``tp-random`` (``RandomImportance``), each through ``tp.pruner.MetaPruner``. Torch-Pruning has no MACs target: the pruning ratio is searched until
the achieved reduction is within ``tol`` of the target. ``-uniform`` / ``-global`` fix
Torch-Pruning's ranking mode; the plain names follow ``tp_mode`` (``auto``: uniform first, then
global when the uniform ratio jumps over the target).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from flowprune.errors import FlowpruneError, bad_choice
from flowprune.measure import count_macs_params
from flowprune.procedures.base import CutContext, Pruned, PruningProcedure, register_family

TP_METHODS = ("tp-magnitude", "tp-l1", "tp-taylor", "tp-bn-scale", "tp-lamp", "tp-fpgm", "tp-hessian", "tp-random")
HESSIAN_SAMPLES = 128
TP_MODE_METHODS = tuple(f"{m}-{mode}" for m in TP_METHODS for mode in ("global", "uniform"))
TP_MODES = ("auto", "uniform", "global")


def split_tp_method(method: str, default_mode: str) -> tuple[str, str]:
    """``"tp-taylor-global"`` -> ``("tp-taylor", "global")``; a plain ``tp-*`` name keeps ``default_mode``."""
    for mode in ("global", "uniform"):
        if method.endswith("-" + mode) and method[: -len(mode) - 1] in TP_METHODS:
            return method[: -len(mode) - 1], mode
    return method, default_mode


def tp_importance(method: str):
    """The Torch-Pruning importance object behind a ``tp-*`` method name."""
    import torch_pruning as tp

    imp = tp.importance
    table: dict[str, Callable] = {
        "tp-magnitude": lambda: imp.GroupMagnitudeImportance(p=2),
        "tp-l1": lambda: imp.GroupMagnitudeImportance(p=1),
        "tp-taylor": lambda: imp.GroupTaylorImportance(),
        "tp-bn-scale": lambda: imp.BNScaleImportance(),
        "tp-lamp": lambda: imp.LAMPImportance(p=2),
        "tp-fpgm": lambda: imp.FPGMImportance(p=2),
        "tp-hessian": lambda: imp.GroupHessianImportance(),
        "tp-random": lambda: imp.RandomImportance(),
    }
    if method not in table:
        raise bad_choice("Torch-Pruning method", method, table)
    return table[method]()


def classifier(model: nn.Module) -> nn.Module | None:
    """The last ``nn.Linear`` of ``model`` (the head Torch-Pruning must not prune), or None."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last


def accumulate_gradients(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Sum the cross-entropy gradients of ``batches`` into ``model``'s ``.grad`` (eval mode, in place).

    Eval mode (BatchNorm uses running statistics, dropout off) is the same frozen-network reading
    AGF calibration uses, so both criteria see the same network.
    """
    was = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    dev = next(model.parameters()).device
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x.to(dev)), y.to(dev))
        loss.backward()
    model.train(was)


def accumulate_hessian(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                       max_samples: int = HESSIAN_SAMPLES) -> None:
    """Put the mean of per-sample squared gradients (the diagonal Fisher/Hessian estimate that
    ``GroupHessianImportance`` reads from ``.grad`` when its own buffer is empty) into ``.grad``."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    acc = {p: torch.zeros_like(p) for p in model.parameters() if p.requires_grad}
    n = 0
    for x, y in batches:
        for i in range(len(y)):
            if n >= max_samples:
                break
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[i:i + 1].to(dev)), y[i:i + 1].to(dev)).backward()
            for p, a in acc.items():
                if p.grad is not None:
                    a += p.grad.detach() ** 2
            n += 1
    for p, a in acc.items():
        p.grad = a / max(n, 1)
    model.train(was)


def _copy_with_grads(model: nn.Module) -> nn.Module:
    new = copy.deepcopy(model)  # deepcopy does not copy .grad
    for p, q in zip(model.parameters(), new.parameters()):
        q.grad = None if p.grad is None else p.grad.detach().clone()
    return new


class _Trials:
    """Prunes copies of ``base`` at a ratio and measures the reduction (one MetaPruner per trial)."""

    def __init__(self, base: nn.Module, method: str, input_shape, *, importance, seed, round_to,
                 max_pruning_ratio):
        self.base, self.method, self.input_shape = base, method, input_shape
        self.importance, self.seed, self.round_to = importance, seed, round_to
        self.max_ratio = max_pruning_ratio
        self.dense_macs, _ = count_macs_params(base, input_shape)
        self.fc = classifier(base)
        self.example = torch.randn(1, *input_shape, device=next(base.parameters()).device)
        self.count = 0

    def __call__(self, ratio: float, global_pruning: bool) -> tuple[nn.Module, float]:
        import torch_pruning as tp

        self.count += 1
        m = _copy_with_grads(self.base)
        names = dict(self.base.named_modules())
        ignored = [dict(m.named_modules())[n] for n, mod in names.items() if mod is self.fc] if self.fc is not None else []
        torch.manual_seed(self.seed)  # tp-random
        imp = self.importance if self.importance is not None else tp_importance(self.method)
        pruner = tp.pruner.MetaPruner(m, self.example, importance=imp, global_pruning=global_pruning,
                                      pruning_ratio=ratio, max_pruning_ratio=self.max_ratio,
                                      ignored_layers=ignored, round_to=self.round_to)
        pruner.step()
        m.zero_grad(set_to_none=True)
        macs, _ = count_macs_params(m, self.input_shape)
        return m, self.dense_macs / max(macs, 1)


def _next_ratio(ratio: float, red: float, target: float, lo, hi, max_ratio: float) -> float | None:
    """The next ratio to try: bracketing interpolation of log reduction against -log(1 - ratio).

    ``None`` when the search should stop (the reachable points jump over the target, or even the
    largest ratio does not reach it).
    """
    u = -math.log(1.0 - ratio)
    if lo is not None and hi is not None:
        if hi[0] - lo[0] < 2e-3:
            return None
        ul, uh = -math.log(1.0 - lo[0]), -math.log(1.0 - hi[0])
        dl, dh = math.log(lo[1]), math.log(max(hi[1], lo[1] * (1 + 1e-9)))
        frac = (math.log(target) - dl) / (dh - dl) if dh > dl else 0.5
        frac = min(max(frac, 0.1), 0.9)  # stay inside the bracket, keep shrinking it
        u_new = ul + frac * (uh - ul)
    else:
        u_new = u + 0.5 * math.log(target / red)  # MACs ~ exp(-2u) for a uniform cut
    new = min(max(1.0 - math.exp(-u_new), 1e-3), max_ratio)
    if hi is None and lo is not None and new <= lo[0]:
        new = min(lo[0] + 0.5 * (max_ratio - lo[0]), max_ratio)
    if lo is not None and hi is None and lo[0] >= max_ratio:
        return None
    return new


def _search_mode(trial: _Trials, target: float, global_pruning: bool, ratio: float, *, tol: float,
                 max_trials: int, best: list) -> float | None:
    """Search one ranking mode; keeps the closest point in ``best``; returns the ratio that landed."""
    lo = hi = None  # (ratio, reduction) below / above the target
    mode = "global" if global_pruning else "uniform"
    for _ in range(max_trials):
        m, red = trial(ratio, global_pruning)
        err = abs(red / target - 1.0)
        info = {"mode": mode, "ratio": ratio, "achieved": red, "within_tol": err <= tol}
        if not best or err < best[0]:
            best[:] = [err, m, info]
        if err <= tol:
            return ratio
        if red < target:
            lo = (ratio, red) if lo is None or ratio > lo[0] else lo
        else:
            hi = (ratio, red) if hi is None or ratio < hi[0] else hi
        ratio = _next_ratio(ratio, red, target, lo, hi, trial.max_ratio)
        if ratio is None:
            return None
    return None


def tp_prune_to_target(model: nn.Module, method: str, target: float, *, input_shape: Sequence[int],
                       batches: Sequence[tuple[torch.Tensor, torch.Tensor]] = (), tol: float = 0.03,
                       mode: str = "auto", round_to: int | None = None, max_pruning_ratio: float = 0.95,
                       max_trials: int = 12, seed: int = 0, cache: dict | None = None,
                       importance=None) -> tuple[nn.Module, dict]:
    """Prune a copy of ``model`` with Torch-Pruning's ``MetaPruner`` to ``target`` x fewer MACs.

    The pruning ratio is searched until ``|achieved / target - 1| <= tol`` (bracketing
    interpolation of log reduction against ``-log(1 - ratio)``; the reduction grows with the
    ratio). ``cache`` (a dict shared across calls) remembers ratios found and targets the uniform
    ratio cannot reach, to save trials. ``mode``: ``uniform`` (one ratio per layer,
    Torch-Pruning's default), ``global`` (global ranking) or ``auto`` (uniform, then global if
    uniform cannot land within ``tol``). The classifier is never pruned. ``tp-taylor`` uses
    gradients summed over ``batches``. The caller's model is not changed. ``importance``: a
    Torch-Pruning importance object to use instead of the one ``method`` names (e.g. a flowprune
    score's ``as_tp_importance(...)``; it is reused across trials, so its cache is too).

    Returns:
        ``(pruned_model, info)`` with ``info = {"mode", "ratio", "achieved", "within_tol", "trials"}``.
    """
    if mode not in TP_MODES:
        raise bad_choice("tp_mode", mode, TP_MODES)
    base = copy.deepcopy(model).eval()
    if method in ("tp-taylor", "tp-hessian") and importance is None:
        if not batches:
            raise FlowpruneError(f"{method} needs calibration batches for its gradients")
        (accumulate_gradients if method == "tp-taylor" else accumulate_hessian)(base, batches)
    trial = _Trials(base, method, input_shape, importance=importance, seed=seed, round_to=round_to,
                    max_pruning_ratio=max_pruning_ratio)
    cache = cache if cache is not None else {}
    best: list = []
    for global_pruning in ((False, True) if mode == "auto" else ((mode == "global"),)):
        mkey = ("global" if global_pruning else "uniform", round(target, 6))
        if mode == "auto" and not global_pruning and cache.get(mkey) == "unreachable":
            continue  # an earlier search showed the uniform ratio jumps over this target
        ratio = cache.get(mkey) if isinstance(cache.get(mkey), float) else None
        if ratio is None:
            ratio = 1.0 - 1.0 / math.sqrt(target)  # exact for a uniform cut of every layer, MACs ~ width^2
        ratio = min(max(ratio, 1e-3), max_pruning_ratio)
        found = _search_mode(trial, target, global_pruning, ratio, tol=tol, max_trials=max_trials, best=best)
        if found is not None:
            cache[mkey] = found
            break
        if not global_pruning:
            cache[mkey] = "unreachable"
    _, pruned, info = best
    info["trials"] = trial.count
    pruned.flowprune_base = getattr(model, "flowprune_base", None)
    return pruned.eval(), info


class TorchPruningProcedure(PruningProcedure):
    """A ``tp-*`` method: Torch-Pruning's importance and pruner, ratio searched to the MACs target."""

    def __init__(self, method: str):
        self.method = method

    def cut(self, model: nn.Module, target: float, ctx: CutContext) -> Pruned:
        tp_name, mode = split_tp_method(self.method, ctx.tp_mode)
        pruned, info = tp_prune_to_target(model, tp_name, target, input_shape=ctx.input_shape,
                                          batches=list(ctx.batches), tol=ctx.tol, mode=mode, round_to=ctx.round_to,
                                          seed=ctx.seed, cache=ctx.cache)
        return Pruned(pruned, info)


@register_family(lambda: list(TP_METHODS) + list(TP_MODE_METHODS))
def _torch_pruning(name: str) -> PruningProcedure:
    return TorchPruningProcedure(name)
