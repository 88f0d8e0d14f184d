"""Side-by-side comparison of pruning criteria, flowprune's own and Torch-Pruning's, on equal work.

:func:`compare` starts every method from the SAME dense model, prunes it one-shot to the same
MACs reduction, and reports for every ``method x target`` the mean and standard deviation over
seeds of three accuracies (test split):

* ``acc_raw`` -- right after the cut (BatchNorm running statistics are stale: usually near chance);
* ``acc_bn``  -- after re-estimating BatchNorm statistics on the calibration batches, with no
  weight update (:func:`flowprune.train.reestimate_bn`): the fair one-shot comparison;
* ``acc_ft``  -- after the same fine-tune budget for every method (``finetune_epochs``, same
  learning rate, same batch order per seed),

plus the achieved MACs reduction, MACs, parameters, and measured latency (batch 1) and
throughput (batch 256) with the speed-up over the dense model measured in the same process.

Methods:

* flowprune scores (``agf``, ``taylor``, ``l1``, ``l2``, ``bn_scale``, ``wanda``, ``ria``,
  ``random``): scored on the calibration batches, planned by :func:`flowprune.plan.plan_cuts` to
  the MACs target and cut by :func:`flowprune.pruning.structural.apply_cuts`;
* ``tp-*``: Torch-Pruning's own importances through Torch-Pruning's own pruner
  (``tp.pruner.MetaPruner``), the anchors flowprune must beat: ``tp-magnitude``
  (``GroupMagnitudeImportance(p=2)``), ``tp-l1`` (``p=1``), ``tp-taylor``
  (``GroupTaylorImportance``, gradients accumulated over the same calibration batches),
  ``tp-bn-scale`` (``BNScaleImportance``) and ``tp-random`` (``RandomImportance``). Torch-Pruning
  has no MACs target: the pruning ratio is searched until the achieved reduction is within
  ``tol`` (3 %) of the target. In ``tp_mode="auto"`` (default) the uniform per-layer ratio is
  tried first (Torch-Pruning's default, ``global_pruning=False``) and, when its reachable points
  jump over the target, global ranking (``global_pruning=True``); the mode used, the ratio and
  the achieved reduction are recorded, and a target that cannot be reached within ``tol`` is
  reported at the nearest reachable point with ``within_tol = False``.

Also: the train-from-scratch baseline at the pruned architecture of ``scratch_from`` (default
``agf``): same widths, weights re-initialised, trained with the dense budget; and the Jaccard
overlap between the channel sets AGF and L1 choose to remove (and to keep), with the value two
independent random choices of the same per-unit sizes would give (chance).

"Exceeds one std": a difference between two means is marked when ``|delta|`` is larger than the
larger of the two standard deviations (a conservative reading; with one seed nothing is marked).

Every finished ``method x target x seed`` run is written to ``out_dir/runs/`` at once; calling
again with the same ``out_dir`` and configuration skips the finished runs (resume).
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from flowprune.data import DataSplits, make_loader
from flowprune.errors import FlowpruneError, bad_choice, check_positive_int
from flowprune.measure import accuracy, count_macs_params, latency, throughput
from flowprune.report import format_table, write_results
from flowprune.train import TrainConfig, fit, reestimate_bn

FLOWPRUNE_METHODS = ("agf", "taylor", "l1", "l2", "bn_scale", "wanda", "ria", "random")
TP_METHODS = ("tp-magnitude", "tp-l1", "tp-taylor", "tp-bn-scale", "tp-random")
# "<tp method>-global" / "-uniform": the same importance with Torch-Pruning's ranking mode fixed
# (the plain names follow ``tp_mode``), so one comparison can hold the best of both modes
TP_MODE_METHODS = tuple(f"{m}-{mode}" for m in TP_METHODS for mode in ("global", "uniform"))
TP_MODES = ("auto", "uniform", "global")
DEFAULT_METHODS = ("agf", "l1", "taylor", "wanda", "random", "tp-magnitude", "tp-taylor")
STAGES = ("acc_raw", "acc_bn", "acc_ft")
# the configuration entries that change a finished run (a resumed comparison must agree on these)
RUN_KEYS = ("finetune_epochs", "finetune_lr", "finetune_batches", "calib_batches", "calib_batch_size",
            "plan_options", "score_options", "tp_mode", "tol", "round_to", "data", "model", "compensate")


# ----------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------

def available_methods() -> list[str]:
    """Every method name :func:`compare` accepts: the flowprune score registry plus ``tp-*``."""
    names = list(FLOWPRUNE_METHODS)
    try:  # the registry is the truth when it is there
        from flowprune import scores as _scores

        reg = getattr(_scores, "available_scores", None) or getattr(_scores, "list_scores", None)
        if callable(reg):
            names = list(reg())
        elif isinstance(getattr(_scores, "SCORES", None), dict):
            names = list(_scores.SCORES)
    except Exception:  # noqa: BLE001 - scores package not importable yet: fall back to the contract
        pass
    return names + list(TP_METHODS) + list(TP_MODE_METHODS)


def split_tp_method(method: str, default_mode: str) -> tuple[str, str]:
    """``"tp-taylor-global"`` -> ``("tp-taylor", "global")``; a plain ``tp-*`` name keeps ``default_mode``."""
    for mode in ("global", "uniform"):
        if method.endswith("-" + mode) and method[: -len(mode) - 1] in TP_METHODS:
            return method[: -len(mode) - 1], mode
    return method, default_mode


def parse_target(value: object) -> float:
    """A MACs reduction factor from ``4``, ``4.0``, ``"4"`` or ``"4x"``; must be a finite number > 1."""
    raw = value
    if isinstance(value, str):
        s = value.strip().lower()
        s = s[:-1] if s.endswith("x") else s
        try:
            value = float(s)
        except ValueError:
            raise FlowpruneError(f"target {raw!r} is not a MACs reduction; write it like 2x, 4x or 8.5x") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 1:
        raise FlowpruneError(f"target must be a MACs reduction factor above 1 (e.g. 2x, 4x), got {raw!r}")
    return float(value)


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """Method names from a list or a comma-separated string, checked against :func:`available_methods`."""
    items = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else [str(m).strip() for m in methods]
    items = [m for m in items if m]
    if not items:
        raise FlowpruneError("methods is empty; allowed: " + ", ".join(available_methods()))
    allowed = available_methods()
    for m in items:
        if m not in allowed:
            raise bad_choice("method", m, allowed)
    if len(set(items)) != len(items):
        raise FlowpruneError(f"methods lists a method twice: {items}")
    return items


def _seed_list(seeds: int | Sequence[int]) -> list[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        check_positive_int("seeds", seeds)
        return list(range(seeds))
    out = [int(s) for s in seeds]
    if not out:
        raise FlowpruneError("seeds must be a positive count or a non-empty list of seeds")
    return out


# ----------------------------------------------------------------------------------------------
# Torch-Pruning anchors
# ----------------------------------------------------------------------------------------------

def tp_importance(method: str):
    """The Torch-Pruning 1.6.1 importance object behind a ``tp-*`` method name."""
    import torch_pruning as tp

    imp = tp.importance
    table: dict[str, Callable] = {
        "tp-magnitude": lambda: imp.GroupMagnitudeImportance(p=2),
        "tp-l1": lambda: imp.GroupMagnitudeImportance(p=1),
        "tp-taylor": lambda: imp.GroupTaylorImportance(),
        "tp-bn-scale": lambda: imp.BNScaleImportance(),
        "tp-random": lambda: imp.RandomImportance(),
    }
    if method not in table:
        raise bad_choice("Torch-Pruning method", method, table)
    return table[method]()


def _classifier(model: nn.Module) -> nn.Module | None:
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


def _copy_with_grads(model: nn.Module) -> nn.Module:
    new = copy.deepcopy(model)  # deepcopy does not copy .grad
    for p, q in zip(model.parameters(), new.parameters()):
        q.grad = None if p.grad is None else p.grad.detach().clone()
    return new


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
    import torch_pruning as tp

    if mode not in TP_MODES:
        raise bad_choice("tp_mode", mode, TP_MODES)
    base = copy.deepcopy(model).eval()
    if method == "tp-taylor" and importance is None:
        if not batches:
            raise FlowpruneError("tp-taylor needs calibration batches for its gradients")
        accumulate_gradients(base, batches)
    dense_macs, _ = count_macs_params(base, input_shape)
    fc = _classifier(base)
    example = torch.randn(1, *input_shape, device=next(base.parameters()).device)

    def trial(ratio: float, global_pruning: bool) -> tuple[nn.Module, float]:
        m = _copy_with_grads(base)
        names = dict(base.named_modules())
        ignored = [dict(m.named_modules())[n] for n, mod in names.items() if mod is fc] if fc is not None else []
        torch.manual_seed(seed)  # tp-random
        imp = importance if importance is not None else tp_importance(method)
        pruner = tp.pruner.MetaPruner(m, example, importance=imp, global_pruning=global_pruning,
                                      pruning_ratio=ratio, max_pruning_ratio=max_pruning_ratio,
                                      ignored_layers=ignored, round_to=round_to)
        pruner.step()
        m.zero_grad(set_to_none=True)
        macs, _ = count_macs_params(m, input_shape)
        return m, dense_macs / max(macs, 1)

    cache = cache if cache is not None else {}
    best: tuple[float, nn.Module, dict] | None = None
    trials = 0
    modes = (False, True) if mode == "auto" else ((mode == "global"),)
    for global_pruning in modes:
        mkey = ("global" if global_pruning else "uniform", round(target, 6))
        if mode == "auto" and not global_pruning and cache.get(mkey) == "unreachable":
            continue  # an earlier search showed the uniform ratio jumps over this target
        lo: tuple[float, float] | None = None  # (ratio, reduction) below the target
        hi: tuple[float, float] | None = None  # above it
        ratio = cache.get(mkey) if isinstance(cache.get(mkey), float) else None
        if ratio is None:
            ratio = 1.0 - 1.0 / math.sqrt(target)  # exact for a uniform cut of every layer, MACs ~ width^2
        ratio = min(max(ratio, 1e-3), max_pruning_ratio)
        reached = False
        for _ in range(max_trials):
            trials += 1
            m, red = trial(ratio, global_pruning)
            err = abs(red / target - 1.0)
            info = {"mode": mkey[0], "ratio": ratio, "achieved": red, "within_tol": err <= tol}
            if best is None or err < best[0]:
                best = (err, m, info)
            if err <= tol:
                cache[mkey] = ratio
                reached = True
                break
            if red < target:
                lo = (ratio, red) if lo is None or ratio > lo[0] else lo
            else:
                hi = (ratio, red) if hi is None or ratio < hi[0] else hi
            # interpolate in u = -log(1 - ratio) against log(reduction) (MACs ~ exp(-2u) for a uniform cut)
            u = -math.log(1.0 - ratio)
            if lo is not None and hi is not None:
                if hi[0] - lo[0] < 2e-3:
                    break  # the reachable points jump over the target
                ul, uh = -math.log(1.0 - lo[0]), -math.log(1.0 - hi[0])
                dl, dh = math.log(lo[1]), math.log(max(hi[1], lo[1] * (1 + 1e-9)))
                frac = (math.log(target) - dl) / (dh - dl) if dh > dl else 0.5
                frac = min(max(frac, 0.1), 0.9)  # stay inside the bracket, keep shrinking it
                u_new = ul + frac * (uh - ul)
            else:
                u_new = u + 0.5 * math.log(target / red)
            ratio = min(max(1.0 - math.exp(-u_new), 1e-3), max_pruning_ratio)
            if hi is None and lo is not None and ratio <= lo[0]:
                ratio = min(lo[0] + 0.5 * (max_pruning_ratio - lo[0]), max_pruning_ratio)
            if lo is not None and hi is None and lo[0] >= max_pruning_ratio:
                break  # even the largest ratio does not reach the target
        if reached:
            break
        if not global_pruning:
            cache[mkey] = "unreachable"
    assert best is not None
    _, pruned, info = best
    info["trials"] = trials
    pruned.flowprune_base = getattr(model, "flowprune_base", None)
    return pruned.eval(), info


# ----------------------------------------------------------------------------------------------
# flowprune methods (the engine is flowprune.units / scores / plan / pruning.structural)
# ----------------------------------------------------------------------------------------------

def _make_score(method: str, seed: int, options: dict | None):
    from flowprune.scores import get_score

    opts = dict(options or {})
    try:
        params = inspect.signature(get_score).parameters
        accepts_kw = any(p.kind is p.VAR_KEYWORD for p in params.values()) or "seed" in params
    except (TypeError, ValueError):
        accepts_kw = True
    if method == "random" and accepts_kw and "seed" not in opts:
        opts["seed"] = seed
    try:
        return get_score(method, **opts)
    except TypeError:
        opts.pop("seed", None)
        return get_score(method, **opts)


def flowprune_one_shot(model: nn.Module, method: str, target: float, *, input_shape: Sequence[int],
                       batches: Sequence[tuple[torch.Tensor, torch.Tensor]], seed: int = 0,
                       plan_options: dict | None = None, score_options: dict | None = None,
                       compensate: bool | None = None) -> tuple[nn.Module, dict, dict]:
    """Score, plan and cut a copy of ``model`` once to ``target`` x fewer MACs with a flowprune score.

    The plan uses ``flowprune.prune``'s defaults (``DEFAULT_BUDGET``, ``DEFAULT_NORMALIZE``) unless
    ``plan_options`` says otherwise; ``compensate`` (default ``DEFAULT_COMPENSATE``) folds the removed
    channels' calibration means into their consumers' biases before the cut (:mod:`flowprune.compensate`).

    Returns ``(pruned, cuts, info)``: ``cuts = {unit name: removed indices}`` in the dense unit's
    index space (used for the Jaccard overlap) and ``info = {"achieved": reduction}``.
    """
    from flowprune.plan import plan_cuts
    from flowprune.pruning.structural import DEFAULT_BUDGET, DEFAULT_COMPENSATE, DEFAULT_NORMALIZE, apply_cuts
    from flowprune.units import find_units

    po = {"budget": DEFAULT_BUDGET, "normalize": DEFAULT_NORMALIZE, **(plan_options or {})}
    compensate = DEFAULT_COMPENSATE if compensate is None else compensate
    work = copy.deepcopy(model).eval()
    dev = next(work.parameters()).device
    example = torch.randn(1, *input_shape, device=dev)
    units = find_units(work, example)  # found on this copy: units hold references to its modules
    torch.manual_seed(seed)
    scorer = _make_score(method, seed, (score_options or {}).get(method))
    scores = scorer(work, units, list(batches))
    cuts = plan_cuts(work, units, scores, example_inputs=example, target_macs=target, **po)
    compensated = []
    if compensate:
        from flowprune.compensate import compensate_means, consumer_input_means

        compensated = compensate_means(work, units, cuts, consumer_input_means(work, units, batches))
    # the plan's verified cut copy predates the compensation: cut the compensated model again
    pruned = cuts.cut_model if cuts.cut_model is not None and not compensated else apply_cuts(work, cuts,
                                                                                              example_inputs=example)
    pruned.flowprune_base = getattr(model, "flowprune_base", None)
    cuts_json = {k: [int(i) for i in (v.tolist() if hasattr(v, "tolist") else v)] for k, v in cuts.items()}
    info = {"plan_note": getattr(cuts, "note", ""), "widths": dict(getattr(cuts, "widths", {}) or {}),
            "compensated": compensated}
    return pruned.eval(), cuts_json, info


# ----------------------------------------------------------------------------------------------
# overlap, re-initialisation, statistics
# ----------------------------------------------------------------------------------------------

def jaccard_overlap(cuts_a: dict[str, Sequence[int]], cuts_b: dict[str, Sequence[int]],
                    sizes: dict[str, int]) -> dict[str, float]:
    """Jaccard index of two channel selections over all units, for removed and for kept channels.

    A selection is the set of ``(unit, index)`` pairs. ``sizes`` gives every unit's width (the
    kept set is the complement of the removed one). ``chance_*`` is the expected index for two
    independent uniform random selections of the same per-unit sizes (the ratio of expected
    intersection to expected union).
    """
    out: dict[str, float] = {}
    for kind in ("removed", "kept"):
        inter = union = chance_i = total_a = total_b = 0.0
        for name, n in sizes.items():
            a = set(int(i) for i in cuts_a.get(name, ()))
            b = set(int(i) for i in cuts_b.get(name, ()))
            if kind == "kept":
                a, b = set(range(n)) - a, set(range(n)) - b
            inter += len(a & b)
            union += len(a | b)
            total_a += len(a)
            total_b += len(b)
            chance_i += len(a) * len(b) / n if n else 0.0
        out[kind] = inter / union if union else float("nan")
        den = total_a + total_b - chance_i
        out[f"chance_{kind}"] = chance_i / den if den else float("nan")
    return out


def reinitialise(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with the same architecture and freshly initialised weights.

    Every module's own ``reset_parameters`` is used (PyTorch's default initialisation, BN
    statistics reset); parameters owned by modules without one (ViT ``pos_embed``/``cls_token``)
    are drawn from N(0, 0.02^2), timm's choice.
    """
    new = copy.deepcopy(model)
    torch.manual_seed(seed)
    for m in new.modules():
        if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
            m.reset_parameters()
        elif m._parameters:
            for p in m._parameters.values():
                if p is not None:
                    with torch.no_grad():
                        p.normal_(0.0, 0.02)
    return new


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0 for one value); ``(None, None)`` for no values."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def exceeds_one_std(mean_a: float, std_a: float, mean_b: float, std_b: float) -> bool:
    """Whether ``|mean_a - mean_b|`` is larger than the larger of the two standard deviations (> 0)."""
    s = max(std_a or 0.0, std_b or 0.0)
    return s > 0 and abs(mean_a - mean_b) > s


