"""Budgets: which units to remove, given scores. Per-layer top-k, global ranking, MACs targets.

:func:`plan_cuts` turns ``{unit.name: scores}`` into ``{unit.name: indices to remove}``:

* ``budget="layer"`` (default, the AGF paper's procedure): every unit keeps its top-k, with k
  from a width (``width=k``, or a dict per unit name) or a ratio (k = round(size * (1 - ratio))).
* ``budget="global"``: one ranking over all units of the *normalised* scores. Raw scores are not
  comparable across layers, so each score is divided by a block statistic first
  (``normalize``): ``"unit"`` -- the mean score of its own unit (default; "U_c / mean U over its
  block" with the unit as the block), ``"block"`` -- the mean over every unit whose root shares the
  same parent block (a residual block, a transformer block; a unit directly inside a plain
  ``Sequential`` is its own block, see :func:`block_of`), ``"none"`` -- raw scores.
* ``budget="macs"``: one global ranking by *normalised utility per MAC saved*: starting from the
  full widths, the channel whose removal loses the least normalised score per MAC it saves (exact
  MACs model, recomputed after every removal) goes first, until the MACs target is met. Needs
  ``target_macs``.
* ``target_macs=R`` (a reduction factor, 4.0 = 4x fewer MACs): a search over the budget's own
  knob (the uniform ratio for ``layer``, the global fraction for ``global``) by bisection on an
  exact MACs model (per-layer MACs from Torch-Pruning's counter, scaled by the kept fraction of
  each layer's input and output channels). A uniform ratio moves in jumps on small nets, so when
  the bisection lands more than 3% from the target the plan is refined greedily: the lowest
  normalised channels anywhere are removed one (or ``round_to``) at a time until the target is
  met. The result says what it reached (``plan.reduction``, ``plan.within_tolerance``,
  ``plan.note``). A target beyond what every unit at ``min_width`` gives raises
  :class:`FlowpruneError` before any work (:func:`check_reachable`).

Every unit keeps at least ``min(min_width, size)`` units; kept widths are multiples of
``round_to`` where the unit is at least that wide.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from flowprune.errors import FlowpruneError, bad_choice, check_fraction, check_positive_int

BUDGETS = ("layer", "global", "macs")
NORMALIZE = ("unit", "block", "none")
TOLERANCE = 0.03


class CutPlan(dict):
    """``{unit name: LongTensor of indices to remove}`` plus what the plan reaches.

    Attributes: ``widths`` (kept width per unit), ``macs_before``, ``macs_after`` (exact MACs
    model), ``reduction`` (macs_before / macs_after), ``target`` (the requested reduction or
    None), ``within_tolerance`` (|reduction / target - 1| <= 3%), ``note`` (a sentence on how
    the target was reached or why not), ``cut_model`` (with a verified MACs target: the cut copy
    that was counted, the same as ``apply_cuts(model, plan)``; else None).
    """

    widths: dict[str, int]
    macs_before: int
    macs_after: int
    reduction: float
    target: float | None
    within_tolerance: bool
    note: str
    cut_model: nn.Module | None = None

    def summary(self) -> dict:
        return {"widths": dict(self.widths), "macs_before": self.macs_before, "macs_after": self.macs_after,
                "reduction": self.reduction, "target": self.target, "within_tolerance": self.within_tolerance,
                "note": self.note}


def parse_target(value) -> float:
    """A MACs reduction factor from ``4``, ``4.0``, ``"4x"`` or ``"4"``; must be > 1."""
    v = value
    if isinstance(v, str):
        s = v.strip().lower().rstrip("x")
        try:
            v = float(s)
        except ValueError:
            raise FlowpruneError(f"target_macs must be a reduction factor such as 4 or '4x', got {value!r}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 1.0:
        raise FlowpruneError(f"target_macs must be a reduction factor > 1 (e.g. 4.0 = 4x fewer MACs), got {value!r}")
    return float(v)


class MacsModel:
    """Exact per-sample MACs of the model as a function of each unit's kept width.

    MACs of every leaf layer come from Torch-Pruning's counter once; a layer's MACs scale with
    the kept fraction of its output channels (if a unit cuts them) times the kept fraction of its
    input channels (if a unit cuts them; not for depthwise convs, whose cost is per channel). A
    recurrent module's recurrent and inner-layer weights read its own hidden units: that share of its
    MACs (:func:`flowprune.recurrent.own_width_share`) scales with its kept fraction squared.
    """

    def __init__(self, model: nn.Module, units: Sequence, example_inputs: torch.Tensor):
        import torch_pruning as tp

        from flowprune.device import model_device
        from flowprune.measure import eval_mode
        from flowprune.recurrent import is_recurrent, own_width_share

        dev = model_device(model)
        x = example_inputs[:1] if dev is None else example_inputs[:1].to(dev)
        with eval_mode(model), torch.no_grad():
            total, _params, layer_macs, _ = tp.utils.count_ops_and_params(model, x, layer_wise=True)
        self.total = float(total)
        names = {m: n for n, m in model.named_modules()}
        counted = {m for m, v in layer_macs.items() if v and m in names}
        # the deepest counted modules (Torch-Pruning counts an attention module as a whole)
        # in the model's module order, so the float sums below do not depend on set (hash) order
        leaf = {n: float(layer_macs[m]) for n, m in model.named_modules()
                if m in counted and names[m] == n and not any(c in counted for c in m.modules() if c is not m)}
        self.sizes = {u.name: int(u.size) for u in units}
        out_of: dict[str, str] = {}
        in_of: dict[str, str] = {}
        mods = dict(model.named_modules())
        for u in units:
            if u.kind == "head":
                out_of.setdefault(u.name, u.name)  # the attention module as a whole scales with its heads
            for m in u.producers + u.norms:
                out_of.setdefault(m.module_name, u.name)
            for m in u.consumers:
                mod = mods.get(m.module_name)
                depthwise = isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1 and mod.groups == mod.in_channels
                if not depthwise:
                    in_of.setdefault(m.module_name, u.name)
        own = {n: own_width_share(mods[n]) for n in leaf if is_recurrent(mods[n])}
        self.terms = [(v, out_of.get(n), in_of.get(n), own.get(n, 0.0)) for n, v in leaf.items()
                      if n in out_of or n in in_of]
        self.rest = self.total - sum(t[0] for t in self.terms)

    def macs(self, widths: Mapping[str, int]) -> float:
        def f(name):
            if name is None:
                return 1.0
            return widths.get(name, self.sizes[name]) / self.sizes[name]
        return self.rest + sum(v * f(o) * ((1.0 - q) * f(i) + q * f(o)) for v, o, i, q in self.terms)


def _round_width(k: float, size: int, min_width: int, round_to: int) -> int:
    floor = min(min_width, size)
    k = max(floor, int(round(k)))
    if round_to > 1 and size >= round_to:
        k = max(round_to, int(round(k / round_to)) * round_to)
        if k < floor:
            k = math.ceil(floor / round_to) * round_to
    return int(min(size, k))


def block_of(unit, modules: Mapping[str, nn.Module] | None = None, model: nn.Module | None = None) -> str:
    """The block a unit is normalised over with ``normalize="block"``.

    The unit's enclosing module (a residual block, a transformer block) when that module is a real
    block; when the enclosing module is a plain container (``nn.Sequential``, ``nn.ModuleList``,
    ``nn.ModuleDict``) or the model itself, the unit is its own block (so a plain Sequential net
    gets per-unit normalisation instead of one shared statistic, which would be raw scores).
    ``modules``: ``dict(model.named_modules())``; without it the parent name is used as is.
    """
    parent = unit.block
    if not parent:
        return unit.name
    if modules is None:
        return parent
    m = modules.get(parent)
    if m is None or m is model or isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return unit.name
    return parent


def normalised(units: Sequence, scores: Mapping[str, torch.Tensor], mode: str,
               model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Scores divided by their block statistic (see the module docstring and :func:`block_of`)."""
    out = {}
    if mode == "none":
        return {u.name: scores[u.name].double() for u in units}
    if mode == "unit":
        for u in units:
            s = scores[u.name].double()
            m = s.abs().mean()
            out[u.name] = s / m if m > 0 else s
        return out
    blocks: dict[str, list[torch.Tensor]] = {}
    modules = dict(model.named_modules()) if model is not None else None
    block = {u.name: block_of(u, modules, model) for u in units}
    for u in units:
        blocks.setdefault(block[u.name], []).append(scores[u.name].double())
    mean = {b: torch.cat(v).abs().mean() for b, v in blocks.items()}
    for u in units:
        m = mean[block[u.name]]
        out[u.name] = scores[u.name].double() / m if m > 0 else scores[u.name].double()
    return out


