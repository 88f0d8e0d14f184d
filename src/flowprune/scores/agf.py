"""AGF kinetic utility (Qian et al. 2026, docs/methods.md section 1): loss-reducing flow through a unit.

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
  the absolute value; ``"squared"`` -- summed over the unit's positions and tensors per sample,
  then squared (the empirical-Fisher estimate of the loss increase, as in optimal brain damage:
  dL ~ 1/2 E_x[(sum Y * dL_x/dY)^2]); ``"signed"`` -- no absolute value (first-order Taylor in feature space:
  per batch it equals d(mean loss)/d(alpha_c) for a scale alpha_c on the unit's output).
* ``calibration``: ``"frozen"`` -- eval mode, no weight updates; ``"trajectory"`` -- a copy
  of the model takes one SGD step (``trajectory_lr``) in train mode after each scoring batch.

Cost: frozen calibration turns the weights' ``requires_grad`` off for the call (restored after),
so autograd neither saves tensors only weight gradients need nor computes weight gradients, and
``.grad`` is never written. Each distinct feature tensor gets a tensor hook (from a forward hook);
when backward reaches it, ``Y * dL/dY`` is reduced at once to per-sample, per-channel sums
(B, C) in the feature's dtype (float32), and the hook's reference to ``Y`` is dropped, so no
feature gradient outlives its hook (peak memory about that of one training step). Backward runs
from the loss down to the earliest captured features only (``torch.autograd.grad`` w.r.t. the
features with no other captured feature below them): nothing below them (the stem) is
differentiated. The per-unit sums and the batch means are then formed in float64 from those
(B, C) sums, exactly as the reference computation does (the scores are bit-identical to it).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from flowprune.errors import FlowpruneError, bad_choice
from flowprune.recurrent import is_recurrent
from flowprune.scores.base import (
    Score,
    cross_entropy_sum,
    device_of,
    modules_of,
    register_score,
)

FEATURES = ("post", "raw")
ABS_MODES = ("elementwise", "after_sum", "squared", "signed")
CALIBRATIONS = ("frozen", "trajectory")


def feature_members(unit, feature: str):
    """The members whose tensors are the unit's Y: consumers' inputs ("post") or producers' outputs ("raw")."""
    if unit.kind == "head" or feature == "post":
        return [(m, "input") for m in unit.consumers] or [(m, "output") for m in unit.producers]
    return [(m, "output") for m in unit.producers if not m.module_name.endswith(".gate")]


@register_score("agf")
class AGF(Score):
    """AGF utility |Y * dL/dY| (see the module docstring for every option)."""

    OPTIONS = {"feature": "post", "abs_mode": "after_sum", "calibration": "frozen", "trajectory_lr": 0.01,
               "center": True}
    needs_labels = True

    def validate(self) -> None:
        o = self.options
        if o["feature"] not in FEATURES:
            raise bad_choice("agf feature", o["feature"], FEATURES)
        if o["abs_mode"] not in ABS_MODES:
            raise bad_choice("agf abs_mode", o["abs_mode"], ABS_MODES)
        if o["calibration"] not in CALIBRATIONS:
            raise bad_choice("agf calibration", o["calibration"], CALIBRATIONS)
        if not isinstance(o["center"], bool):
            raise FlowpruneError(f"agf center must be True or False, got {o['center']!r}")
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
        layout = {m.module_name: _layout(mods[m.module_name]) for members in plan.values() for m, _ in members}
        keys: dict[tuple[str, str], list[int]] = {}  # (module, "input"/"output") -> captured features, call order
        for members in plan.values():
            for m, where in members:
                keys.setdefault((m.module_name, where), [])
        acc = _FeatureSums(absolute=o["abs_mode"] == "elementwise", center=o["center"])
        handles = _capture_hooks(mods, keys, layout, acc)
        totals = {u.name: torch.zeros(u.size, dtype=torch.float64) for u in units}
        params = [p for p in work.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=float(o["trajectory_lr"])) if trajectory else None
        # Frozen calibration wants no weight gradient: with the weights' requires_grad off (restored by
        # Score.__call__), autograd saves no tensor that only a weight gradient needs and backward runs
        # from the loss down to the (floating-point) input. Integer inputs (token ids) keep the weights on.
        frozen = not trajectory and all(torch.is_tensor(b[0]) and b[0].is_floating_point() for b in batches)
        if frozen:
            for p in params:
                p.requires_grad_(False)
        try:
            with torch.enable_grad():
                for x, y in batches:
                    for s in keys.values():
                        s.clear()
                    acc.reset()
                    x, pgrads = _backward_batch(work, x, y, dev, acc, params, frozen)
                    bsz = x.shape[0]
                    _add_unit_sums(units, plan, keys, layout, acc, totals, bsz, dev, o["abs_mode"])
                    if trajectory:
                        with torch.no_grad():
                            for p, g in zip(params, pgrads):
                                p.grad = None if g is None else g / bsz
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                    del pgrads
        finally:
            for h in handles:
                h.remove()
            for s in keys.values():
                s.clear()
            acc.reset()
        return {k: (v / max(1, len(batches))).float() for k, v in totals.items()}


