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
import logging
import os
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from flowprune.errors import FlowpruneError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- surgery

from flowprune.cut import _example, apply_cuts, cut_heads  # noqa: E402,F401 -- surgery lives in flowprune.cut

# ----------------------------------------------------------------------------------------- procedure
from flowprune.pruning.prune_config import (  # noqa: E402,F401 -- the config and result live there
    DEFAULT_BUDGET,
    DEFAULT_COMPENSATE,
    DEFAULT_NORMALIZE,
    PruneConfig,
    PruneResult,
    resolve_steps,
)


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


def _example_input(data, shape: tuple) -> torch.Tensor:
    """One input: a random float batch of ``shape``, or the data's first sample for integer inputs
    (token ids, which a random float tensor cannot stand for)."""
    from flowprune.data import DataSplits

    x = data.train.tensors[0] if isinstance(data, DataSplits) else data[0][0]
    if x.is_floating_point():
        return torch.randn(1, *shape)
    return x[:1].clone()


def _eval_loader(data):
    from flowprune.data import DataSplits, make_loader

    if isinstance(data, DataSplits):
        return make_loader(data.test if len(data.test) else data.val, 512)
    return None


def prune(model: nn.Module, data, config: PruneConfig | dict | str | None = None, *,
          checkpoint_dir: str | os.PathLike | None = None, progress: bool | None = None,
          on_step: Callable[[dict, nn.Module], None] | None = None,
          device: str | torch.device | None = None, amp: str | None = None, teacher: nn.Module | None = None,
          latency_model=None, latency_cache=None, **overrides) -> PruneResult:
    """Prune ``model`` by a score to ``target_macs`` (or ``ratio``); returns a :class:`PruneResult`.

    Called like every procedure: ``prune(model, data, config=None, **overrides)`` with a
    :class:`PruneConfig` (or a dict of its fields) and/or its fields as keywords; a string in the
    config position is the ``method`` (``prune(m, data, "l1", ratio=0.5)``).

    The caller's model is never changed. Each step: score on ``calib_batches`` fresh calibration
    batches (seeded by ``seed`` and the step) -> plan -> cut (:func:`flowprune.step.plan_and_cut`)
    -> re-estimate BatchNorm statistics on the same batches (``reestimate_bn``) -> fine-tune
    ``finetune_epochs`` (if > 0 and not the last step) ; after the last step, fine-tune
    ``final_finetune_epochs``. Accuracy on the test split is recorded after the cut, after BN
    re-estimation and after fine-tuning (``measure``).

    Config fields:
        method: a registered score (``flowprune.scores.list_scores()``).
        target_macs: reduction factor (4.0 or "4x" = 4x fewer MACs than the input model).
        ratio: fraction of every unit's width to remove, in [0, 1) (exclusive with target_macs).
        steps, schedule: iterative schedule (``geometric`` or ``linear``; see :mod:`flowprune.schedules`).
            ``steps="auto"``: one step per halving of the MACs (``ceil(log2(target_macs))``; 1 for a
            ratio), each step re-scored on fresh batches after BN re-estimation.
        budget: ``global`` (default), ``layer`` or ``macs`` (see :mod:`flowprune.plan`).
        finetune_config: a :class:`flowprune.train.TrainConfig` (epochs are overridden).
        score_options: options of the score (e.g. ``{"abs_mode": "after_sum"}`` for AGF).
        compensate: fold the calibration mean of every removed channel into its consumers' biases
            before the cut (:mod:`flowprune.compensate`; statistics only, no training).
        kinds, min_width, round_to, normalize, calib_batches, calib_batch_size, seed, measure.
        target_speedup: prune to a measured speed-up (3.0 or "3x") on ``device`` at ``batch_size``
            with ``backend`` (``eager``) instead of a MACs target: a per-layer latency lookup table
            measured on the device (:mod:`flowprune.latency`, cached on disk) and a utility per
            second saved allocation (:mod:`flowprune.plan_latency`); the result's ``latency`` holds
            the target, the predicted and the measured speed-up at ``batch_size`` and at batch 1.
        recovery: the recovery recipe after each cut (:mod:`flowprune.recover`): ``kd`` (default,
            distillation from the input model with warm-up + cosine; docs/recovery.md) or
            ``finetune`` (plain fine-tuning, the earlier behaviour). ``recovery_options``: its
            options (``temperature``, ``alpha``, ``warmup_fraction``, ``lr``).
        recovery_epochs: one total budget of recovery epochs the steps share
            (:func:`flowprune.recover.split_epochs`; fewer epochs than steps is an error); exclusive
            with ``finetune_epochs`` / ``final_finetune_epochs``.

    Run options (not part of the config):
        data: a :class:`flowprune.data.DataSplits` (or a list of (x, y) batches: calibration only,
            no fine-tuning, no accuracy).
        checkpoint_dir: after step K, ``DIR/step_K`` (flowprune.io format) and ``DIR/state.json``;
            a rerun with the same arguments resumes after the last finished step.
        on_step: ``f(step_record, model)`` called after every step (e.g. for logging).
        device: where the work runs (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``; default: the
            model's device); the result lives there. ``amp``: mixed precision of the fine-tuning
            (``none``, ``bf16``, ``fp16``; see :func:`flowprune.train.fit`). Under torchrun the
            calibration batches and fine-tuning are shared by the ranks (:mod:`flowprune.distributed`)
            and only rank 0 writes ``checkpoint_dir``.
        latency_model: with ``target_speedup``, a prebuilt :class:`flowprune.latency.LatencyModel` of
            ``model`` (else one is built or loaded from ``latency_cache``: a directory, ``None`` for the
            default cache, ``False`` for none).
        teacher: the model ``kd`` distils from (default: ``model`` itself, the dense network; used
            in eval mode without gradients, never changed); its classes must match.
    """
    if isinstance(config, str):
        overrides = {"method": config, **overrides}
        config = None
    cfg = PruneConfig.resolve(config, overrides)
    if not isinstance(model, nn.Module):
        raise FlowpruneError(f"model must be a torch nn.Module, got {type(model).__name__}")
    from flowprune import notices
    from flowprune.hf.adapter import as_tensor_model

    with notices.collect() as warned:  # each warning once per run; the full list in the result
        run = _PruneRun(as_tensor_model(model), data, cfg, device=device, amp=amp, checkpoint_dir=checkpoint_dir,
                        progress=progress, teacher=teacher, latency=(latency_model, latency_cache))
        res = run.execute(on_step=on_step)
    res.warnings = [dict(w) for w in warned]
    return res