def _layer_widths(units, ratio: float, min_width: int, round_to: int) -> dict[str, int]:
    return {u.name: _round_width(u.size * (1.0 - ratio), u.size, min_width, round_to) for u in units}


def _global_widths(units, norm: Mapping[str, torch.Tensor], ratio: float, min_width: int,
                   round_to: int) -> dict[str, int]:
    total = sum(u.size for u in units)
    n_remove = int(round(ratio * total))
    cand = []
    for u in units:
        s, _ = torch.sort(norm[u.name])  # ascending: removable first
        floor = min(min_width, u.size)
        for j in range(u.size - floor):
            cand.append((float(s[j]), u.name))
    cand.sort(key=lambda t: t[0])
    removed: dict[str, int] = {u.name: 0 for u in units}
    for _, n in cand[:n_remove]:
        removed[n] += 1
    return {u.name: _round_width(u.size - removed[u.name], u.size, min_width, round_to) for u in units}


def check_budget_args(ratio, width, target_macs, budget, min_width, round_to, normalize="unit"):
    """Validate the budget arguments of :func:`plan_cuts` (raises FlowpruneError)."""
    given = [n for n, v in (("ratio", ratio), ("width", width), ("target_macs", target_macs)) if v is not None]
    if len(given) != 1:
        raise FlowpruneError(f"give exactly one of ratio, width, target_macs (got {', '.join(given) or 'none'})")
    if ratio is not None:
        check_fraction("ratio", ratio)
    if width is not None and not isinstance(width, Mapping):
        check_positive_int("width", width)
    if target_macs is not None:
        target_macs = parse_target(target_macs)
    if budget not in BUDGETS:
        raise bad_choice("budget", budget, BUDGETS)
    if normalize not in NORMALIZE:
        raise bad_choice("normalize", normalize, NORMALIZE)
    check_positive_int("min_width", min_width)
    check_positive_int("round_to", round_to)
    if width is not None and budget != "layer":
        raise FlowpruneError(f"width=k is a per-layer budget; use budget='layer' (or ratio/target_macs with "
                             f"{budget!r})")
    if budget == "macs" and target_macs is None:
        raise FlowpruneError("budget='macs' ranks channels by utility per MAC saved and needs target_macs "
                             "(e.g. target_macs=4.0); use budget='global' or 'layer' with a ratio")
    return target_macs


