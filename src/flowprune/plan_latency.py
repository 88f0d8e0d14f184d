"""Budgets for a latency target: which units to remove so the model runs ``target_speedup`` x faster.

The allocation is HALP's latency-saliency knapsack solved greedily: starting from the current
widths, the unit whose next step down (to the next multiple of the device's width multiple,
:attr:`flowprune.latency.LatencyModel.multiple`) loses the least *normalised* score per second of
*predicted* latency saved goes first (the saving is read from the per-layer lookup tables at the
widths of every neighbouring unit at that moment), until the predicted latency is at most the
dense model's divided by the target. Scores are normalised as in the global budget
(:func:`flowprune.plan.normalised`, ``unit`` by default), so units of different layers compare.

The lookup tables predict only what they time (convolutions, linears, norms); what they do not
(activations, additions, overhead) is a constant. With ``verify`` (what :func:`flowprune.prune`
passes), the planned widths are cut on a copy and the copy is timed against the dense model with
the timing harness at the target batch size; when the measured speed-up is more than
``tolerance`` off the target, the predicted target is scaled by ``target / measured`` and the
allocation redone (up to ``corrections`` times); the try nearest the target is kept.

A target beyond what every unit at its floor gives (the latency model's prediction) raises
:class:`~flowprune.errors.FlowpruneError` naming the largest reachable speed-up, before any work
(:func:`check_reachable_speedup`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from flowprune.errors import FlowpruneError
from flowprune.latency import LatencyModel, parse_speedup

TOLERANCE = 0.05  # the planner's own aim; the benchmark's goal is 10%


def check_reachable_speedup(lm: LatencyModel, target: float, *, what: str = "target_speedup") -> float:
    """Raise :class:`FlowpruneError` when ``target`` is beyond the predicted speed-up with every unit at
    its floor; else return that largest speed-up."""
    reach = lm.max_speedup()
    if reach < target:
        k = lm.key
        raise FlowpruneError(f"{what} {target:g}x cannot be reached on {k['device']} at batch {k['batch_size']} "
                             f"({k['backend']}): with every unit at its smallest width the latency model predicts "
                             f"{reach:.2f}x at most; allowed: 1 < {what} <= {reach:.2f}")
    return reach


class _Greedy:
    """The greedy knapsack (see the module docstring) on one latency model and one set of scores."""

    def __init__(self, lm: LatencyModel, units: Sequence, norm: Mapping[str, torch.Tensor]):
        self.lm, self.units = lm, [u for u in units if u.name in lm.sizes]
        self.size = {u.name: u.size for u in self.units}
        self.sorted = {u.name: torch.sort(norm[u.name]).values.tolist() for u in self.units}
        self.layers_of = {u.name: [i for i, lay in enumerate(lm.layers) if u.name in lay.units] for u in self.units}
        self.neighbours = {n: {v for i in ids for v in lm.layers[i].units} for n, ids in self.layers_of.items()}

    def _next(self, w: dict[str, int], n: str) -> int | None:
        step, floor = self.lm.steps.get(n, 1), self.lm.floors.get(n, self.size[n])
        nw = ((w[n] - 1) // step) * step
        return nw if nw >= floor and nw >= 1 else None

    def _candidate(self, w: dict[str, int], cur: list[float], n: str):
        nw = self._next(w, n)
        if nw is None:
            return None
        trial = {**w, n: nw}
        new = {i: self.lm.layer_time(self.lm.layers[i], trial) for i in self.layers_of[n]}
        saving = sum(cur[i] - t for i, t in new.items())
        removed = self.size[n] - w[n]
        lost = float(sum(self.sorted[n][removed: removed + w[n] - nw]))
        ratio = lost / saving if saving > 0 else float("inf")
        return ratio, lost, nw, new, saving

    def widths(self, target_s: float) -> dict[str, int]:
        """Widths whose predicted latency is at most ``target_s`` (or every unit at its floor)."""
        lm = self.lm
        w = {n: s for n, s in self.size.items()}
        cur = [lm.layer_time(lay, w) for lay in lm.layers]
        total = lm.fixed_s + lm.scale * sum(cur)
        cand = {n: self._candidate(w, cur, n) for n in w}
        while total > target_s:
            live = [(c[0], c[1], n) for n, c in cand.items() if c is not None]
            if not live:
                break
            _, _, n = min(live)  # least score per second saved; among zero savings, least score lost
            _, _, nw, new, saving = cand[n]
            w[n] = nw
            for i, t in new.items():
                cur[i] = t
            total -= lm.scale * saving
            for v in self.neighbours[n] | {n}:
                if v in w:
                    cand[v] = self._candidate(w, cur, v)
        return w


def plan_for_speedup(model: nn.Module, units: Sequence, scores: Mapping[str, torch.Tensor], *,
                     latency_model: LatencyModel, target_speedup: float | str, example_inputs: torch.Tensor,
                     normalize: str = "unit", macs_model=None,
                     verify: Callable[[dict[str, int]], tuple[float, nn.Module]] | None = None,
                     tolerance: float = TOLERANCE, corrections: int = 2):
    """A :class:`~flowprune.plan.CutPlan` whose widths make ``latency_model`` predict ``target_speedup``
    (a speed-up over the dense model the latency model was built on).

    Besides the plan's usual attributes it has ``speedup_target``, ``predicted_speedup``,
    ``measured_speedup`` (with ``verify``; else None) and ``tries`` (one dict per allocation).
    ``verify(widths) -> (measured speed-up, cut copy)`` enables the correction loop.
    """
    from flowprune.plan import MacsModel, _check_plan_inputs, _make_plan, normalised

    target = parse_speedup(target_speedup)
    units = list(units)
    _check_plan_inputs(units, scores, None)
    reach = check_reachable_speedup(latency_model, target)
    greedy = _Greedy(latency_model, units, normalised(units, scores, normalize, model))
    full = latency_model.latency({})
    t_est, tries, best = target, [], None
    for _ in range(1 + (corrections if verify is not None else 0)):
        widths = greedy.widths(full / t_est)
        pred = latency_model.speedup(widths)
        measured, cut = verify(widths) if verify is not None else (None, None)
        tries.append({"aim": t_est, "predicted": pred, "measured": measured})
        err = abs((measured if measured is not None else pred) / target - 1)
        if best is None or err < best[0]:
            best = (err, widths, pred, measured, cut)
        if measured is None or err <= tolerance:
            break
        t_est = min(max(t_est * target / measured, 1.0 + 1e-6), reach)
    _, widths, pred, measured, cut = best
    mm = macs_model or MacsModel(model, units, example_inputs)
    note = (f"latency budget (utility per predicted second saved, widths multiples of {latency_model.multiple}): "
            f"predicted {pred:.2f}x" + (f", measured {measured:.2f}x" if measured is not None else "")
            + f" for target {target:g}x")
    plan = _make_plan(units, scores, widths, mm, None, None, cut, note)
    plan.speedup_target, plan.predicted_speedup, plan.measured_speedup = target, pred, measured
    plan.tries = tries
    return plan


def make_verifier(dense: nn.Module, model: nn.Module, units: Sequence, scores: Mapping[str, torch.Tensor],
                  lm: LatencyModel, example: torch.Tensor) -> Callable[[dict[str, int]], tuple[float, nn.Module]]:
    """``verify(widths)``: cut ``model`` to ``widths`` (lowest scores out) and time it against ``dense``
    at the latency model's batch size with its timer; returns (measured speed-up, the cut copy)."""
    from flowprune.cut import apply_cuts

    def verify(widths: dict[str, int]) -> tuple[float, nn.Module]:
        cuts = {u.name: torch.argsort(scores[u.name].double(), stable=True)[: u.size - widths[u.name]]
                for u in units}
        cut = apply_cuts(model, cuts, example_inputs=example[:1])
        x = torch.randn(lm.key["batch_size"], *example.shape[1:])
        t = lm.timer.models({"dense": dense, "pruned": cut}, x)
        return t.median["dense"] / t.median["pruned"], cut

    return verify


def speed_check(dense: nn.Module, pruned: nn.Module, lm: LatencyModel, example: torch.Tensor, target: float,
                macs_reduction: float) -> dict:
    """The measured speed-up of ``pruned`` over ``dense`` at the target batch and at batch 1, with the
    harness, next to the target and the MACs reduction (what :func:`flowprune.prune` reports)."""
    b = int(lm.key["batch_size"])
    out = {"target_speedup": target, "batch_size": b, "device": lm.key["device"], "backend": lm.key["backend"],
           "macs_reduction": macs_reduction, "multiple": lm.multiple}
    for bs in sorted({b, 1}):
        t = lm.timer.models({"dense": dense, "pruned": pruned}, torch.randn(bs, *example.shape[1:]))
        out[f"measured_speedup_b{bs}"] = t.median["dense"] / t.median["pruned"]
        if hasattr(t, "describe"):
            out[f"timing_b{bs}"] = t.describe()
    got = out[f"measured_speedup_b{b}"]
    out["within_10pct"] = abs(got / target - 1) <= 0.10
    return out
