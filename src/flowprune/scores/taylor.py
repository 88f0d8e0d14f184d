"""Parameter-space first-order Taylor (Molchanov et al. 2019): (sum_w g * w)^2 per unit.

For each calibration batch, g is the gradient of the mean cross-entropy w.r.t. the unit's own
parameters (its producers' output rows and biases, its BatchNorm/LayerNorm weight and bias);
the unit's score is the square of the sum of g*w over them, averaged over batches. Gradients are
taken with ``torch.autograd.grad`` (``.grad`` untouched), in eval mode (frozen BN statistics).
"""

from __future__ import annotations

import torch
from torch import nn

from flowprune.recurrent import is_recurrent, unit_rows
from flowprune.scores.base import Score, cross_entropy_sum, device_of, modules_of, register_score


@register_score("taylor")
class Taylor(Score):
    """(sum over the unit's parameters of g*w)^2, averaged over the calibration batches."""

    needs_labels = True

    def compute(self, model, units, batches):
        from flowprune.scores.base import linear_weight_like

        mods = modules_of(model)
        dev = device_of(model)
        model.eval()
        entries = []  # (unit, member, param)
        for u in units:
            for m in u.producers + u.norms:
                mod = mods[m.module_name]
                if is_recurrent(mod):  # every gate row of the hidden unit, in every layer and direction
                    entries.extend((u, m, p) for p in mod.parameters())
                    continue
                pnames = ("in_proj_weight", "in_proj_bias") if isinstance(mod, nn.MultiheadAttention) else ("weight", "bias")
                for pname in pnames:
                    p = getattr(mod, pname, None)
                    if isinstance(p, nn.Parameter):
                        entries.append((u, m, p))
        params = list({id(p): p for _, _, p in entries}.values())
        names = {id(p): n.rpartition(".")[2] for n, p in model.named_parameters()}
        for p in params:
            p.requires_grad_(True)
        totals = {u.name: torch.zeros(u.size, dtype=torch.float64) for u in units}
        with torch.enable_grad():
            for x, y in batches:
                x, y = x.to(dev), y.to(dev)
                loss = cross_entropy_sum(model(x), y) / x.shape[0]
                grads = dict(zip([id(p) for p in params], torch.autograd.grad(loss, params, allow_unused=True)))
                per = {u.name: torch.zeros(u.size, dtype=torch.float64) for u in units}
                for u, m, p in entries:
                    g = grads[id(p)]
                    if g is None:
                        continue
                    gw = (g.detach() * p.detach()).double().cpu()
                    if is_recurrent(mods[m.module_name]):
                        rows = unit_rows(mods[m.module_name], {names[id(p)]: gw})
                        per[u.name].index_add_(0, m.root_idxs, rows[m.idxs].sum(1))
                        continue
                    if p.dim() == 2 and p is getattr(mods[m.module_name], "weight", None):
                        gw = linear_weight_like(mods[m.module_name], gw)
                    gw = gw[m.idxs]
                    per[u.name].index_add_(0, m.root_idxs, gw.flatten(1).sum(1) if gw.dim() > 1 else gw)
                for k, v in per.items():
                    totals[k] += v ** 2
        return {k: v / max(1, len(batches)) for k, v in totals.items()}