def max_reduction(macs_model: MacsModel, units, min_width: int = 1, round_to: int = 1) -> float:
    """The largest MACs reduction reachable with every unit at its minimum width."""
    w = {u.name: _round_width(0, u.size, min_width, round_to) for u in units}
    return macs_model.total / max(macs_model.macs(w), 1e-9)


def check_reachable(mm: MacsModel, units, target: float, min_width: int = 1, round_to: int = 1, *,
                    what: str = "target_macs") -> float:
    """Raise :class:`FlowpruneError` when a MACs reduction of ``target`` is out of reach (more than 3%
    beyond :func:`max_reduction`, every unit at ``min_width``); else return that largest reduction.

    ``what`` names the argument in the message (``target_macs`` by default).
    """
    reach = max_reduction(mm, units, min_width, round_to)
    if reach * (1 + TOLERANCE) < target:
        raise FlowpruneError(f"{what} {target:g}x cannot be reached: with every unit at min_width={min_width} "
                             f"the model has {reach:.2f}x fewer MACs at most; allowed: 1 < {what} <= "
                             f"{reach:.2f}")
    return reach


def plan_cuts(model: nn.Module, units: Sequence, scores: Mapping[str, torch.Tensor], *,
              example_inputs: torch.Tensor, ratio: float | None = None, width: int | Mapping[str, int] | None = None,
              target_macs: float | str | None = None, budget: str = "layer", min_width: int = 1, round_to: int = 1,
              normalize: str = "unit", macs_model: MacsModel | None = None, verify: bool = True) -> CutPlan:
    """Indices to remove per unit (see the module docstring).

    Args:
        model: the model the units were found on (read only; used for MACs counting).
        units: from :func:`flowprune.units.find_units`.
        scores: ``{unit.name: Tensor(unit.size)}``, higher = keep.
        example_inputs: one input batch (MACs are per sample).
        ratio: fraction of each unit's width to remove (layer) or of all units (global), in [0, 1).
        width: kept width per unit (int for all, or ``{name: k}``); layer budget only.
        target_macs: MACs reduction factor (> 1; ``"4x"`` accepted).
        budget: ``layer`` | ``global``.
        min_width: no unit goes below this width.
        round_to: kept widths are multiples of this.
        normalize: global ranking normalisation: ``unit`` | ``block`` | ``none``.
        macs_model: a :class:`MacsModel` of ``model`` to reuse.
        verify: with ``target_macs``, cut a copy and count its MACs with Torch-Pruning's counter,
            correcting the search if the MACs model was off by more than 3% (up to 3 times).

    Returns:
        a :class:`CutPlan` (a dict name -> sorted LongTensor of indices to remove).
    """
    target = check_budget_args(ratio, width, target_macs, budget, min_width, round_to, normalize)
    units = list(units)
    _check_plan_inputs(units, scores, width)
    mm = macs_model or MacsModel(model, units, example_inputs)
    norm = normalised(units, scores, normalize, model)
    if target is not None:
        reach = check_reachable(mm, units, target, min_width, round_to)
        search = _MacsSearch(units, norm, mm, budget, min_width, round_to)
        widths, note, measured, cut_model = _widths_for_target(model, units, scores, search, target, reach,
                                                               example_inputs, verify)
    else:
        widths = _fixed_widths(units, norm, ratio, width, budget, min_width, round_to)
        note, measured, cut_model = "", None, None
    return _make_plan(units, scores, widths, mm, target, measured, cut_model, note)


