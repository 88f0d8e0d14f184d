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
from flowprune.recurrent import is_recurrent, unit_rows, weight_input_sq
from flowprune.scores.base import (
    Score,
    device_of,
    grouped_input_index,
    input_channel_sq,
    linear_weight,
    modules_of,
    register_score,
)
from flowprune.scores.magnitude import BN_MODES, bn_fold_factors, folded_weight


def input_norms(model: nn.Module, names: set[str], batches) -> dict[str, torch.Tensor]:
    """||X_j||_2 per input channel j of each named module over all batches (for a recurrent module:
    ``{weight name: norms}`` of what each of its weight matrices reads, see
    :func:`flowprune.recurrent.weight_input_sq`)."""
    mods = modules_of(model)
    dev = device_of(model)
    acc: dict[str, torch.Tensor] = {}
    handles = []
    for n in names:
        def hook(mod, args, n=n):
            if is_recurrent(mod):
                v = weight_input_sq(mod, args[0])
                acc[n] = {k: acc[n][k] + t for k, t in v.items()} if n in acc else v
                return
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
    return {n: {k: t.sqrt() for k, t in v.items()} if isinstance(v, dict) else v.sqrt() for n, v in acc.items()}


def _expanded_norm(mod: nn.Module, xn: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """||X|| laid out like ``w`` (O, I/g, *k) or (O, I)."""
    idx = grouped_input_index(mod)
    if idx is None:
        return xn[None, :].expand_as(w)
    full = xn[idx]
    return full.reshape(*full.shape, *([1] * (w.dim() - 2))).expand_as(w)


class _ActivationScore(Score):
    """Per-weight activation-aware magnitude of the unit's producers. With ``bn="fold"`` (default) the
    score is computed on the *folded* weights: every producer's output row multiplied by its
    BatchNorm's |gamma| / sqrt(var + eps) (:func:`flowprune.scores.magnitude.bn_fold_factors`, which
    finds the BN of every producer of a residual stage). For Wanda that equals scaling the score row;
    for RIA it does not (its row normalisation cancels a row's factor, its column sums mix them)."""

    OPTIONS = {"bn": "fold"}

    def validate(self) -> None:
        if self.options["bn"] not in BN_MODES:
            raise bad_choice(f"{self.name} bn", self.options["bn"], BN_MODES)

    def per_weight(self, mod: nn.Module, w: torch.Tensor, xn: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _row_sums(self, mod: nn.Module, xn, fold: torch.Tensor | None = None) -> torch.Tensor:
        """Per output row (channel) of ``mod``, the sum of its per-weight scores on the weights folded
        with ``fold`` (float64, CPU); a recurrent module's rows are its hidden units' gate rows over
        every weight matrix (no BatchNorm follows a recurrent layer, so no fold)."""
        if is_recurrent(mod):
            per = {k: self.per_weight(mod, getattr(mod, k).detach().double().cpu(), v) for k, v in xn.items()}
            return unit_rows(mod, per, bias=False).sum(1)
        w = folded_weight(linear_weight(mod).detach().double().cpu(), fold)
        return self.per_weight(mod, w, xn).flatten(1).sum(1)

    def compute(self, model, units, batches):
        mods = modules_of(model)
        names = {m.module_name for u in units for m in u.producers}
        norms = input_norms(model, names, batches)
        cache: dict[tuple[str, bool], torch.Tensor] = {}
        out = {}
        for u in units:
            acc = torch.zeros(u.size, dtype=torch.float64)
            factors = bn_fold_factors(model, u) if self.options["bn"] == "fold" else {}
            for m in u.producers:
                f = factors.get(m.module_name)
                key = (m.module_name, f is not None)  # a layer's BN fold does not depend on the unit
                if key not in cache:
                    mod = mods[m.module_name]
                    if m.module_name not in norms:
                        raise FlowpruneError(f"layer {m.module_name} saw no input in the calibration batches")
                    cache[key] = self._row_sums(mod, norms[m.module_name], f)
                acc.index_add_(0, m.root_idxs, cache[key][m.idxs])
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
