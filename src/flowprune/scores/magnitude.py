"""Data-free baselines: L1 / L2 filter magnitude, BatchNorm scale, uniform random.

A unit's magnitude sums over its *producers* (every layer whose output rows the unit cuts: the
root filter and, for coupled groups, the other filters writing the same channels; a head's
q/k/v rows): ``l1`` = sum of |w| over those rows; ``l2`` = sqrt of the sum of w^2.
``bn_scale`` (Liu et al. 2017, network slimming) = sum of |gamma| over the unit's BatchNorm
members; a unit with no BatchNorm (MLP neurons, heads, LayerNorm-only nets) falls back to its
``l2`` magnitude (documented fallback so the score works in every budget).
``random`` draws U[0, 1) per unit from ``seed`` and the unit's name (reproducible).
"""

from __future__ import annotations

import torch
from torch import nn

from flowprune.scores.base import Score, modules_of, register_score, unit_generator, weight_rows


def producer_norm(model: nn.Module, unit, p: int) -> torch.Tensor:
    mods = modules_of(model)
    acc = torch.zeros(unit.size, dtype=torch.float64)
    for m in unit.producers:
        w = mods[m.module_name].weight
        rows = weight_rows(w, m.idxs).double().cpu()
        v = rows.abs().sum(1) if p == 1 else (rows ** 2).sum(1)
        acc.index_add_(0, m.root_idxs, v)
    return acc if p == 1 else acc.sqrt()


@register_score("l1")
class L1(Score):
    """Sum of |w| over the unit's filters (producers)."""

    needs_data = False

    def compute(self, model, units, batches):
        return {u.name: producer_norm(model, u, 1) for u in units}


@register_score("l2")
class L2(Score):
    """L2 norm of the unit's filters (producers) taken together."""

    needs_data = False

    def compute(self, model, units, batches):
        return {u.name: producer_norm(model, u, 2) for u in units}


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