class _PruneRun:
    """One run of :func:`prune`: the working copy, the dense reference and the checkpoint."""

    def __init__(self, model: nn.Module, data, cfg: PruneConfig, *, device, amp, checkpoint_dir, progress,
                 teacher: nn.Module | None = None, latency=(None, None)):
        from flowprune.data import DataSplits
        from flowprune.device import check_amp, default_amp, resolve_device
        from flowprune.scores import get_score

        self.cfg, self.progress = cfg, progress
        self.scorer = get_score(cfg.method, **(cfg.score_options or {}))
        self.dev = resolve_device(device, model)
        self.amp = check_amp(default_amp() if amp is None else amp, self.dev)
        _check_data(data, model)
        self.data, self.is_splits = data, isinstance(data, DataSplits)
        self.epochs = cfg.step_epochs()
        if any(self.epochs) and not self.is_splits:
            raise FlowpruneError("fine-tuning needs a DataSplits (load_dataset(...)), not a list of batches")
        if checkpoint_dir is not None and getattr(model, "flowprune_base", None) is None:
            raise FlowpruneError("checkpoint_dir needs a model built by flowprune.build_model (it carries flowprune_base)")
        self.base = getattr(model, "flowprune_base", None)
        self.shape = tuple(data.input_shape) if self.is_splits else tuple(data[0][0].shape[1:])
        self.example = _example_input(data, self.shape).to(self.dev)
        self.work = copy.deepcopy(model).to(self.dev)
        self.lm, self.dense = latency[0], None
        self._check_units(latency[1])
        self.eval_loader = _eval_loader(data) if cfg.measure else None
        self.ft_cfg = cfg.effective_finetune_config()
        self.recipe = cfg.recipe()
        self.teacher = None
        if self.recipe.uses_teacher and any(self.epochs):
            from flowprune.recover import check_teacher

            self.teacher = teacher if teacher is not None else model  # recover() copies it, in eval mode
            check_teacher(self.teacher, self.work, self.example)
        self.state = None
        if checkpoint_dir is not None:
            from flowprune.runstate import RunState

            self.state = RunState(checkpoint_dir, "prune", self.cfg.record())

    def _check_units(self, latency_cache=None) -> None:
        from flowprune.measure import count_macs_params
        from flowprune.plan import MacsModel, check_reachable
        from flowprune.schedules import macs_schedule, ratio_schedule
        from flowprune.units import find_units

        cfg = self.cfg
        self.units0 = find_units(self.work, self.example, kinds=cfg.kinds)
        if not self.units0:
            raise FlowpruneError(f"the model has no prunable units of kinds {tuple(cfg.kinds)}; nothing to prune")
        if cfg.target_macs is not None:
            check_reachable(MacsModel(self.work, self.units0, self.example), self.units0, cfg.target_macs,
                            cfg.min_width, cfg.round_to)
        if cfg.target_speedup is not None:
            self._latency_model(latency_cache)
        self.sizes0 = {u.name: u.size for u in self.units0}
        self.dense_macs, self.dense_params = count_macs_params(self.work, example_inputs=self.example)
        goal = cfg.target_macs or cfg.target_speedup
        self.targets = (macs_schedule(goal, cfg.steps, cfg.schedule) if goal is not None
                        else ratio_schedule(cfg.ratio, cfg.steps, cfg.schedule))

    def _latency_model(self, cache) -> None:
        """With ``target_speedup``: the latency model of the dense model (built, loaded or given) and the
        reachability check, before any scoring; the dense copy every speed-up is measured against."""
        from flowprune.latency import build_latency_model
        from flowprune.plan_latency import check_reachable_speedup

        cfg = self.cfg
        if self.lm is None:
            self.lm = build_latency_model(self.work, self.units0, self.example, batch_size=cfg.batch_size,
                                          device=self.dev, backend=cfg.backend, min_width=cfg.min_width,
                                          multiple=cfg.round_to if cfg.round_to > 1 else None, cache=cache)
        check_reachable_speedup(self.lm, cfg.target_speedup)
        self.dense = copy.deepcopy(self.work)

    def _resume(self) -> tuple[int, list[dict]]:
        if self.state is None:
            return 0, []
        saved = self.state.load()
        if saved is None:
            return 0, []
        start = int(saved["step"])
        if start > 0:
            self.work = self.state.load_model(f"step_{start}").to(self.dev)
            log.info("resuming prune from step %d of %d", start, self.cfg.steps)
        return start, saved["history"]

    def execute(self, *, on_step) -> PruneResult:
        from flowprune.measure import count_macs_params

        start, history = self._resume()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.cfg.steps, initial=start, desc=f"prune {self.cfg.method}")
        for s in range(start, self.cfg.steps):
            rec = self.step(s)
            history.append(rec)
            self._checkpoint(s, history)
            if on_step is not None:
                on_step(rec, self.work)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        macs, params = count_macs_params(self.work, example_inputs=self.example)
        final_widths = history[-1]["widths"] if history else self.sizes0
        latency = {}
        if self.lm is not None and self.cfg.target_speedup is not None:
            from flowprune.plan_latency import speed_check

            latency = speed_check(self.dense, self.work, self.lm, self.example, self.cfg.target_speedup,
                                  self.dense_macs / max(macs, 1))
            latency["predicted_speedup"] = history[-1].get("predicted_speedup") if history else None
        from flowprune.hf.adapter import unwrap

        return PruneResult(latency=latency, model=unwrap(self.work), history=history, widths=dict(final_widths), macs=macs, params=params,
                           dense_macs=self.dense_macs, dense_params=self.dense_params, method=self.cfg.method,
                           config=self.cfg.record(), unsupported=list(self.units0.unsupported))

    def _checkpoint(self, s: int, history: list[dict]) -> None:
        if self.state is None:
            return
        cuts = getattr(self.work, "flowprune_metadata", {}).get("cuts", [])
        self.state.save({"step": s + 1, "history": history}, self.work, model_name=f"step_{s + 1}",
                        metadata={"stage": "pruned", "step": s + 1, "method": self.cfg.method, "cuts": cuts})

    def step(self, s: int) -> dict:
        """Step ``s``: score -> plan -> cut -> measure -> BN re-estimation -> fine-tune."""
        from flowprune.plan import MacsModel
        from flowprune.units import find_units

        cfg, rec = self.cfg, {"step": s + 1}
        calib = (self.data.calibration_batches(cfg.calib_batch_size, cfg.calib_batches, seed=cfg.seed * 1000 + s)
                 if self.is_splits else list(self.data))
        t0 = time.perf_counter()
        units = find_units(self.work, self.example, kinds=cfg.kinds)
        scores = self.scorer(self.work, units, calib)
        rec["seconds_score"] = time.perf_counter() - t0
        mm = MacsModel(self.work, units, self.example)
        budget_kw = self._step_budget(s, units, mm, rec)
        t0 = time.perf_counter()
        if budget_kw is not None:
            from flowprune.step import plan_and_cut

            cut = plan_and_cut(self.work, units, scores, calib, example=self.example, compensate=cfg.compensate,
                               macs_model=mm, min_width=cfg.min_width, round_to=cfg.round_to,
                               normalize=cfg.normalize, **budget_kw)
            if cfg.compensate:
                rec["compensated"] = cut.compensated
            self.work, rec["plan_note"], widths_now = cut.model, cut.note, cut.widths
            if cfg.target_speedup is not None:
                rec["predicted_speedup"] = cut.plan.predicted_speedup
                rec["measured_speedup_at_plan"] = cut.plan.measured_speedup
        else:
            widths_now = {u.name: u.size for u in units}
        rec["seconds_cut"] = time.perf_counter() - t0
        if self.base is not None:
            self.work.flowprune_base = self.base
        self._after_cut(s, rec, widths_now, calib)
        return rec

    def _step_budget(self, s: int, units, mm, rec: dict) -> dict | None:
        """The plan_cuts budget of step ``s`` (``None``: this step cuts nothing)."""
        cfg = self.cfg
        rec["target"] = self.targets[s]
        if cfg.target_speedup is not None:
            return {"target_speedup": self.targets[s], "latency_model": self.lm, "dense": self.dense}
        if cfg.target_macs is not None:
            step_target = self.targets[s] * mm.total / self.dense_macs
            return None if step_target <= 1.0 + 1e-9 else {"target_macs": step_target, "budget": cfg.budget}
        r = self.targets[s]
        if cfg.budget == "layer":
            return {"width": {u.name: max(1, int(round(self.sizes0.get(u.name, u.size) * (1 - r)))) for u in units},
                    "budget": "layer"}
        total0, cur = sum(self.sizes0.values()), sum(u.size for u in units)
        return {"ratio": max(0.0, min(0.999999, 1 - total0 * (1 - r) / max(cur, 1))), "budget": "global"}

    def _after_cut(self, s: int, rec: dict, widths_now: dict, calib) -> None:
        from flowprune.measure import accuracy, count_macs_params
        from flowprune.train import reestimate_bn as bn_reestimate

        cfg, work = self.cfg, self.work
        macs, params = count_macs_params(work, example_inputs=self.example)
        rec.update(macs=macs, params=params, reduction=self.dense_macs / max(macs, 1), widths=widths_now)
        if self.eval_loader is not None:
            rec["acc_cut"] = accuracy(work, self.eval_loader)
        if cfg.reestimate_bn and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in work.modules()):
            bn_reestimate(work, list(calib))
            if self.eval_loader is not None:
                rec["acc_bn"] = accuracy(work, self.eval_loader)
        epochs = self.epochs[s]
        if epochs > 0:
            from flowprune.recover import recover

            ckpt = self.state.dir / f"ft_{s + 1}" if self.state is not None else None
            rr = recover(work, self.data, epochs, self.recipe, teacher=self.teacher, seed=self.ft_cfg.seed,
                         train_config=self.ft_cfg, checkpoint_dir=ckpt, progress=self.progress, device=self.dev,
                         amp=self.amp)
            rec.update(seconds_finetune=rr["seconds"], recovery_epochs=epochs,
                       teacher_forwards=rr["teacher_forwards"])
            if self.eval_loader is not None:
                rec["acc_ft"] = accuracy(work, self.eval_loader)