def _check_plan_inputs(units: Sequence, scores: Mapping[str, torch.Tensor],
                       width: int | Mapping[str, int] | None) -> None:
    """Scores for every unit, of the unit's size; a width dict names only known units, with positive ints."""
    for u in units:
        if u.name not in scores:
            raise FlowpruneError(f"no score for unit {u.name!r}; the scores must cover every unit")
        if tuple(scores[u.name].shape) != (u.size,):
            raise FlowpruneError(f"score of unit {u.name!r} has shape {tuple(scores[u.name].shape)}, expected ({u.size},)")
    if isinstance(width, Mapping):
        names = {u.name for u in units}
        bad = sorted(set(width) - names)
        if bad:
            raise FlowpruneError(f"width given for unknown unit(s) {bad}; units are: {', '.join(sorted(names))}")
        for k, v in width.items():
            check_positive_int(f"width[{k!r}]", v)


def _fixed_widths(units: Sequence, norm: Mapping[str, torch.Tensor], ratio: float | None,
                  width: int | Mapping[str, int] | None, budget: str, min_width: int, round_to: int) -> dict[str, int]:
    """Kept widths without a MACs target: from ``width`` (int or per unit), else ``ratio`` per layer or globally."""
    if width is not None:
        if isinstance(width, Mapping):
            return {u.name: _round_width(min(width.get(u.name, u.size), u.size), u.size, min_width, round_to)
                    for u in units}
        return {u.name: _round_width(min(width, u.size), u.size, min_width, round_to) for u in units}
    if budget == "layer":
        return _layer_widths(units, float(ratio), min_width, round_to)
    return _global_widths(units, norm, float(ratio), min_width, round_to)