def _capture_hooks(mods: dict[str, nn.Module], keys: dict[tuple[str, str], list[int]], layout: dict[str, str],
                   acc: _FeatureSums) -> list:
    """Forward (pre-)hooks that hand each ``(module, "input"/"output")`` feature to ``acc.capture`` and
    append its key to ``keys[(module, where)]``; returns the hook handles."""
    handles = []
    for (name, where), store in keys.items():
        lay = layout[name]
        if where == "input":
            handles.append(mods[name].register_forward_pre_hook(
                lambda _m, a, s=store, k=lay: s.append(acc.capture(a[0], k))))
        else:
            handles.append(mods[name].register_forward_hook(
                lambda _m, _a, out, s=store, k=lay: s.append(acc.capture(_first(out), k))))
    return handles


def _first(out):
    """A module's feature output: the tensor, or the first item of a tuple (a recurrent module's
    output sequence)."""
    return out[0] if isinstance(out, tuple) and out else out


def _backward_batch(work: nn.Module, x: torch.Tensor, y: torch.Tensor, dev, acc: _FeatureSums, params: list,
                    frozen: bool) -> tuple[torch.Tensor, tuple]:
    """One forward and backward of the summed cross-entropy on ``(x, y)``: the feature hooks fill
    ``acc.sums``. Returns the input as run (on ``dev``) and the weight gradients (empty when frozen)."""
    x, y = x.to(dev), y.to(dev)
    leaf = x.is_floating_point()
    if leaf:  # backward runs down to the input: every feature's hook fires on the way
        x = x.detach().requires_grad_(True)
    loss = cross_entropy_sum(work(x), y)
    # frozen: backward stops at the earliest features (no captured feature lies below them):
    # it passes through every captured feature and differentiates nothing below (the stem)
    wanted = acc.roots() if frozen else ([x] if leaf else []) + params
    if not wanted or not loss.requires_grad:
        raise FlowpruneError("agf: the loss does not depend on any input or parameter that can "
                             "carry a gradient")
    grads = torch.autograd.grad(loss, wanted, allow_unused=True)
    pgrads = () if frozen else grads[len(wanted) - len(params):]  # weight gradients (trajectory)
    del grads, loss, wanted
    return x, pgrads


def _add_unit_sums(units: list, plan: dict, keys: dict[tuple[str, str], list[int]], layout: dict[str, str],
                   acc: _FeatureSums, totals: dict[str, torch.Tensor], bsz: int, dev, abs_mode: str) -> None:
    """Add this batch's per-unit utility (the batch mean, float64, on the CPU) to ``totals``: each
    distinct feature tensor of a unit counts once, its (B, C) sums mapped onto the unit's indices."""
    for u in units:
        u_acc = torch.zeros(bsz, u.size, dtype=torch.float64, device=dev)
        seen: set[int] = set()
        for m, where in plan[u.name]:
            for key in keys[(m.module_name, where)]:
                per = acc.sums.get((key, layout[m.module_name]))
                if per is None or key in seen:
                    continue
                seen.add(key)
                per = per.double()
                part = torch.zeros(bsz, u.size, dtype=torch.float64, device=dev)
                part.index_add_(1, m.root_idxs.to(dev), per[:, m.idxs.to(dev)])
                u_acc += part.abs() if abs_mode == "after_sum" else part
        if abs_mode == "squared":
            u_acc = u_acc ** 2
        totals[u.name] += u_acc.mean(0).cpu()


