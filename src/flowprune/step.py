"""The one cut step every procedure takes: plan -> compensate -> cut.

``prune`` (every step of its schedule), ``compare`` (every flowprune method) and ``idap`` (every
stage-1 step) call :func:`plan_and_cut` with scores they computed; BatchNorm re-estimation
(:func:`flowprune.train.reestimate_bn`) follows it where the procedure wants it, after it has
measured the accuracy of the bare cut. The one check that a MACs target can be met at all,
run before any scoring, is :func:`flowprune.plan.check_reachable`.

Layering: this module sits above :mod:`flowprune.plan`, :mod:`flowprune.cut` and
:mod:`flowprune.compensate`, and below the procedures (:mod:`flowprune.pruning`, :mod:`flowprune.compare`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class CutStep:
    """What one cut step produced: the cut ``model``, the ``plan`` and the compensated consumers."""

    model: nn.Module
    plan: dict
    compensated: list[str] = field(default_factory=list)

    @property
    def note(self) -> str:
        return getattr(self.plan, "note", "")

    @property
    def widths(self) -> dict[str, int]:
        return dict(getattr(self.plan, "widths", {}) or {})


def plan_and_cut(model: nn.Module, units, scores: dict, calib: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
                 example: torch.Tensor, compensate: bool = True, macs_model=None, **plan_kw) -> CutStep:
    """Plan the cuts of ``units`` from ``scores``, fold the removed means in, and cut.

    ``plan_kw`` goes to :func:`flowprune.plan.plan_cuts` (``target_macs``, ``ratio`` or ``width``,
    ``budget``, ``normalize``, ``min_width``, ``round_to``), or with ``target_speedup`` (and
    ``latency_model``, optionally ``dense``: the model to measure the speed-up against) to
    :func:`flowprune.plan_latency.plan_for_speedup` (widths and floors come from the latency model). With ``compensate`` the calibration
    mean of every removed channel is folded into its consumers' biases first
    (:mod:`flowprune.compensate`): this **changes ``model``'s consumer biases in place**, so pass a
    model you own (a procedure's working copy). The cut model is a new module; with a verified
    MACs target and no compensation it is the plan's own cut copy.
    """
    from flowprune.cut import apply_cuts
    from flowprune.plan import plan_cuts

    if "target_speedup" in plan_kw:  # a latency target: flowprune.plan_latency
        from flowprune.plan_latency import make_verifier, plan_for_speedup

        lm, dense = plan_kw["latency_model"], plan_kw.get("dense")
        verify = make_verifier(dense, model, units, scores, lm, example) if dense is not None else None
        plan = plan_for_speedup(model, units, scores, latency_model=lm, target_speedup=plan_kw["target_speedup"],
                                example_inputs=example, normalize=plan_kw.get("normalize", "unit"),
                                macs_model=macs_model, verify=verify)
    else:
        plan = plan_cuts(model, units, scores, example_inputs=example, macs_model=macs_model, **plan_kw)
    compensated: list[str] = []
    if compensate:
        from flowprune.compensate import compensate_means, consumer_input_means

        compensated = compensate_means(model, units, plan, consumer_input_means(model, units, calib))
    cut = getattr(plan, "cut_model", None)
    if cut is None or compensated:  # the verified cut copy predates the compensation: cut again
        cut = apply_cuts(model, plan, example_inputs=example)
    return CutStep(model=cut, plan=plan, compensated=compensated)