# ----------------------------------------------------------------------------------------------
# the comparison
# ----------------------------------------------------------------------------------------------

def _speed(model: nn.Module, input_shape, repeats: int, batch: int) -> dict[str, float]:
    return {"latency_ms_b1": 1e3 * latency(model, input_shape, batch_size=1, warmup=3, repeats=repeats),
            f"throughput_b{batch}": throughput(model, input_shape, batch_size=batch, warmup=1,
                                                repeats=max(3, repeats // 4))}


def _run_key(method: str, target: float, seed: int) -> str:
    return f"{method}_{target:g}x_s{seed}"


def compare(dense_model: nn.Module | Sequence[nn.Module], data: DataSplits, methods: str | Sequence[str] = DEFAULT_METHODS,
            targets: Sequence[float | str] = (2.0, 4.0, 8.0, 16.0), seeds: int | Sequence[int] = 3, *,
            finetune_epochs: int = 1, finetune_lr: float = 0.01, finetune_batches: int | None = None,
            calib_batches: int = 10, calib_batch_size: int = 64, dense_config: TrainConfig | None = None,
            scratch_epochs: int | None = None, scratch_from: str = "agf",
            scratch_targets: Sequence[float | str] | None = None, scratch_seeds: int | None = None,
            plan_options: dict | None = None, score_options: dict | None = None, tp_mode: str = "auto",
            tol: float = 0.03, round_to: int | None = None, measure_speed: bool = True, speed_repeats: int = 20,
            speed_batch: int = 256, out_dir: str | os.PathLike | None = None, resume: bool = True,
            progress: bool | None = None, device: str | torch.device | None = None,
            compensate: bool | None = None) -> dict:
    """Compare pruning methods from one dense model on equal work; returns (and writes) the results.

    Args:
        dense_model: the trained dense model every method starts from (never changed), or one
            dense model per seed (a list as long as ``seeds``: seed i prunes dense model i, so the
            spread over seeds covers dense training as well as calibration, the fair protocol).
        data: the data set (calibration and fine-tuning on ``train``; accuracy on ``test``).
        methods: names or a comma-separated string (see :func:`available_methods`).
        targets: MACs reduction factors (``4``, ``"4x"``).
        seeds: a count (seeds 0..n-1) or a list. A seed picks the calibration batches, the
            random selections and the fine-tune batch order; every method sees the same ones.
        finetune_epochs: epochs of fine-tuning after the cut, the same for every method (0: none).
        finetune_lr: its initial learning rate (SGD, cosine, weight decay 5e-4, augmentation).
        finetune_batches: optional cap on steps per fine-tune epoch (short recoveries).
        calib_batches, calib_batch_size: T calibration batches from ``train`` (scores, Taylor
            gradients and BatchNorm re-estimation).
        dense_config: the dense model's training recipe, reused for the train-from-scratch
            baseline (default ``TrainConfig()``); ``scratch_epochs`` overrides its epochs, 0 skips.
        scratch_from: the method whose pruned architecture is trained from scratch.
        scratch_targets, scratch_seeds: restrict the (costly) scratch baseline (default: all
            targets, all seeds).
        plan_options: extra keywords for ``plan_cuts`` (``budget``, ``normalize``, ``min_width``,
            ``round_to``); flowprune methods default to ``flowprune.prune``'s plan (global, unit).
        compensate: mean compensation before the cut for flowprune methods (default: on, as in
            ``flowprune.prune``; :mod:`flowprune.compensate`).
        score_options: ``{method: {option: value}}`` for ``get_score``.
        tp_mode, tol, round_to: Torch-Pruning search (see :func:`tp_prune_to_target`).
        measure_speed: latency at batch 1 and throughput at ``speed_batch``, for the first seed
            of every method x target, with the dense model re-measured next to it (speed-up).
        out_dir: writes ``results.json``, ``compare.md`` and one JSON per finished run (resume).
        device: where every run happens (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``; default: the
            dense model's device); the dense models are copied there.

    Returns:
        ``{"config", "dense", "runs", "summary", "jaccard", "scratch", "table"}``; ``table`` is
        the Markdown table that was printed/written.
    """
    # ---- validate everything before any work
    method_list = parse_methods(methods)
    target_list = [parse_target(t) for t in targets]
    if not target_list:
        raise FlowpruneError("targets is empty; give at least one MACs reduction such as 4x")
    seed_list = _seed_list(seeds)
    if isinstance(dense_model, nn.Module):
        dense_models = [dense_model] * len(seed_list)
    elif isinstance(dense_model, Sequence) and all(isinstance(m, nn.Module) for m in dense_model):
        dense_models = list(dense_model)
        if len(dense_models) != len(seed_list):
            raise FlowpruneError(f"dense_model is a list of {len(dense_models)} models but there are "
                                 f"{len(seed_list)} seeds; give one dense model per seed (or a single model)")
    else:
        raise FlowpruneError(f"dense_model must be a torch nn.Module or a list of them, got {type(dense_model).__name__}")
    dense_model = dense_models[0]
    if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise FlowpruneError(f"finetune_epochs must be an integer >= 0, got {finetune_epochs!r}")
    check_positive_int("calib_batches", calib_batches)
    check_positive_int("calib_batch_size", calib_batch_size)
    if finetune_batches is not None:
        check_positive_int("finetune_batches", finetune_batches)
    if tp_mode not in TP_MODES:
        raise bad_choice("tp_mode", tp_mode, TP_MODES)
    if not (0 < tol < 1):
        raise FlowpruneError(f"tol must lie in (0, 1), got {tol!r}")
    if not isinstance(data, DataSplits):
        raise FlowpruneError(f"data must be a DataSplits from flowprune.load_dataset, got {type(data).__name__}")
    base = getattr(dense_model, "flowprune_base", None) or {}
    input_shape = tuple(base.get("input_shape", data.input_shape))
    if tuple(input_shape) != tuple(data.input_shape):
        raise FlowpruneError(f"the model takes inputs of shape {tuple(input_shape)} but data set {data.name!r} "
                             f"has {tuple(data.input_shape)}")
    fc = _classifier(dense_model)
    if fc is not None and fc.out_features < data.num_classes:
        raise FlowpruneError(f"the model's head has {fc.out_features} outputs but data set {data.name!r} has "
                             f"{data.num_classes} classes; labels would not fit")
    dense_cfg = (dense_config or TrainConfig()).validate()
    s_epochs = dense_cfg.epochs if scratch_epochs is None else int(scratch_epochs)
    if s_epochs < 0:
        raise FlowpruneError(f"scratch_epochs must be >= 0, got {scratch_epochs!r}")
    s_targets = target_list if scratch_targets is None else [parse_target(t) for t in scratch_targets]
    s_seeds = seed_list if scratch_seeds is None else seed_list[:check_positive_int("scratch_seeds", scratch_seeds)]
    do_scratch = s_epochs > 0 and scratch_from in method_list and not scratch_from.startswith("tp-")

    out = Path(out_dir) if out_dir is not None else None
    config = {"methods": method_list, "targets": target_list, "seeds": seed_list, "finetune_epochs": finetune_epochs,
              "finetune_lr": finetune_lr, "finetune_batches": finetune_batches, "calib_batches": calib_batches,
              "calib_batch_size": calib_batch_size, "dense_config": asdict(dense_cfg), "scratch_epochs": s_epochs,
              "scratch_from": scratch_from if do_scratch else None, "scratch_targets": s_targets,
              "scratch_seeds": s_seeds, "plan_options": plan_options or {}, "score_options": score_options or {},
              "tp_mode": tp_mode, "tol": tol, "round_to": round_to, "data": data.name, "model": base.get("name"),
              "compensate": compensate,
              "torch_pruning_version": _tp_version()}
    from flowprune.device import resolve_device

    dev = resolve_device(device, dense_models[0])
    denses = [copy.deepcopy(m).to(dev).eval() for m in dense_models]
    dense = denses[0]
    # reachability of every target, before any work: every unit at its minimum width
    from flowprune.plan import MacsModel, max_reduction
    from flowprune.units import find_units

    example = torch.randn(1, *input_shape, device=next(dense.parameters()).device)
    dense_units = find_units(copy.deepcopy(dense), example)
    sizes = {u.name: int(u.size) for u in dense_units}
    po = plan_options or {}
    reach = max_reduction(MacsModel(dense, dense_units, example), dense_units, po.get("min_width", 1),
                          po.get("round_to", 1))
    too_far = [t for t in target_list if t > reach * (1 + tol)]
    if too_far:
        raise FlowpruneError(f"target(s) {', '.join(f'{t:g}x' for t in too_far)} cannot be reached: with every unit at "
                             f"its minimum width the model has {reach:.2f}x fewer MACs at most; allowed: 1 < target "
                             f"<= {reach:.2f}")
    run_dir = None
    if out is not None:
        if out.exists() and not out.is_dir():
            raise FlowpruneError(f"out_dir {str(out)!r} exists and is not a directory")
        run_dir = out / "runs"
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg_path = out / "compare_config.json"
        if cfg_path.exists() and resume:
            old = json.loads(cfg_path.read_text())
            now = json.loads(json.dumps(config))
            # only what changes a finished run matters; methods, targets, seeds and scratch may grow
            if any(old.get(k) != now.get(k) for k in RUN_KEYS):
                raise FlowpruneError(f"{out} holds runs of another comparison config; use a fresh out dir or resume=False")
        cfg_path.write_text(json.dumps(config, indent=1))

    test = make_loader(data.test, 512)
    dense_macs, dense_params = count_macs_params(dense, input_shape)
    dense_accs = [accuracy(m, test) for m in denses]
    dense_info = {"accuracy": statistics.mean(dense_accs), "macs": dense_macs, "params": dense_params,
                  "accuracy_per_seed": dense_accs, "per_seed_dense": len(dense_models) > 1 and
                  any(m is not dense_models[0] for m in dense_models)}
    if len(dense_accs) > 1:
        dense_info["accuracy_std"] = statistics.stdev(dense_accs)
    if measure_speed:
        dense_info.update(_speed(dense, input_shape, speed_repeats, speed_batch))
    tp_cache: dict = {}
    ft_cfg = TrainConfig(epochs=max(finetune_epochs, 1), lr=finetune_lr, batch_size=dense_cfg.batch_size,
                         weight_decay=dense_cfg.weight_decay, optimizer="sgd", augment=dense_cfg.augment)

    total = len(seed_list) * len(target_list) * len(method_list)
    bar = _bar(total, progress)
    runs: list[dict] = []
    archs: dict[tuple[int, float], nn.Module] = {}
    for si, seed in enumerate(seed_list):
        dense = denses[si]
        calib = data.calibration_batches(calib_batch_size, calib_batches, seed=seed, split="train")
        for target in target_list:
            for method in method_list:
                key = _run_key(method, target, seed)
                path = run_dir / f"{key}.json" if run_dir is not None else None
                if path is not None and resume and path.exists():
                    runs.append(json.loads(path.read_text()))
                    bar.update(1)
                    continue
                t0 = time.perf_counter()
                cuts = None
                if method.startswith("tp-"):
                    tp_name, mode = split_tp_method(method, tp_mode)
                    pruned, info = tp_prune_to_target(dense, tp_name, target, input_shape=input_shape, batches=calib,
                                                      tol=tol, mode=mode, round_to=round_to, seed=seed,
                                                      cache=tp_cache)
                else:
                    pruned, cuts, info = flowprune_one_shot(dense, method, target, input_shape=input_shape,
                                                            batches=calib, seed=seed, plan_options=plan_options,
                                                            score_options=score_options, compensate=compensate)
                prune_s = time.perf_counter() - t0
                macs, params = count_macs_params(pruned, input_shape)
                rec = {"method": method, "target": target, "seed": seed, "macs": macs, "params": params,
                       "achieved": dense_macs / max(macs, 1), "prune_seconds": prune_s, **info}
                rec["within_tol"] = abs(rec["achieved"] / target - 1) <= tol
                rec["acc_raw"] = accuracy(pruned, test)
                reestimate_bn(pruned, calib)
                rec["acc_bn"] = accuracy(pruned, test)
                if do_scratch and method == scratch_from:
                    archs[(seed, target)] = copy.deepcopy(pruned)
                if finetune_epochs > 0:
                    t1 = time.perf_counter()
                    cfg = TrainConfig(**{**asdict(ft_cfg), "epochs": finetune_epochs, "seed": seed})
                    fit(pruned, data, cfg, progress=False, max_batches_per_epoch=finetune_batches)
                    rec["acc_ft"] = accuracy(pruned, test)
                    rec["finetune_seconds"] = time.perf_counter() - t1
                else:
                    rec["acc_ft"] = None
                if measure_speed and si == 0:
                    sp = _speed(pruned, input_shape, speed_repeats, speed_batch)
                    dn = _speed(dense, input_shape, speed_repeats, speed_batch)  # next to it: a ratio
                    rec.update(sp)
                    rec["speedup_latency_b1"] = dn["latency_ms_b1"] / sp["latency_ms_b1"]
                    rec[f"speedup_throughput_b{speed_batch}"] = (sp[f"throughput_b{speed_batch}"]
                                                                 / dn[f"throughput_b{speed_batch}"])
                if cuts is not None and method in ("agf", "l1"):
                    rec["cuts"] = cuts
                rec["seconds"] = time.perf_counter() - t0
                if path is not None:
                    write_results(path, rec)
                runs.append(rec)
                bar.update(1)
    bar.close()

    # ---- Jaccard AGF vs L1
    jac_rows = []
    if "agf" in method_list and "l1" in method_list and sizes:
        by = {(r["method"], r["target"], r["seed"]): r for r in runs}
        for target in target_list:
            vals = [jaccard_overlap(by[("agf", target, s)]["cuts"], by[("l1", target, s)]["cuts"], sizes)
                    for s in seed_list if "cuts" in by.get(("agf", target, s), {}) and "cuts" in by.get(("l1", target, s), {})]
            if not vals:
                continue
            row = {"target": target}
            for k in ("removed", "kept", "chance_removed", "chance_kept"):
                row[k], row[k + "_std"] = mean_std([v[k] for v in vals])
            jac_rows.append(row)

    # ---- train from scratch at the pruned architecture
    scratch_rows = []
    if do_scratch:
        for seed in s_seeds:
            dense = denses[seed_list.index(seed)]
            for target in s_targets:
                key = f"scratch_{scratch_from}_{target:g}x_s{seed}"
                path = run_dir / f"{key}.json" if run_dir is not None else None
                if path is not None and resume and path.exists():
                    scratch_rows.append(json.loads(path.read_text()))
                    continue
                arch = archs.get((seed, target))
                if arch is None:  # resumed run: rebuild the architecture (deterministic for a seed)
                    calib = data.calibration_batches(calib_batch_size, calib_batches, seed=seed, split="train")
                    arch, _, _ = flowprune_one_shot(dense, scratch_from, target, input_shape=input_shape, batches=calib,
                                                    seed=seed, plan_options=plan_options,
                                                    score_options=score_options, compensate=compensate)
                net = reinitialise(arch, seed)
                t0 = time.perf_counter()
                fit(net, data, TrainConfig(**{**asdict(dense_cfg), "epochs": s_epochs, "seed": seed}), progress=False)
                rec = {"arch_from": scratch_from, "target": target, "seed": seed, "epochs": s_epochs,
                       "acc": accuracy(net, test), "seconds": time.perf_counter() - t0}
                if path is not None:
                    write_results(path, rec)
                scratch_rows.append(rec)

    summary = summarise(runs, method_list, target_list, speed_batch)
    scratch_summary = []
    for target in s_targets if do_scratch else []:
        m, s = mean_std([r["acc"] for r in scratch_rows if r["target"] == target])
        scratch_summary.append({"target": target, "arch_from": scratch_from, "acc": m, "acc_std": s,
                                "n": sum(r["target"] == target for r in scratch_rows), "epochs": s_epochs})
    table = render_markdown(config, dense_info, summary, jac_rows, scratch_summary, speed_batch)
    result = {"config": config, "torch_threads": torch.get_num_threads(), "dense": dense_info, "runs": runs,
              "summary": summary, "jaccard": jac_rows, "scratch": scratch_summary, "scratch_runs": scratch_rows, "table": table}
    if out is not None:
        write_results(out / "results.json", result)
        (out / "compare.md").write_text(table + "\n")
    return result


def _tp_version() -> str:
    try:
        from importlib.metadata import version

        return version("torch-pruning")
    except Exception:  # noqa: BLE001
        return "unknown"


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, progress: bool | None):
    import sys

    show = sys.stderr.isatty() if progress is None else progress
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="compare", file=sys.stderr)


def summarise(runs: Sequence[dict], methods: Sequence[str], targets: Sequence[float], speed_batch: int = 256) -> list[dict]:
    """One row per ``method x target``: mean/std over seeds of every stage, and deltas to the reference.

    The reference at each target and stage is the best ``tp-*`` method by mean (when any ran),
    otherwise the first method listed. ``d_<stage>`` is ``mean - reference mean`` and
    ``d_<stage>_gt_std`` whether it exceeds one std (:func:`exceeds_one_std`).
    """
    rows = []
    for target in targets:
        group = []
        for method in methods:
            rs = [r for r in runs if r["method"] == method and r["target"] == target]
            if not rs:
                continue
            row: dict = {"method": method, "target": target, "n": len(rs)}
            for k in (*STAGES, "achieved", "macs", "params", "prune_seconds"):
                row[k], row[k + "_std"] = mean_std([r.get(k) for r in rs])
            row["within_tol"] = all(r.get("within_tol", True) for r in rs)
            modes = sorted({r["mode"] for r in rs if "mode" in r})
            if modes:
                row["tp_mode"] = "/".join(modes)
            first = min(rs, key=lambda r: r["seed"])
            for k in ("latency_ms_b1", f"throughput_b{speed_batch}", "speedup_latency_b1",
                      f"speedup_throughput_b{speed_batch}"):
                if k in first:
                    row[k] = first[k]
            group.append(row)
        tp_rows = [r for r in group if r["method"].startswith("tp-")]
        for stage in STAGES:
            cands = [r for r in (tp_rows or group[:1]) if r[stage] is not None]
            if not cands:
                continue
            ref = max(cands, key=lambda r: r[stage])
            for r in group:
                if r[stage] is None:
                    continue
                r[f"ref_{stage}"] = ref["method"]
                r[f"d_{stage}"] = r[stage] - ref[stage]
                r[f"d_{stage}_gt_std"] = exceeds_one_std(r[stage], r[stage + "_std"], ref[stage], ref[stage + "_std"])
        rows.extend(group)
    return rows


def _pm(m: float | None, s: float | None, scale: float = 100.0, digits: int = 1) -> str:
    if m is None:
        return "-"
    return f"{scale * m:.{digits}f} ± {scale * (s or 0.0):.{digits}f}"


def _delta(r: dict, stage: str) -> str:
    d = r.get(f"d_{stage}")
    if d is None:
        return "-"
    if r["method"] == r.get(f"ref_{stage}"):
        return "ref"
    return f"{100 * d:+.1f}{'*' if r.get(f'd_{stage}_gt_std') else ''}"


def render_markdown(config: dict, dense: dict, summary: Sequence[dict], jaccard: Sequence[dict],
                    scratch: Sequence[dict], speed_batch: int = 256) -> str:
    """The comparison as Markdown: the main table, then Jaccard overlaps and the scratch baseline."""
    n_seeds = len(config["seeds"])
    has_tp = any(m.startswith("tp-") for m in config["methods"])
    ref_name = "best tp-*" if has_tp else config["methods"][0]
    acc_std = f" ± {100 * dense['accuracy_std']:.1f}" if dense.get("accuracy_std") is not None else ""
    per_seed = " (one dense model per seed)" if dense.get("per_seed_dense") else ""
    lines = [f"Dense {config.get('model')} on {config['data']}{per_seed}: test accuracy "
             f"{100 * dense['accuracy']:.1f}{acc_std} %, "
             f"{dense['macs'] / 1e6:.2f} M MACs, {dense['params'] / 1e3:.1f} K params"
             + (f", latency b1 {dense['latency_ms_b1']:.2f} ms, throughput b{speed_batch} "
                f"{dense[f'throughput_b{speed_batch}']:.0f}/s" if "latency_ms_b1" in dense else "") + ".",
             f"Accuracy % as mean ± std over {n_seeds} seed(s); one-shot cut; BN = after BatchNorm re-estimation on "
             f"{config['calib_batches']} x {config['calib_batch_size']} calibration samples (no weight update); "
             f"FT = after {config['finetune_epochs']} fine-tune epoch(s) at lr {config['finetune_lr']}. "
             f"Δ = difference to {ref_name} at that target (points); * = exceeds one std (the larger of the two).",
             ""]
    rows = []
    for r in summary:
        row = {"method": r["method"], "target": f"{r['target']:g}x",
               "achieved": f"{r['achieved']:.2f}x" + ("" if r["within_tol"] else " (!)"),
               "MACs": int(r["macs"]), "params": int(r["params"]),
               "raw %": _pm(r["acc_raw"], r["acc_raw_std"]), "BN %": _pm(r["acc_bn"], r["acc_bn_std"]),
               "Δ BN": _delta(r, "acc_bn"), "FT %": _pm(r["acc_ft"], r["acc_ft_std"]), "Δ FT": _delta(r, "acc_ft")}
        if "latency_ms_b1" in r:
            row["lat b1 ms"] = f"{r['latency_ms_b1']:.2f} ({r['speedup_latency_b1']:.2f}x)"
            row[f"thr b{speed_batch}/s"] = (f"{r[f'throughput_b{speed_batch}']:.0f} "
                                            f"({r[f'speedup_throughput_b{speed_batch}']:.2f}x)")
        rows.append(row)
    lines.append(format_table(rows))
    lines.append("")
    lines.append("(!) = the achieved reduction is more than "
                 f"{100 * config['tol']:.0f} % off the target (nearest reachable point). Speed: first seed's model; "
                 "in brackets the speed-up over the dense model measured next to it.")
    if jaccard:
        lines += ["", "Jaccard overlap of the channel sets AGF and L1 choose (mean ± std over seeds; chance = two "
                  "independent random selections of the same per-unit sizes):", ""]
        lines.append(format_table([{"target": f"{j['target']:g}x", "removed": _pm(j["removed"], j["removed_std"], 1, 3),
                                    "chance (removed)": f"{j['chance_removed']:.3f}",
                                    "kept": _pm(j["kept"], j["kept_std"], 1, 3),
                                    "chance (kept)": f"{j['chance_kept']:.3f}"} for j in jaccard]))
    if scratch:
        lines += ["", f"Train from scratch at the {scratch[0]['arch_from']}-pruned architecture "
                  f"(weights re-initialised, {scratch[0]['epochs']} epochs, the dense budget):", ""]
        lines.append(format_table([{"target": f"{s['target']:g}x", "scratch %": _pm(s["acc"], s["acc_std"]),
                                    "seeds": s["n"]} for s in scratch]))
    return "\n".join(lines)
