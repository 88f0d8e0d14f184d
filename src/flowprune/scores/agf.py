"""AGF kinetic utility (Qian et al. 2026, METHODS.md section 1): loss-reducing flow through a unit.

For unit c with feature Y_c over T calibration batches B_t::

    U_c = (1/T) * sum_t  mean_{x in B_t}  sum_{positions}  | Y_c(x) * dL_x/dY_c(x) |

with ``L_x`` the cross-entropy of sample x (so ``dL_x/dY`` is a per-sample gradient; the batch
is one forward and one backward with the *summed* loss). Choices (options, defaults first):

* ``feature``: ``"post"`` -- Y is the input of the layers whose input channels are cut (the
  post-activation tensor the next conv/linear reads, e.g. conv -> BN -> ReLU output; a head's
  context vector before ``proj``); ``"raw"`` -- the output of the layers whose output channels
  are cut (the conv output before BN). When a unit's channels reach several layers (a residual
  stream read by the next block's conv and shortcut, or the next stage), each distinct tensor
  counts once and the unit's score is the sum over those tensors.
* ``abs_mode``: ``"elementwise"`` -- |Y * dL/dY| per element, then summed over positions;
  ``"after_sum"`` -- summed over the unit's positions (and a head's head_dim) per sample, then
  the absolute value; ``"signed"`` -- no absolute value (first-order Taylor in feature space:
  per batch it equals d(mean loss)/d(alpha_c) for a scale alpha_c on the unit's output).
* ``calibration``: ``"frozen"`` -- eval mode, no weight updates; ``"trajectory"`` -- a copy
  of the model takes one SGD step (``trajectory_lr``) in train mode after each scoring batch.

Only feature gradients are requested (``torch.autograd.grad`` w.r.t. the captured features),
so no weight gradient is computed for the score and ``.grad`` is never written.
"""

from __future__ import annotations

import torch
from torch import nn

from flowprune.errors import FlowpruneError, bad_choice
from flowprune.scores.base import (
    Score,
    channel_sums,
    cross_entropy_sum,
    device_of,
    modules_of,
    register_score,
)

FEATURES = ("post", "raw")
ABS_MODES = ("elementwise", "after_sum", "signed")
CALIBRATIONS = ("frozen", "trajectory")


def feature_members(unit, feature: str):
    """The members whose tensors are the unit's Y: consumers' inputs ("post") or producers' outputs ("raw")."""
    if unit.kind == "head" or feature == "post":
        return [(m, "input") for m in unit.consumers] or [(m, "output") for m in unit.producers]
    return [(m, "output") for m in unit.producers if not m.module_name.endswith(".gate")]


@register_score("agf")
class AGF(Score):
    """AGF utility |Y * dL/dY| (see the module docstring for every option)."""

    OPTIONS = {"feature": "post", "abs_mode": "elementwise", "calibration": "frozen", "trajectory_lr": 0.01}
    needs_labels = True

    def validate(self) -> None:
        o = self.options
        if o["feature"] not in FEATURES:
            raise bad_choice("agf feature", o["feature"], FEATURES)
        if o["abs_mode"] not in ABS_MODES:
            raise bad_choice("agf abs_mode", o["abs_mode"], ABS_MODES)
        if o["calibration"] not in CALIBRATIONS:
            raise bad_choice("agf calibration", o["calibration"], CALIBRATIONS)
        lr = o["trajectory_lr"]
        if not isinstance(lr, (int, float)) or lr <= 0:
            raise FlowpruneError(f"agf trajectory_lr must be a positive number, got {lr!r}")

    def compute(self, model: nn.Module, units: list, batches: list) -> dict[str, torch.Tensor]:
        o = self.options
        trajectory = o["calibration"] == "trajectory"
        work = copy_for_trajectory(model) if trajectory else model
        work.train(trajectory)
        mods = modules_of(work)
        dev = device_of(work)
        plan = {u.name: feature_members(u, o["feature"]) for u in units}
        hooked: dict[tuple[str, str], list[torch.Tensor]] = {}
        for members in plan.values():
            for m, where in members:
                hooked.setdefault((m.module_name, where), [])
        handles = []
        for (name, where) in hooked:
            store = hooked[(name, where)]
            if where == "input":
                handles.append(mods[name].register_forward_pre_hook(lambda _m, a, s=store: s.append(a[0])))
            else:
                handles.append(mods[name].register_forward_hook(lambda _m, a, out, s=store: s.append(out)))
        totals = {u.name: torch.zeros(u.size, dtype=torch.float64) for u in units}
        params = [p for p in work.parameters()]
        need_input_grad = not all(p.requires_grad for p in params)
        opt = torch.optim.SGD([p for p in params if p.requires_grad], lr=float(o["trajectory_lr"])) if trajectory else None
        try:
            with torch.enable_grad():
                for x, y in batches:
                    for s in hooked.values():
                        s.clear()
                    x, y = x.to(dev), y.to(dev)
                    if need_input_grad:
                        x = x.clone().requires_grad_(True)
                    loss = cross_entropy_sum(work(x), y)
                    uniq: dict[int, torch.Tensor] = {}
                    for s in hooked.values():
                        for t in s:
                            if t.requires_grad:
                                uniq.setdefault(id(t), t)
                    tensors = list(uniq.values())
                    wanted = tensors + ([p for p in params if p.requires_grad] if trajectory else [])
                    grads = torch.autograd.grad(loss, wanted, allow_unused=True)
                    gmap = {id(t): g for t, g in zip(tensors, grads[:len(tensors)])}
                    bsz = x.shape[0]
                    for u in units:
                        acc = torch.zeros(bsz, u.size, dtype=torch.float64, device=dev)
                        seen: set[int] = set()
                        for m, where in plan[u.name]:
                            mod = mods[m.module_name]
                            for t in hooked[(m.module_name, where)]:
                                g = gmap.get(id(t))
                                if g is None or id(t) in seen:
                                    continue
                                seen.add(id(t))
                                prod = t.detach() * g  # reduced in the feature dtype, accumulated in float64
                                per = channel_sums(prod, mod, absolute=o["abs_mode"] == "elementwise").double()
                                part = torch.zeros(bsz, u.size, dtype=torch.float64, device=dev)
                                part.index_add_(1, m.root_idxs.to(dev), per[:, m.idxs.to(dev)])
                                acc += part.abs() if o["abs_mode"] == "after_sum" else part
                        totals[u.name] += acc.mean(0).cpu()
                    if trajectory:
                        with torch.no_grad():
                            for p, g in zip([p for p in params if p.requires_grad], grads[len(tensors):]):
                                p.grad = None if g is None else g / bsz
                        opt.step()
                        opt.zero_grad(set_to_none=True)
        finally:
            for h in handles:
                h.remove()
            for s in hooked.values():
                s.clear()
        return {k: (v / max(1, len(batches))).float() for k, v in totals.items()}


def copy_for_trajectory(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)