def _layout(module: nn.Module) -> str:
    """How a module's feature tensor holds channels: ``"conv"`` (B, C, *S), ``"linear"`` (B, ..., C) or
    ``"time_first"`` (T, B, C: a recurrent module with ``batch_first=False``)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    return "time_first" if is_recurrent(module) and not module.batch_first else "linear"


def _channel_sums(t: torch.Tensor, lay: str, absolute: bool) -> torch.Tensor:
    """``base.channel_sums`` by layout name: (B, C) per-sample sums over positions."""
    if absolute:
        t = t.abs()
    if lay == "time_first" and t.dim() == 3:
        t = t.transpose(0, 1)
    if lay == "conv":
        return t.flatten(2).sum(2) if t.dim() > 2 else t
    if t.dim() == 1:
        return t.unsqueeze(0)
    return t.reshape(t.shape[0], -1, t.shape[-1]).sum(1)


def _centred(y: torch.Tensor, lay: str) -> torch.Tensor:
    """``y`` minus its per-channel mean over the batch and positions (channels by layout)."""
    if lay == "conv" and y.dim() > 2:
        dims = [0] + list(range(2, y.dim()))
    else:
        dims = list(range(y.dim() - 1))
    return y - y.mean(dim=dims, keepdim=True)


class _FeatureSums:
    """Per-batch store of the per-sample, per-channel sums of ``Y * dL/dY`` over each feature's positions.

    :meth:`capture` (called from a forward hook) gives every distinct feature tensor that carries a
    gradient a key and registers a tensor hook on it; when backward reaches the tensor the hook
    reduces ``Y * dL/dY`` (in the feature's dtype, float32 for float32 models) at once to ``(B, C)``
    per layout the feature is read with, and drops its reference to ``Y``. So no feature gradient
    outlives its hook and no feature is kept after its gradient has been used: the peak is the
    forward's saved activations plus one gradient in flight, as in a training step.
    """

    def __init__(self, absolute: bool, center: bool = False):
        self.absolute = absolute
        self.center = center
        self.reset()

    def reset(self) -> None:
        self.entries: dict[int, tuple[weakref.ref, int]] = {}  # id(tensor) -> (weak ref, key)
        self.feats: dict[int, torch.Tensor] = {}  # key -> detached Y, until its gradient arrives
        self.layouts: dict[int, set[str]] = {}
        self.sums: dict[tuple[int, str], torch.Tensor] = {}
        self.next_key = 0
        self.alive: list[torch.Tensor] = []

    def capture(self, t: torch.Tensor, lay: str) -> int:
        """Key of feature ``t`` (the same tensor read twice gets one key); -1 if it carries no gradient."""
        if not isinstance(t, torch.Tensor) or not t.requires_grad:
            return -1
        hit = self.entries.get(id(t))
        if hit is not None and hit[0]() is t:
            self.layouts[hit[1]].add(lay)
            return hit[1]
        key = self.next_key
        self.next_key += 1
        self.entries[id(t)] = (weakref.ref(t), key)
        self.alive.append(t)  # until :meth:`roots` (the forward is over): the graph's own tensor objects
        self.feats[key] = t.detach()
        self.layouts[key] = {lay}
        t.register_hook(lambda g, k=key: self._on_grad(k, g))  # the closure holds no reference to t
        return key

    def roots(self) -> list[torch.Tensor]:
        """The captured features with no captured feature below them in the graph; forgets the others.

        A backward to these passes through every captured feature (each one is a root or lies
        above one), so every tensor hook fires. Called once the forward is over.
        """
        fns = {t.grad_fn for t in self.alive if t.grad_fn is not None}
        has_feature_below: dict = {}  # graph node -> a captured feature's node lies below it (towards the input)
        for start in fns:
            stack = [(start, False)]
            while stack:  # iterative post-order walk (graphs can be deeper than Python's recursion limit)
                n, kids_done = stack.pop()
                if n in has_feature_below:
                    continue
                kids = [m for m, _ in n.next_functions if m is not None]
                if kids_done:
                    has_feature_below[n] = any(k in fns or has_feature_below[k] for k in kids)
                else:
                    stack.append((n, True))
                    stack.extend((k, False) for k in kids if k not in has_feature_below)
        out = [t for t in self.alive if t.grad_fn is None or not has_feature_below[t.grad_fn]]
        self.alive = []
        return out

    def _on_grad(self, key: int, g: torch.Tensor) -> None:
        y = self.feats.pop(key, None)
        if y is None:
            return
        for lay in self.layouts[key]:
            yc = _centred(y, lay) if self.center else y
            prod = yc * g  # reduced in the feature dtype, accumulated in float64 by the caller
            self.sums[(key, lay)] = _channel_sums(prod, lay, self.absolute).detach()
        del y


def copy_for_trajectory(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


@register_score("agf-paper")
class AGFPaper(AGF):
    """The AGF paper's plain reading: post-activation Y, |Y * dL/dY| elementwise, frozen, not centred.

    Kept by name so the published criterion stays reachable whatever ``agf``'s defaults become.
    """

    OPTIONS = {"feature": "post", "abs_mode": "elementwise", "calibration": "frozen", "trajectory_lr": 0.01,
               "center": False}
