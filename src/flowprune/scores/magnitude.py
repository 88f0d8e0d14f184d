"""Data-free baselines: L1 / L2 filter magnitude, BatchNorm scale, uniform random.

Magnitude on BN nets must see BatchNorm: a conv followed by BN outputs
``gamma_c * (w_c * x - mu_c) / sqrt(var_c + eps) + beta_c``, so the filter's own scale ``|w_c|`` is
divided away and only the *folded* filter ``w_c * gamma_c / sqrt(var_c + eps)`` says how strongly
the channel writes into the network. Both choices are options (defaults first):

* ``bn``: ``"fold"`` -- each producer row is multiplied by ``|gamma_c| / sqrt(running_var_c + eps)``
  of the BatchNorm that normalises that producer's output (found on the unit's Torch-Pruning
  group: the dependency from the producer's out-channels to the BN's); producers with no BN (or
  LayerNorm/GroupNorm, which normalise across channels, not per channel) are not scaled;
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


def bn_fold_factors(model: nn.Module, unit) -> dict[str, torch.Tensor]:
    """``{producer name: Tensor(len(member.idxs))}``: |gamma| / sqrt(running_var + eps) of the BatchNorm
    that normalises each producer's output rows, aligned with the producer member's ``idxs``.

    The pairing comes from the unit's Torch-Pruning group (a dependency whose source is the producer
    and whose target is a BatchNorm); producers with no such BN are absent (factor 1).
    """
    group = getattr(unit, "group", None)
    if group is None:
        return {}
    mods = modules_of(model)
    name_of = {m: n for n, m in mods.items()}
    bn_of: dict[str, nn.Module] = {}
    for item in group:
        dep = item.dep
        src, tgt = getattr(dep.source, "module", None), getattr(dep.target, "module", None)
        if isinstance(tgt, nn.modules.batchnorm._BatchNorm) and isinstance(src, (nn.modules.conv._ConvNd, nn.Linear)):
            n = name_of.get(src)
            if n is not None and name_of.get(tgt) is not None:
                bn_of.setdefault(n, tgt)
    out = {}
    for p in unit.producers:
        bn = bn_of.get(p.module_name)
        if bn is None or not bn.track_running_stats or bn.running_var is None:
            continue
        gamma = bn.weight.detach().abs() if bn.weight is not None else torch.ones_like(bn.running_var)
        f = (gamma / torch.sqrt(bn.running_var.detach() + bn.eps)).double().cpu()
        if f.numel() > int(p.idxs.max()):
            out[p.module_name] = f[p.idxs]
    return out


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
        rows = weight_rows(linear_weight(mods[m.module_name]), m.idxs).double().cpu()
        f = factors.get(m.module_name)
        if f is not None:
            rows = rows * f[:, None]
        acc.index_add_(0, m.root_idxs, rows.abs().sum(1) if p == 1 else (rows ** 2).sum(1))
    if group == "all":
        for m in unit.consumers:
            mod = mods[m.module_name]
            if m.module_name in {q.module_name for q in unit.producers}:
                continue  # a depthwise conv is both: counted once, as a producer
            cols = consumer_columns(linear_weight(mod), m.idxs, mod).double().cpu()
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