class _MacsSearch:
    """The search for kept widths meeting a MACs reduction with one budget (see the module docstring)."""

    def __init__(self, units: Sequence, norm: Mapping[str, torch.Tensor], mm: MacsModel, budget: str,
                 min_width: int, round_to: int):
        self.units, self.norm, self.mm, self.budget = units, norm, mm, budget
        self.min_width, self.round_to = min_width, round_to

    def widths_at(self, r: float) -> dict[str, int]:
        """Widths at knob setting ``r`` (the uniform ratio for ``layer``, the global fraction otherwise)."""
        if self.budget == "layer":
            return _layer_widths(self.units, r, self.min_width, self.round_to)
        return _global_widths(self.units, self.norm, r, self.min_width, self.round_to)

    def red(self, w: Mapping[str, int]) -> float:
        """The MACs model's reduction at widths ``w``."""
        return self.mm.total / max(self.mm.macs(w), 1e-9)

    def search(self, t: float) -> tuple[dict[str, int], str]:
        """Widths reaching reduction ``t`` (bisection on the knob, refined greedily when it jumps) and how."""
        units, norm, mm, budget, red = self.units, self.norm, self.mm, self.budget, self.red
        if budget == "macs":
            full = {u.name: u.size for u in units}
            return (_greedy_refine(units, norm, full, mm, t, self.min_width, self.round_to),
                    "macs budget (utility per MAC)")
        lo, hi = 0.0, 1.0 - 1e-9
        w_hi = self.widths_at(hi)
        for _ in range(40):
            mid = (lo + hi) / 2
            w = self.widths_at(mid)
            if red(w) >= t:
                hi, w_hi = mid, w
            else:
                lo = mid
        w_lo = self.widths_at(lo)
        best = min((w_lo, w_hi), key=lambda w: abs(red(w) / t - 1))
        if abs(red(best) / t - 1) <= TOLERANCE / 3:
            return best, f"{budget} budget search"
        refined = _greedy_refine(units, norm, dict(w_lo), mm, t, self.min_width, self.round_to)
        cand = min((refined, w_hi), key=lambda w: abs(red(w) / t - 1))
        how = ("refined per unit by the lowest normalised scores" if cand is refined
               else "kept the nearest knob setting")
        return cand, (f"{budget} budget: the uniform knob jumps from {red(w_lo):.3f}x to {red(w_hi):.3f}x; {how}")


def _widths_for_target(model: nn.Module, units: Sequence, scores: Mapping[str, torch.Tensor], search: _MacsSearch,
                       target: float, reach: float, example_inputs: torch.Tensor,
                       verify: bool) -> tuple[dict[str, int], str, float | None, nn.Module | None]:
    """Widths for MACs reduction ``target``: ``(widths, note, measured reduction or None, cut copy or None)``.

    With ``verify``, the widths are cut on a copy and counted, and the search target corrected up to
    3 times when the count is more than 3% off; the try nearest the target is kept.
    """
    # The MACs model is exact for conv/linear/norm layers; layers it cannot scale (activations,
    # attention internals counted as a whole) are checked by a real cut + count and corrected.
    t_est = target
    widths, how = search.search(t_est)
    measured = None
    cut_model = None
    if verify:
        measured, cut_model = _measure_reduction(model, units, scores, widths, example_inputs)
        tries = [(abs(measured / target - 1), widths, how, measured, cut_model)]
        for _ in range(3):
            if abs(measured / target - 1) <= TOLERANCE:
                break
            t_est = min(t_est * target / measured, reach)
            widths, how = search.search(t_est)
            measured, cut_model = _measure_reduction(model, units, scores, widths, example_inputs)
            tries.append((abs(measured / target - 1), widths, how, measured, cut_model))
        _, widths, how, measured, cut_model = min(tries, key=lambda t: t[0])
    note = f"{how}: {measured if measured is not None else search.red(widths):.3f}x for target {target:g}x"
    return widths, note, measured, cut_model


