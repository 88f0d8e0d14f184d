"""Data-free baselines: L1 / L2 filter magnitude, BatchNorm scale, uniform random.

Magnitude on BN nets must see BatchNorm: a conv followed by BN outputs
``gamma_c * (w_c * x - mu_c) / sqrt(var_c + eps) + beta_c``, so the filter's own scale ``|w_c|`` is
divided away and only the *folded* filter ``w_c * gamma_c / sqrt(var_c + eps)`` says how strongly
the channel writes into the network. Both choices are options (defaults first):

* ``bn``: ``"fold"`` -- every producer of the unit (each conv / linear whose output rows it cuts:
  in a residual stage, the conv of every block that writes into the sum) has its weight folded:
  output row ``c`` multiplied by ``|gamma_c| / sqrt(running_var_c + eps)`` of the BatchNorm that
  normalises that producer's output (:func:`bn_after`: the BatchNorm node whose input node is the
  producer in Torch-Pruning's module graph, whatever the direction of the group's dependencies);
  producers with no BN (or LayerNorm/GroupNorm, which normalise across channels, not per channel)
  are not scaled;
  ``"ignore"`` -- the raw filter weights (the pre-2024 reading; on BN nets close to random).
* ``group``: ``"producers"`` -- the unit's filters only (every layer whose output rows the unit
  cuts: the root filter and, for coupled groups, the other filters writing the same channels;
  a head's q/k/v rows); ``"all"`` -- also the unit's consumers' input columns (the weights that
  read the channel), as Torch-Pruning's group magnitude sums every member of the coupled group.

``l1`` = sum of |w| over those weights; ``l2`` = sqrt of the sum of w^2.
``bn_scale`` (Liu et al. 2017, network slimming) = sum of |gamma| over the unit's BatchNorm
members; a unit with no BatchNorm (MLP neurons, heads, LayerNorm-only nets) falls back to its
``l2`` magnitude (documented fallback so the score works in every budget).
``random`` draws U[0, 1) per unit from ``seed`` and the unit's name (reproducible).
"""

from __future__ import annotations

import torch
from torch import nn

from flowprune.errors import bad_choice
from flowprune.recurrent import input_columns, is_recurrent, unit_rows
from flowprune.scores.base import (
    Score,
    linear_weight,
    modules_of,
    register_score,
    unit_generator,
    weight_rows,
)

BN_MODES = ("fold", "ignore")
GROUP_MODES = ("producers", "all")


_PRODUCER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


def bn_after(model: nn.Module, unit) -> dict[str, nn.Module]:
    """``{producer name: the BatchNorm that normalises its output}`` for the unit's producers.

    Found on Torch-Pruning's *module graph*, not on the direction of the group's dependencies: every
    BatchNorm node of the unit's group whose one input node is a producer of the unit normalises that
    producer's output channels one to one. (In a residual stage the group reaches most producers
    BN -> conv, backwards through the sum; reading only conv -> BN dependencies, as flowprune did
    before, left 3 of the 4 producers of a ResNet stage unfolded.) A BatchNorm fed by a concatenation
    or a reshape has no single producer input and is not paired; nor are LayerNorm / GroupNorm.
    """
    group = getattr(unit, "group", None)
    if group is None:
        return {}
    name_of = {m: n for n, m in modules_of(model).items()}
    producers = {p.module_name for p in unit.producers}
    out: dict[str, nn.Module] = {}
    for item in group:
        for node in (item.dep.source, item.dep.target):
            bn = getattr(node, "module", None)
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn not in name_of:
                continue
            inputs = {id(i.module): i.module for i in getattr(node, "inputs", [])}
            if len(inputs) != 1:
                continue
            (src,) = inputs.values()
            name = name_of.get(src) if isinstance(src, _PRODUCER_TYPES) else None
            if name in producers:
                out.setdefault(name, bn)
    return out


def bn_fold_factors(model: nn.Module, unit) -> dict[str, torch.Tensor]:
    """``{producer name: Tensor(out_features,)}``, float64 on the CPU: |gamma| / sqrt(running_var + eps)
    of the BatchNorm that normalises each producer's output (:func:`bn_after`), one factor per output
    row of the producer (index it with the member's ``idxs``). Producers with no such BN, or a BN
    without running statistics, are absent (factor 1)."""
    mods = modules_of(model)
    out = {}
    for name, bn in bn_after(model, unit).items():
        if not bn.track_running_stats or bn.running_var is None:
            continue
        gamma = bn.weight.detach().abs() if bn.weight is not None else torch.ones_like(bn.running_var)
        f = (gamma / torch.sqrt(bn.running_var.detach() + bn.eps)).double().cpu()
        if f.numel() == mods[name].weight.shape[0]:
            out[name] = f
    return out


