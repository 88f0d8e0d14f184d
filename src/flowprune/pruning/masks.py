"""Unstructured weight masks installed through ``torch.nn.utils.parametrize`` (no model rewriting).

Two parametrizations of a Conv/Linear ``weight``:

* :class:`LogitMask` (Hyperflows): a trainable logit ``m`` of the weight's shape. The forward uses
  ``w_eff = w * 1[m >= 0]``; the backward is straight-through: ``dL/dw = 1[m >= 0] * dL/dw_eff``
  and ``dL/dm = s * w * dL/dw_eff`` (``s = 0.25`` by default, as in the authors' code), so a
  pruned weight keeps receiving "flow" (the loss response to its presence) and can grow back.
* :class:`FixedMask` (magnitude baselines): a 0/1 buffer, ``w_eff = w * mask``.

Layer selection (``layers=`` in :func:`install_masks`): by default every ``nn.Conv1d/2d/3d`` and
``nn.Linear`` weight is masked, **including the first layer and the classifier** (the authors
mask all conv and linear weights). Biases, BatchNorm/LayerNorm and embeddings are never masked.
Pass ``include_classifier=False`` or an explicit list of module names to change that.

Sparsity here is *weight sparsity over the masked weights*: the share of masked weight entries
whose mask is 0 (biases and unmasked layers do not count).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from flowprune.errors import FlowpruneError

MASKABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)


class _StraightThroughMask(torch.autograd.Function):
    """Fused ``w * STE(m >= 0)`` with the pressure gradient folded into the backward.

    Forward: ``w * keep`` (``keep = 1[m >= 0]``, written as floats by ``torch.ge(m, 0, out=keep)``:
    one pass, about half the time of ``clamp(sign(m) + 1, max=1)`` and a fraction of a bool result's
    on x86 CPUs; ``python -m benchmarks.bench_mask_overhead --micro`` times the three). Backward:
    ``dL/dw = g * keep``; ``dL/dm = s * w * g + pressure`` where ``pressure`` is the gradient of the
    pressure term ``P * mean(m)`` with respect to each logit (``P / N``; 0 when no pressure is
    applied this way). One ``addcmul`` computes it, so the pressure term needs no graph node, no
    reduction over all logits in the forward and no extra gradient accumulation.

    ``keep`` is written into a buffer the owning :class:`LogitMask` reuses from step to step (no
    allocation per step, see :meth:`LogitMask._keep_buffer`); a graph that is still alive keeps its
    own buffer, so two forwards before one backward stay correct.
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, m: torch.Tensor, owner: LogitMask) -> torch.Tensor:  # type: ignore[override]
        m = m.detach()
        keep = owner._keep_buffer(m)
        torch.ge(m, 0, out=keep)  # 1[m >= 0] written as floats in one pass (a bool result is slower on CPU)
        if keep.dtype != w.dtype:
            keep = keep.to(w.dtype)
        ctx.save_for_backward(w)
        ctx.keep, ctx.owner = keep, owner  # a plain reference: the buffer is not reused while this graph lives
        return w * keep

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        (w,) = ctx.saved_tensors
        gw = g * ctx.keep if ctx.needs_input_grad[0] else None
        gm = None
        if ctx.needs_input_grad[1]:
            owner = ctx.owner
            if owner.pressure:
                gm = torch.addcmul(owner._pressure_tensor(g), w, g, value=owner.scale)
            else:
                gm = torch.mul(w, g).mul_(owner.scale)
        return gw, gm, None