def _make_plan(units: Sequence, scores: Mapping[str, torch.Tensor], widths: dict[str, int], mm: MacsModel,
               target: float | None, measured: float | None, cut_model: nn.Module | None, note: str) -> CutPlan:
    """The :class:`CutPlan`: each unit's lowest-scored indices beyond its kept width, and what it reaches."""
    plan = CutPlan()
    for u in units:
        k = widths[u.name]
        order = torch.argsort(scores[u.name].double(), stable=True)  # ascending
        plan[u.name] = torch.sort(order[: u.size - k]).values.long()
    plan.widths = dict(widths)
    plan.macs_before = int(round(mm.total))
    plan.macs_after = int(round(mm.macs(widths)))
    plan.reduction = mm.total / max(mm.macs(widths), 1e-9)
    if target is not None and measured is not None:
        plan.reduction = float(measured)
        plan.macs_after = int(round(mm.total / measured))
    plan.target = target
    plan.cut_model = cut_model
    plan.within_tolerance = target is None or abs(plan.reduction / target - 1) <= TOLERANCE
    if target is not None and not plan.within_tolerance:
        note += f"; NOT within 3% of {target:g}x (nearest reachable point)"
    plan.note = note
    return plan


def _greedy_refine(units, norm, widths: dict[str, int], mm: MacsModel, target: float, min_width: int,
                   round_to: int) -> dict[str, int]:
    """From ``widths`` (below target), remove the lowest normalised channels until the target is met."""
    sizes = {u.name: u.size for u in units}
    step = {u.name: (round_to if (round_to > 1 and u.size >= round_to) else 1) for u in units}
    floor = {u.name: _round_width(0, u.size, min_width, round_to) for u in units}
    sorted_scores = {u.name: torch.sort(norm[u.name]).values for u in units}
    w = dict(widths)
    for _ in range(sum(sizes.values())):
        base = mm.macs(w)
        if mm.total / max(base, 1e-9) >= target:
            break
        best, best_val = None, None
        for n in w:
            if w[n] - step[n] < floor[n]:
                continue
            removed = sizes[n] - w[n]
            # next channels to remove from this unit: the lowest still kept
            val = float(sorted_scores[n][removed: removed + step[n]].sum())
            saving = base - mm.macs({**w, n: w[n] - step[n]})
            val = val / max(saving, 1e-9)  # score lost per MAC saved
            if best_val is None or val < best_val:
                best, best_val = n, val
        if best is None:
            break
        w[best] -= step[best]
    return w


def _measure_reduction(model, units, scores, widths, example_inputs) -> tuple[float, nn.Module]:
    """Real MACs reduction of cutting ``model`` to ``widths`` (Torch-Pruning's counter on a cut copy),
    and the cut copy itself, so :func:`plan_cuts` can hand it on (no second surgery)."""
    import torch_pruning as tp

    from flowprune.cut import apply_cuts
    from flowprune.measure import eval_mode

    cuts = {}
    for u in units:
        order = torch.argsort(scores[u.name].double(), stable=True)
        cuts[u.name] = order[: u.size - widths[u.name]]
    x = example_inputs[:1]
    new = apply_cuts(model, cuts, example_inputs=x)
    with eval_mode(model), torch.no_grad():
        before = tp.utils.count_ops_and_params(model, x)[0]
    with eval_mode(new), torch.no_grad():
        after = tp.utils.count_ops_and_params(new, x)[0]
    return float(before) / max(float(after), 1e-9), new