def folded_weight(w: torch.Tensor, f: torch.Tensor | None) -> torch.Tensor:
    """``w`` with output row ``o`` multiplied by ``f[o]`` (the BN fold); ``w`` itself when ``f`` is None."""
    if f is None:
        return w
    return w * f.to(w.dtype).reshape(-1, *([1] * (w.dim() - 1)))


def consumer_columns(w: torch.Tensor, idxs: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Input columns ``idxs`` of a consumer's weight, one row per index: (len(idxs), fan)."""
    w = w.detach()
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
        if module.groups == module.in_channels:  # depthwise: the channel's own filter
            return w[idxs].flatten(1)
        g, i_g = module.groups, module.in_channels // module.groups
        o_g = module.out_channels // g
        rows = []
        for i in idxs.tolist():
            k = i // i_g
            rows.append(w[k * o_g:(k + 1) * o_g, i % i_g].flatten())
        return torch.stack(rows)
    return w.transpose(0, 1)[idxs].flatten(1)


def group_norm(model: nn.Module, unit, p: int, bn: str = "fold", group: str = "producers") -> torch.Tensor:
    """The unit's p-norm (p = 1 or 2) over its producers' rows (BN-folded) and, with ``group="all"``,
    its consumers' input columns. Returns float64 (unit.size,)."""
    mods = modules_of(model)
    factors = bn_fold_factors(model, unit) if bn == "fold" else {}
    acc = torch.zeros(unit.size, dtype=torch.float64)
    for m in unit.producers:
        mod = mods[m.module_name]
        if is_recurrent(mod):  # gate rows of each hidden unit; no BatchNorm follows a recurrent layer
            rows = unit_rows(mod)[m.idxs].double().cpu()
        else:
            rows = weight_rows(folded_weight(linear_weight(mod).detach().double().cpu(), factors.get(m.module_name)), m.idxs)
        acc.index_add_(0, m.root_idxs, rows.abs().sum(1) if p == 1 else (rows ** 2).sum(1))
    if group == "all":
        for m in unit.consumers:
            mod = mods[m.module_name]
            if m.module_name in {q.module_name for q in unit.producers}:
                continue  # a depthwise conv is both: counted once, as a producer
            cols = (input_columns(mod, m.idxs) if is_recurrent(mod) else consumer_columns(linear_weight(mod), m.idxs, mod))
            cols = cols.double().cpu()
            acc.index_add_(0, m.root_idxs, cols.abs().sum(1) if p == 1 else (cols ** 2).sum(1))
    return acc if p == 1 else acc.sqrt()


def producer_norm(model: nn.Module, unit, p: int) -> torch.Tensor:
    """Raw (unfolded) p-norm of the unit's filters (the ``bn="ignore"`` reading)."""
    return group_norm(model, unit, p, bn="ignore", group="producers")


class _Magnitude(Score):
    OPTIONS = {"bn": "fold", "group": "producers"}
    needs_data = False
    P = 1

    def validate(self) -> None:
        if self.options["bn"] not in BN_MODES:
            raise bad_choice(f"{self.name} bn", self.options["bn"], BN_MODES)
        if self.options["group"] not in GROUP_MODES:
            raise bad_choice(f"{self.name} group", self.options["group"], GROUP_MODES)

    def compute(self, model, units, batches):
        return {u.name: group_norm(model, u, self.P, self.options["bn"], self.options["group"]) for u in units}


@register_score("l1")
class L1(_Magnitude):
    """Sum of |w| over the unit's filters, BatchNorm-folded (options ``bn``, ``group``)."""

    P = 1


@register_score("l2")
class L2(_Magnitude):
    """L2 norm of the unit's filters taken together, BatchNorm-folded (options ``bn``, ``group``)."""

    P = 2


@register_score("bn_scale")
class BNScale(Score):
    """Sum of |gamma| over the unit's BatchNorm layers (L2 magnitude where it has none)."""

    needs_data = False

    def compute(self, model, units, batches):
        mods = modules_of(model)
        out = {}
        for u in units:
            bns = [m for m in u.norms if isinstance(mods[m.module_name], nn.modules.batchnorm._BatchNorm)
                   and mods[m.module_name].weight is not None]
            if not bns:
                out[u.name] = producer_norm(model, u, 2)
                continue
            acc = torch.zeros(u.size, dtype=torch.float64)
            for m in bns:
                acc.index_add_(0, m.root_idxs, mods[m.module_name].weight.detach().double().cpu()[m.idxs].abs())
            out[u.name] = acc
        return out


@register_score("random")
class Random(Score):
    """Uniform random scores from ``seed`` and the unit name."""

    OPTIONS = {"seed": 0}
    needs_data = False

    def compute(self, model, units, batches):
        return {u.name: torch.rand(u.size, generator=unit_generator(int(self.options["seed"]), u.name))
                for u in units}
