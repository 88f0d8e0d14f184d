"""Activation-aware magnitude: Wanda (Sun et al. 2024) and RIA (Zhang et al. 2024), per unit.

Both need the L2 norm of every *input* channel of the unit's producers over the calibration
batches (all samples and positions), ``||X_j||_2``; forward passes only, eval mode.

* ``wanda``: sum over the unit's weights of |W_ij| * ||X_j||_2.
* ``ria``:   sum over the unit's weights of (|W_ij| / sum_row |W| + |W_ij| / sum_col |W|) * ||X_j||_2^a
  (relative importance times activation; ``a = 0.5`` as in the paper, option ``power``).
  Rows are output channels, columns are (input channel, kernel position); grouped convolutions
  take column sums within their group.
"""

from __future__ import annotations

import torch
from torch import nn

from flowprune.errors import FlowpruneError, bad_choice
from flowprune.scores.base import (
    Score,
    device_of,
    grouped_input_index,
    input_channel_sq,
    linear_weight,
    modules_of,
    register_score,
)
from flowprune.scores.magnitude import BN_MODES, bn_fold_factors


def input_norms(model: nn.Module, names: set[str], batches) -> dict[str, torch.Tensor]:
    """||X_j||_2 per input channel j of each named module over all batches."""
    mods = modules_of(model)
    dev = device_of(model)
    acc: dict[str, torch.Tensor] = {}
    handles = []
    for n in names:
        def hook(mod, args, n=n):
            v = input_channel_sq(args[0], mod).double().cpu()
            acc[n] = acc[n] + v if n in acc else v
        handles.append(mods[n].register_forward_pre_hook(hook))
    model.eval()
    try:
        with torch.no_grad():
            for x, _y in batches:
                model(x.to(dev))
    finally:
        for h in handles:
            h.remove()
    return {n: v.sqrt() for n, v in acc.items()}


def _expanded_norm(mod: nn.Module, xn: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """||X|| laid out like ``w`` (O, I/g, *k) or (O, I)."""
    idx = grouped_input_index(mod)
    if idx is None:
        return xn[None, :].expand_as(w)
    full = xn[idx]
    return full.reshape(*full.shape, *([1] * (w.dim() - 2))).expand_as(w)


class _ActivationScore(Score):
    """Per-weight activation-aware magnitude; ``bn="fold"`` (default) scales each producer row by its
    BatchNorm's |gamma| / sqrt(var + eps), as :mod:`flowprune.scores.magnitude` explains."""

    OPTIONS = {"bn": "fold"}

    def validate(self) -> None:
        if self.options["bn"] not in BN_MODES:
            raise bad_choice(f"{self.name} bn", self.options["bn"], BN_MODES)

    def per_weight(self, mod: nn.Module, w: torch.Tensor, xn: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compute(self, model, units, batches):
        mods = modules_of(model)
        names = {m.module_name for u in units for m in u.producers}
        norms = input_norms(model, names, batches)
        cache: dict[str, torch.Tensor] = {}
        out = {}
        for u in units:
            acc = torch.zeros(u.size, dtype=torch.float64)
            factors = bn_fold_factors(model, u) if self.options["bn"] == "fold" else {}
            for m in u.producers:
                if m.module_name not in cache:
                    mod = mods[m.module_name]
                    w = linear_weight(mod).detach().double().cpu()
                    if m.module_name not in norms:
                        raise FlowpruneError(f"layer {m.module_name} saw no input in the calibration batches")
                    cache[m.module_name] = self.per_weight(mod, w, norms[m.module_name]).flatten(1).sum(1)
                row = cache[m.module_name][m.idxs]
                f = factors.get(m.module_name)
                acc.index_add_(0, m.root_idxs, row * f if f is not None else row)
            out[u.name] = acc
        return out


@register_score("wanda")
class Wanda(_ActivationScore):
    """sum |W| * ||X||_2 over the unit's weights."""

    def per_weight(self, mod, w, xn):
        return w.abs() * _expanded_norm(mod, xn, w)


@register_score("ria")
class RIA(_ActivationScore):
    """Relative importance (row- and column-normalised |W|) times ||X||_2^power."""

    OPTIONS = {"power": 0.5, "bn": "fold"}

    def validate(self):
        super().validate()
        p = self.options["power"]
        if not isinstance(p, (int, float)) or p < 0:
            raise FlowpruneError(f"ria power must be a number >= 0, got {p!r}")

    def per_weight(self, mod, w, xn):
        a = w.abs()
        o = a.shape[0]
        flat = a.reshape(o, -1)
        row = flat.sum(1, keepdim=True).clamp_min(1e-12)
        g = getattr(mod, "groups", 1) if isinstance(mod, nn.modules.conv._ConvNd) else 1
        col = flat.reshape(g, o // g, -1).sum(1, keepdim=True).expand(g, o // g, flat.shape[1]).reshape(o, -1)
        rel = flat / row + flat / col.clamp_min(1e-12)
        return rel.reshape(a.shape) * _expanded_norm(mod, xn, w) ** float(self.options["power"])