class LogitMask(nn.Module):
    """Parametrization ``w -> w * 1[logits >= 0]`` with a trainable logit per weight entry.

    Args:
        shape: the weight's shape; ``logits`` has the same shape.
        init: logits start uniform in ``[init[0], init[1]]`` (default U[0.2, 0.5]: all kept).
        scale: the straight-through factor ``s`` of ``dL/dm = s * w * dL/dw_eff``.
        generator: RNG for the initial logits.

    ``pressure`` (a float attribute, 0 by default) is added to every logit's gradient in the
    backward: :func:`set_pressure` sets it to ``P / N`` so the trainer does not need a
    ``P * mean(m)`` term in its loss (same gradient, no graph over all logits).
    """

    def __init__(self, shape: Sequence[int], init: tuple[float, float] = (0.2, 0.5), scale: float = 0.25,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        lo, hi = init
        u = torch.rand(tuple(shape), generator=generator, dtype=dtype)
        self.logits = nn.Parameter((lo + (hi - lo) * u).to(device))
        self.scale = float(scale)
        self.pressure = 0.0
        self._keep: torch.Tensor | None = None  # reusable float buffer for 1[m >= 0] (not module state)
        self._ptensor: torch.Tensor | None = None
        self._pvalue = 0.0

    def _keep_buffer(self, m: torch.Tensor) -> torch.Tensor:
        """A buffer of ``m``'s shape/dtype/device for the keep mask, reused when nobody else holds it.

        The previous step's graph is freed by its backward, so in a training loop the same buffer
        serves every step (no allocation, which on glibc also avoids the page faults of a freshly
        trimmed heap). While a graph still holds it (two forwards before one backward, or a graph
        kept with ``retain_graph``), a new buffer is taken instead.
        """
        if type(m) is not torch.Tensor or _compiling() or torch.jit.is_tracing():
            return torch.empty_like(m)  # tracing / export / fake or wrapped tensors: no state kept
        b = self._keep
        # 3 references when only this module holds it: ``self._keep``, ``b`` and getrefcount's argument
        if b is None or sys.getrefcount(b) > 3 or b.shape != m.shape or b.dtype != m.dtype or b.device != m.device:
            b = self._keep = torch.empty_like(m, memory_format=torch.contiguous_format)
        return b

    def _pressure_tensor(self, like: torch.Tensor) -> torch.Tensor:
        """``pressure`` as a 0-dim tensor, rebuilt only when it changed."""
        t = self._ptensor
        if t is None or t.dtype != like.dtype or t.device != like.device or self._pvalue != self.pressure:
            t = self._ptensor = torch.tensor(self.pressure, dtype=like.dtype, device=like.device)
            self._pvalue = self.pressure
        return t

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _StraightThroughMask.apply(w, self.logits, self)

    def keep(self) -> torch.Tensor:
        """The 0/1 mask (bool tensor of the weight's shape)."""
        return self.logits.detach() >= 0


class FixedMask(nn.Module):
    """Parametrization ``w -> w * mask`` with a 0/1 buffer (no gradient to the mask)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.detach().clone().to(torch.float32))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask.to(w.dtype)

    def keep(self) -> torch.Tensor:
        return self.mask > 0


def select_layers(model: nn.Module, layers: Iterable[str] | None = None, *,
                  include_classifier: bool = True) -> list[str]:
    """Names of the modules whose ``weight`` gets masked.

    ``layers=None`` selects every Conv/Linear; ``include_classifier=False`` leaves the last Linear
    out. Raises :class:`FlowpruneError` naming the problem if nothing is maskable or a given name
    is not a Conv/Linear of the model.
    """
    mods = dict(model.named_modules())
    if layers is None:
        names = [n for n, m in mods.items() if isinstance(m, MASKABLE) and getattr(m, "weight", None) is not None]
        if not include_classifier:
            lin = [n for n in names if isinstance(mods[n], nn.Linear)]
            if lin:
                names.remove(lin[-1])
    else:
        names = list(layers)
        for n in names:
            if n not in mods:
                raise FlowpruneError(f"layer {n!r} is not a module of the model; maskable layers: "
                                     f"{[k for k, m in mods.items() if isinstance(m, MASKABLE)][:20]}")
            if not isinstance(mods[n], MASKABLE):
                raise FlowpruneError(f"layer {n!r} is a {type(mods[n]).__name__}, not a Conv/Linear; "
                                     "only Conv1d/2d/3d and Linear weights can be masked")
    if not names:
        raise FlowpruneError("the model has no maskable layer (no Conv1d/2d/3d or Linear weight to prune)")
    return names


def install_masks(model: nn.Module, layers: Iterable[str] | None = None, *, kind: str = "logit",
                  init: tuple[float, float] = (0.2, 0.5), scale: float = 0.25, masks: dict | None = None,
                  include_classifier: bool = True, seed: int = 0, inplace: bool = False) -> nn.Module:
    """Return a copy of ``model`` (``inplace=False``) whose selected weights are masked.

    Args:
        kind: ``"logit"`` (:class:`LogitMask`, trainable) or ``"fixed"`` (:class:`FixedMask`, given by
            ``masks`` = ``{layer name: 0/1 tensor}``; layers missing from ``masks`` keep everything).
        init, scale: see :class:`LogitMask`.
        seed: seed of the initial logits.
    """
    if kind not in ("logit", "fixed"):
        raise FlowpruneError(f"mask kind must be 'logit' or 'fixed', got {kind!r}")
    if not (isinstance(scale, (int, float)) and scale > 0):
        raise FlowpruneError(f"straight-through scale must be a positive number, got {scale!r}")
    names = select_layers(model, layers, include_classifier=include_classifier)
    net = model if inplace else copy.deepcopy(model)
    mods = dict(net.named_modules())
    gen = torch.Generator().manual_seed(int(seed))
    for n in names:
        m = mods[n]
        if parametrize.is_parametrized(m, "weight"):
            raise FlowpruneError(f"layer {n!r} already has a weight parametrization; bake or remove it first")
        w = m.weight
        if kind == "logit":
            p = LogitMask(w.shape, init, scale, gen, dtype=w.dtype, device=w.device)
        else:
            keep = (masks or {}).get(n)
            p = FixedMask(torch.ones_like(w) if keep is None else keep.to(w.device).reshape(w.shape))
        parametrize.register_parametrization(m, "weight", p)
    return net


def masked_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{layer name: its LogitMask/FixedMask}`` for every masked weight."""
    out = {}
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            for p in m.parametrizations["weight"]:
                if isinstance(p, (LogitMask, FixedMask)):
                    out[name] = p
    return out


def set_pressure(model: nn.Module, per_logit: float) -> None:
    """Add ``per_logit`` to every mask logit's gradient from now on (``P / N`` for a pressure ``P``)."""
    for p in masked_modules(model).values():
        if isinstance(p, LogitMask):
            p.pressure = float(per_logit)


def mask_logits(model: nn.Module) -> list[nn.Parameter]:
    """All trainable mask logits."""
    return [p.logits for p in masked_modules(model).values() if isinstance(p, LogitMask)]


def weight_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter that is not a mask logit (weights, biases, BN)."""
    ids = {id(p) for p in mask_logits(model)}
    return [p for p in model.parameters() if id(p) not in ids]


def original_weight(module: nn.Module) -> torch.Tensor:
    """The unmasked weight of a parametrized module."""
    return module.parametrizations["weight"].original


@torch.no_grad()
def keep_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{layer: bool keep mask}`` (a copy)."""
    return {n: p.keep().clone() for n, p in masked_modules(model).items()}


def sparsity_report(model: nn.Module) -> dict:
    """Weight sparsity over the masked weights: ``{"sparsity", "remaining", "kept", "total", "layers"}``.

    ``layers`` maps each masked layer to ``{"sparsity", "kept", "total"}``; for a baked model (no
    parametrizations) pass it through :func:`flowprune.sparse.zero_sparsity_report` instead.
    """
    layers, kept, total = {}, 0, 0
    for n, p in masked_modules(model).items():
        k = int(p.keep().sum())
        t = p.keep().numel()
        layers[n] = {"sparsity": 1 - k / t, "kept": k, "total": t}
        kept += k
        total += t
    if total == 0:
        raise FlowpruneError("the model has no masked layer; install masks first")
    return {"sparsity": 1 - kept / total, "remaining": kept / total, "kept": kept, "total": total,
            "layers": layers}


@torch.no_grad()
def set_global_topk(model: nn.Module, keep_count: int) -> float:
    """Shift every logit by one global threshold so that exactly the ``keep_count`` largest are >= 0.

    This is the documented end-of-run safeguard that makes the final sparsity exact: the weights
    whose logits sit closest to the threshold flip, nothing else changes. Returns the shift applied.
    """
    params = mask_logits(model)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    n = flat.numel()
    keep_count = max(0, min(int(keep_count), n))
    if keep_count == n:
        t = float(flat.min())
        shift = -t if t < 0 else 0.0
    elif keep_count == 0:
        shift = -(float(flat.max()) + 1.0)
    else:
        vals = torch.topk(flat, keep_count + 1).values
        hi, lo = float(vals[keep_count - 1]), float(vals[keep_count])
        # threshold halfway between the k-th and (k+1)-th largest logit; ties are broken below
        thr = 0.5 * (hi + lo) if hi > lo else hi
        shift = -thr
    for p in params:
        p.add_(shift)
    if 0 < keep_count < n:
        # ties at the threshold: resolve exactly by rank
        cur = sum(int((p >= 0).sum()) for p in params)
        if cur != keep_count:
            order = torch.argsort(torch.cat([p.detach().reshape(-1) for p in params]), descending=True)
            keep = torch.zeros(n, dtype=torch.bool)
            keep[order[:keep_count]] = True
            off = 0
            for p in params:
                k = keep[off:off + p.numel()].reshape(p.shape)
                p.copy_(torch.where(k, p.clamp(min=1e-6), p.clamp(max=-1e-6)))
                off += p.numel()
    return shift
