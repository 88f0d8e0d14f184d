"""Structural pruning: cut planned units out of a model, and the iterative prune procedure.

Surgery is done by Torch-Pruning (``DependencyGraph.get_pruning_group(...).prune()``): it already
knows how to shrink every coupled layer consistently (BatchNorm, residual additions,
concatenations, depthwise convs, flattened linears), so flowprune adds no second tracer. Heads of
timm-style attention are cut with Torch-Pruning's linear pruning functions on ``qkv`` (the q, k
and v rows of each removed head), ``proj`` (its input columns) and an optional ``gate`` / scale
``norm``; flowprune then fixes ``num_heads``, ``attn_dim`` (and keeps ``head_dim`` and
``scale``, which a head cut does not change) so the model runs without manual patching.

:func:`prune` is the whole procedure: calibrate -> plan -> cut -> BN re-estimation ->
(fine-tune), repeated along a schedule, then a final fine-tune. It never mutates the caller's
model, writes a checkpoint after every step and resumes from one.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from flowprune.errors import FlowpruneError, bad_choice, check_fraction, check_positive_int

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- surgery

from flowprune.cut import _example, apply_cuts, cut_heads  # noqa: E402,F401 -- surgery lives in flowprune.cut

# ----------------------------------------------------------------------------------------- procedure

# flowprune's default structural pruning, chosen by measurement (docs/results/study_structural.md):
# the ``agf`` score (centred, see flowprune.scores.agf), one global ranking of unit-normalised
# scores, and mean compensation of the removed channels before the cut.
DEFAULT_BUDGET = "global"
DEFAULT_NORMALIZE = "unit"
DEFAULT_COMPENSATE = True

@dataclass
class PruneResult:
    """The pruned model and how it got there.

    ``history``: one dict per step: step, target (reduction or ratio of that step), macs,
    params, reduction (vs the dense model), widths, plan_note, acc_cut (right after the cut),
    acc_bn (after BatchNorm re-estimation), acc_ft (after fine-tune), seconds_* timings.
    """

    model: nn.Module
    history: list[dict] = field(default_factory=list)
    widths: dict[str, int] = field(default_factory=dict)
    macs: int = 0
    params: int = 0
    dense_macs: int = 0
    dense_params: int = 0
    method: str = "agf"
    config: dict = field(default_factory=dict)
    unsupported: list[str] = field(default_factory=list)

    @property
    def reduction(self) -> float:
        return self.dense_macs / max(self.macs, 1)

    def to_dict(self) -> dict:
        return {"method": self.method, "macs": self.macs, "params": self.params, "dense_macs": self.dense_macs,
                "dense_params": self.dense_params, "reduction": self.reduction, "widths": dict(self.widths),
                "history": self.history, "config": self.config, "unsupported_layers": list(self.unsupported)}


def _check_data(data, model) -> None:
    from flowprune.data import DataSplits
    from flowprune.scores.base import check_labels

    if isinstance(data, DataSplits):
        y = data.train.tensors[1]
        check_labels(model, [(data.train.tensors[0][:1], y)])
        base = getattr(model, "flowprune_base", None) or {}
        shape = tuple(base.get("input_shape", ()))
        if shape and shape != tuple(data.input_shape):
            raise FlowpruneError(f"the model takes inputs of shape {shape} but data set {data.name!r} has "
                                 f"{tuple(data.input_shape)}")
    elif isinstance(data, Sequence) and data and all(isinstance(b, (tuple, list)) and len(b) == 2 for b in data):
        check_labels(model, data)
    else:
        raise FlowpruneError("data must be a flowprune DataSplits (load_dataset(...)) or a non-empty list of "
                             "(x, y) calibration batches")


def _eval_loader(data):
    from flowprune.data import DataSplits, make_loader

    if isinstance(data, DataSplits):
        return make_loader(data.test if len(data.test) else data.val, 512)
    return None


def prune(model: nn.Module, data, method: str = "agf", *, target_macs: float | str | None = None,
          ratio: float | None = None, steps: int | str = 1, schedule: str = "geometric", budget: str | None = None,
          calib_batches: int = 10, calib_batch_size: int = 128, finetune_epochs: int = 0,
          final_finetune_epochs: int = 0, finetune_config=None, min_width: int = 1, round_to: int = 1,
          seed: int = 0, checkpoint_dir: str | os.PathLike | None = None, progress: bool | None = None,
          score_options: dict | None = None, normalize: str = DEFAULT_NORMALIZE, reestimate_bn: bool = True,
          measure: bool = True, kinds: Sequence[str] = ("channel", "neuron", "head"),
          compensate: bool = DEFAULT_COMPENSATE,
          on_step: Callable[[dict, nn.Module], None] | None = None,
          device: str | torch.device | None = None, amp: str | None = None) -> PruneResult:
    """Prune ``model`` by ``method`` to ``target_macs`` (or ``ratio``); returns a :class:`PruneResult`.

    The caller's model is never changed. Each step: score on ``calib_batches`` fresh calibration
    batches (seeded by ``seed`` and the step) -> plan -> cut -> re-estimate BatchNorm statistics
    on the same batches (``reestimate_bn``) -> fine-tune ``finetune_epochs`` (if > 0 and not the
    last step) ; after the last step, fine-tune ``final_finetune_epochs``. Accuracy on the test
    split is recorded after the cut, after BN re-estimation and after fine-tuning (``measure``).

    Args:
        data: a :class:`flowprune.data.DataSplits` (or a list of (x, y) batches: calibration only,
            no fine-tuning, no accuracy).
        method: a registered score (``flowprune.scores.list_scores()``).
        target_macs: reduction factor (4.0 or "4x" = 4x fewer MACs than the input model).
        ratio: fraction of every unit's width to remove, in [0, 1) (exclusive with target_macs).
        steps, schedule: iterative schedule (``geometric`` or ``linear``; see :mod:`flowprune.schedules`).
            ``steps="auto"``: one step per halving of the MACs (``ceil(log2(target_macs))``; 1 for a
            ratio), each step re-scored on fresh batches after BN re-estimation.
        budget: ``layer`` (default) or ``global`` (see :mod:`flowprune.plan`).
        finetune_config: a :class:`flowprune.train.TrainConfig` (epochs are overridden).
        checkpoint_dir: after step K, ``DIR/step_K`` (flowprune.io format) and ``DIR/state.json``;
            a rerun with the same arguments resumes after the last finished step.
        score_options: options of the score (e.g. ``{"abs_mode": "after_sum"}`` for AGF).
        compensate: fold the calibration mean of every removed channel into its consumers' biases
            before the cut (:mod:`flowprune.compensate`; statistics only, no training).
        on_step: ``f(step_record, model)`` called after every step (e.g. for logging).
        device: where the work runs (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``; default: the
            model's device); the result lives there. ``amp``: mixed precision of the fine-tuning
            (``none``, ``bf16``, ``fp16``; see :func:`flowprune.train.fit`). Under torchrun the
            calibration batches and fine-tuning are shared by the ranks (:mod:`flowprune.distributed`)
            and only rank 0 writes ``checkpoint_dir``.
    """
    from flowprune.measure import accuracy, count_macs_params
    from flowprune.plan import MacsModel, check_budget_args, max_reduction, parse_target
    from flowprune.schedules import SCHEDULES, macs_schedule, ratio_schedule
    from flowprune.scores import get_score, list_scores
    from flowprune.train import TrainConfig, fit
    from flowprune.train import reestimate_bn as bn_reestimate
    from flowprune.units import find_units

    # ---- validation, before any work
    if not isinstance(model, nn.Module):
        raise FlowpruneError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if method not in list_scores():
        raise bad_choice("method", method, list_scores())
    if target_macs is None and ratio is None:
        raise FlowpruneError("give target_macs (e.g. 4.0 or '4x') or ratio (a fraction in [0, 1))")
    if target_macs is not None and ratio is not None:
        raise FlowpruneError("give either target_macs or ratio, not both")
    if ratio is not None:
        ratio = check_fraction("ratio", ratio)
    target = parse_target(target_macs) if target_macs is not None else None
    budget = budget or DEFAULT_BUDGET
    check_budget_args(ratio, None, target, budget, min_width, round_to, normalize)
    steps = resolve_steps(steps, target)
    if schedule not in SCHEDULES:
        raise bad_choice("schedule", schedule, SCHEDULES)
    check_positive_int("calib_batches", calib_batches)
    check_positive_int("calib_batch_size", calib_batch_size)
    for nm, v in (("finetune_epochs", finetune_epochs), ("final_finetune_epochs", final_finetune_epochs)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise FlowpruneError(f"{nm} must be an integer >= 0, got {v!r}")
    scorer = get_score(method, **(score_options or {}))
    from flowprune.device import check_amp, default_amp, resolve_device

    dev = resolve_device(device, model)
    amp = check_amp(default_amp() if amp is None else amp, dev)
    _check_data(data, model)
    from flowprune.data import DataSplits

    is_splits = isinstance(data, DataSplits)
    if (finetune_epochs or final_finetune_epochs) and not is_splits:
        raise FlowpruneError("fine-tuning needs a DataSplits (load_dataset(...)), not a list of batches")
    if checkpoint_dir is not None and getattr(model, "flowprune_base", None) is None:
        raise FlowpruneError("checkpoint_dir needs a model built by flowprune.build_model (it carries flowprune_base)")
    shape = tuple(data.input_shape) if is_splits else tuple(data[0][0].shape[1:])
    x_ex = torch.randn(1, *shape)
    work = copy.deepcopy(model).to(dev)
    units0 = find_units(work, x_ex.to(dev), kinds=kinds)
    if not units0:
        raise FlowpruneError(f"the model has no prunable units of kinds {tuple(kinds)}; nothing to prune")
    mm0 = MacsModel(work, units0, x_ex.to(dev))
    if target is not None:
        reach = max_reduction(mm0, units0, min_width, round_to)
        if reach * 1.03 < target:
            raise FlowpruneError(f"target_macs {target:g}x cannot be reached: with every unit at min_width={min_width} "
                                 f"the model has {reach:.2f}x fewer MACs at most; allowed: 1 < target_macs <= "
                                 f"{reach:.2f}")
    sizes0 = {u.name: u.size for u in units0}
    dense_macs, dense_params = count_macs_params(work, shape)
    targets = macs_schedule(target, steps, schedule) if target is not None else ratio_schedule(ratio, steps, schedule)
    ft_cfg = finetune_config or TrainConfig(lr=0.01, seed=seed)
    config = {"method": method, "target_macs": target, "ratio": ratio, "steps": steps, "schedule": schedule,
              "budget": budget, "calib_batches": calib_batches, "calib_batch_size": calib_batch_size,
              "finetune_epochs": finetune_epochs, "final_finetune_epochs": final_finetune_epochs,
              "min_width": min_width, "round_to": round_to, "seed": seed, "normalize": normalize,
              "score_options": score_options or {}, "reestimate_bn": reestimate_bn, "compensate": compensate,
              "finetune_config": asdict(ft_cfg) if hasattr(ft_cfg, "__dataclass_fields__") else None}
    eval_loader = _eval_loader(data) if measure else None
    history: list[dict] = []
    start = 0
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
        state_file = ckpt / "state.json"
        if state_file.exists():
            state = json.loads(state_file.read_text())
            if state.get("config") != json.loads(json.dumps(config)):
                raise FlowpruneError(f"checkpoint {state_file} was written by a prune run with other arguments; "
                                     "use a fresh checkpoint_dir")
            from flowprune.io import load

            start = int(state["step"])
            history = state["history"]
            if start > 0:
                work = load(ckpt / f"step_{start}").to(dev)
                log.info("resuming prune from step %d of %d", start, steps)
    base = getattr(model, "flowprune_base", None)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc=f"prune {method}")
    for s in range(start, steps):
        rec: dict = {"step": s + 1}
        calib = (data.calibration_batches(calib_batch_size, calib_batches, seed=seed * 1000 + s)
                 if is_splits else list(data))
        t0 = time.perf_counter()
        units = find_units(work, x_ex.to(dev), kinds=kinds)
        scores = scorer(work, units, calib)
        rec["seconds_score"] = time.perf_counter() - t0
        cur_macs = MacsModel(work, units, x_ex.to(dev))
        if target is not None:
            step_target = targets[s] * cur_macs.total / dense_macs
            rec["target"] = targets[s]
            if step_target <= 1.0 + 1e-9:
                plan = None
            else:
                plan = _plan(work, units, scores, x_ex.to(dev), target_macs=step_target, budget=budget,
                             min_width=min_width, round_to=round_to, normalize=normalize, mm=cur_macs)
        else:
            r = targets[s]
            rec["target"] = r
            if budget == "layer":
                w = {u.name: max(1, int(round(sizes0.get(u.name, u.size) * (1 - r)))) for u in units}
                plan = _plan(work, units, scores, x_ex.to(dev), width=w, budget="layer", min_width=min_width,
                             round_to=round_to, normalize=normalize, mm=cur_macs)
            else:
                total0 = sum(sizes0.values())
                cur = sum(u.size for u in units)
                r_cur = max(0.0, min(0.999999, 1 - total0 * (1 - r) / max(cur, 1)))
                plan = _plan(work, units, scores, x_ex.to(dev), ratio=r_cur, budget="global", min_width=min_width,
                             round_to=round_to, normalize=normalize, mm=cur_macs)
        t0 = time.perf_counter()
        if plan is not None and compensate:
            from flowprune.compensate import compensate_means, consumer_input_means

            rec["compensated"] = compensate_means(work, units, plan, consumer_input_means(work, units, calib))
            if rec["compensated"]:
                plan.cut_model = None  # the verified cut copy predates the compensation: cut again
        if plan is not None:
            cut = getattr(plan, "cut_model", None)
            work = cut if cut is not None else apply_cuts(work, plan, example_inputs=x_ex.to(dev))
            rec["plan_note"] = plan.note
            widths_now = dict(plan.widths)
        else:
            widths_now = {u.name: u.size for u in units}
        rec["seconds_cut"] = time.perf_counter() - t0
        if base is not None:
            work.flowprune_base = base
        macs, params = count_macs_params(work, shape)
        rec.update(macs=macs, params=params, reduction=dense_macs / max(macs, 1))
        rec["widths"] = widths_now
        if eval_loader is not None:
            rec["acc_cut"] = accuracy(work, eval_loader)
        if reestimate_bn and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in work.modules()):
            bn_reestimate(work, [b for b in calib])
            if eval_loader is not None:
                rec["acc_bn"] = accuracy(work, eval_loader)
        epochs = finetune_epochs if s < steps - 1 else final_finetune_epochs
        if epochs > 0:
            t0 = time.perf_counter()
            fit(work, data, ft_cfg, epochs=epochs, checkpoint_dir=(ckpt / f"ft_{s + 1}") if ckpt else None,
                progress=progress, device=dev, amp=amp)
            rec["seconds_finetune"] = time.perf_counter() - t0
            if eval_loader is not None:
                rec["acc_ft"] = accuracy(work, eval_loader)
        history.append(rec)
        from flowprune.distributed import is_main

        if ckpt is not None and is_main():
            from flowprune.io import save

            save(work, ckpt / f"step_{s + 1}", metadata={"stage": "pruned", "step": s + 1, "method": method,
                                                         "cuts": getattr(work, "flowprune_metadata", {}).get("cuts", [])})
            tmp = ckpt / "state.json.tmp"
            tmp.write_text(json.dumps({"step": s + 1, "config": config, "history": history}, indent=1))
            os.replace(tmp, ckpt / "state.json")
        if on_step is not None:
            on_step(rec, work)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    macs, params = count_macs_params(work, shape)
    final_widths = history[-1]["widths"] if history else sizes0
    return PruneResult(model=work, history=history, widths=dict(final_widths), macs=macs,
                       params=params, dense_macs=dense_macs, dense_params=dense_params, method=method, config=config,
                       unsupported=list(units0.unsupported))


def resolve_steps(steps: int | str, target: float | None) -> int:
    """``steps`` as a count: an int >= 1, or ``"auto"`` = ceil(log2(target)) (1 without a MACs target)."""
    import math

    if steps == "auto":
        return max(1, math.ceil(math.log2(target) - 1e-9)) if target is not None else 1
    if isinstance(steps, str):
        raise FlowpruneError(f"steps must be a positive integer or 'auto', got {steps!r}")
    return check_positive_int("steps", steps)


def _plan(model, units, scores, x, *, mm, **kw):
    from flowprune.plan import plan_cuts

    return plan_cuts(model, units, scores, example_inputs=x, macs_model=mm, **kw)
