"""A new pruning procedure in one file: AGF scores with a per-layer budget instead of the global ranking.

Every unit keeps the same share of its width, chosen by bisection so the model lands on the MACs
target. Once this module is imported, ``flowprune.compare(dense, data, methods="agf,agf-layer,...")``
and ``flowprune compare --methods agf-layer`` run it next to every other method on the same
calibration batches, BatchNorm re-estimation and fine-tuning.
"""

from __future__ import annotations

import copy

from flowprune.measure import count_macs_params
from flowprune.procedures import CutContext, Pruned, PruningProcedure, register_procedure
from flowprune.scores import get_score
from flowprune.step import plan_and_cut
from flowprune.units import find_units


@register_procedure("agf-layer")
class AgfPerLayer(PruningProcedure):
    """AGF scores; every unit cut by the same ratio (``budget="layer"``), the ratio bisected to the target."""

    def cut(self, model, target: float, ctx: CutContext) -> Pruned:
        dense_macs, _ = count_macs_params(model, ctx.input_shape)
        lo, hi, best = 0.0, 0.95, None
        for _ in range(12):  # bisection on the per-unit ratio
            ratio = (lo + hi) / 2
            work = copy.deepcopy(model).eval()
            example = ctx.example(work)
            units = find_units(work, example)
            scores = get_score("agf")(work, units, list(ctx.batches))
            widths = {u.name: max(1, round(u.size * (1 - ratio))) for u in units}
            step = plan_and_cut(work, units, scores, list(ctx.batches), example=example, width=widths,
                                budget="layer", compensate=True)
            reached = dense_macs / max(count_macs_params(step.model, ctx.input_shape)[0], 1)
            if best is None or abs(reached / target - 1) < abs(best[1] / target - 1):
                best = (step.model, reached, ratio)
            if abs(reached / target - 1) <= ctx.tol:
                break
            lo, hi = (ratio, hi) if reached < target else (lo, ratio)
        pruned, reached, ratio = best
        pruned.flowprune_base = getattr(model, "flowprune_base", None)
        return Pruned(pruned.eval(), {"ratio": ratio, "achieved": reached})
