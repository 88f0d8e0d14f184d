"""One procedure per registered score: flowprune's score -> plan -> compensate -> cut, one-shot."""

from __future__ import annotations

import copy

import torch
from torch import nn

from flowprune.procedures.base import CutContext, Pruned, PruningProcedure, register_family
from flowprune.scores import get_score, list_scores


class ScoredProcedure(PruningProcedure):
    """Score with ``score`` on the calibration batches, plan to the MACs target, cut.

    The plan uses ``flowprune.prune``'s defaults (``DEFAULT_BUDGET``, ``DEFAULT_NORMALIZE``) unless
    ``ctx.plan_options`` says otherwise; ``ctx.compensate`` (default ``DEFAULT_COMPENSATE``) folds
    the removed channels' calibration means into their consumers' biases before the cut.
    """

    def __init__(self, score: str):
        self.score = score

    def make_score(self, ctx: CutContext):
        opts = dict(ctx.score_options.get(self.score, {}) or {})
        if self.score == "random" and "seed" not in opts:
            opts["seed"] = ctx.seed
        return get_score(self.score, **opts)

    def cut(self, model: nn.Module, target: float, ctx: CutContext) -> Pruned:
        from flowprune.pruning.structural import DEFAULT_BUDGET, DEFAULT_COMPENSATE, DEFAULT_NORMALIZE
        from flowprune.step import plan_and_cut
        from flowprune.units import find_units

        po = {"budget": DEFAULT_BUDGET, "normalize": DEFAULT_NORMALIZE, **(ctx.plan_options or {})}
        compensate = DEFAULT_COMPENSATE if ctx.compensate is None else ctx.compensate
        work = copy.deepcopy(model).eval()
        example = ctx.example(work)
        units = find_units(work, example)  # found on this copy: units hold references to its modules
        torch.manual_seed(ctx.seed)
        scores = self.make_score(ctx)(work, units, list(ctx.batches))
        step = plan_and_cut(work, units, scores, list(ctx.batches), example=example, compensate=compensate,
                            target_macs=target, **po)
        step.model.flowprune_base = getattr(model, "flowprune_base", None)
        cuts = {k: [int(i) for i in (v.tolist() if hasattr(v, "tolist") else v)] for k, v in step.plan.items()}
        info = {"plan_note": step.note, "widths": step.widths, "compensated": step.compensated}
        return Pruned(step.model.eval(), info, cuts)


@register_family(list_scores)
def _scored(name: str) -> PruningProcedure:
    return ScoredProcedure(name)
