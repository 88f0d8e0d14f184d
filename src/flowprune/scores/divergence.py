"""The IDAP++ flow-divergence score of filters, neurons and attention heads (METHODS.md section 3).

Registered as ``divergence`` in the score registry (higher = keep).

**Conv filter** (the authors' code): for output channel ``c`` of a convolution with raw output
``Y`` of shape ``(B, C, *S)`` (``S`` = ``(H, W)`` or ``(L,)``) and weight ``W`` of shape
``(C, C_in/groups, *k)``::

    score_c = 1 / (C * prod(S)) * mean_b ||ReLU(Y[b, c])||_2 * ||W[c]||_2

The ``1/(C*prod(S))`` factor is the authors' layer normalisation; it is kept because the ranking
is global across layers and it is what their numbers were produced with.

**Linear neuron** (per neuron; the authors' code collapses a layer to one scalar, a bug): for
``Y`` of shape ``(B, *T, N)`` (``T`` = tokens, possibly none) and weight ``(N, D)``::

    score_n = 1 / (N * prod(T)) * mean_b ||ReLU(Y[b, ..., n])||_2 * ||W[n]||_2

(norm over the sample's tokens, mean over the batch, times the weight-row norm) -- the exact
analogue of the conv formula with tokens in place of pixels.

**Attention head** (timm ``Attention``: ``qkv``, ``proj``, ``num_heads``, ``head_dim``): the head's
output ``O_h`` (the input of ``proj`` restricted to the head's ``head_dim`` slice, shape
``(B, T, d)``) and the head's ``q``, ``k`` and ``v`` weight rows ``W_h``::

    score_h = 1 / (H * T * d) * mean_b ||O_h[b]||_2 * ||W_h||_2

No ReLU here (choice the paper leaves open: a head's output is a signed mixture of values, not
a pre-activation; ``relu_heads=True`` applies it anyway). The divergence of the attention layer
is the sum of its heads' scores (:func:`attention_layer_divergence`).

**Recurrent hidden unit** (``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``, :mod:`flowprune.recurrent`): the
linear-neuron formula on the module's output sequence ``(B, T, directions * H)`` and each output
channel's gate rows over every layer (:func:`flowprune.recurrent.unit_rows`), without the ReLU
(hidden states are signed, tanh-bounded); a unit's two directions are averaged.

Only forward passes, no gradients: one forward per calibration batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flowprune.errors import FlowpruneError
from flowprune.recurrent import is_recurrent, output_sequence, unit_rows
from flowprune.scores.base import Score, register_score


def conv_filter_divergence(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-filter divergence of one batch: ``y`` (B, C, *S) raw conv output, ``weight`` (C, ...); -> (C,)."""
    b, c = y.shape[:2]
    spatial = math.prod(y.shape[2:]) if y.dim() > 2 else 1
    act = F.relu(y).reshape(b, c, -1).norm(dim=2).mean(0)
    return act * weight.detach().reshape(c, -1).norm(dim=1) / (c * spatial)


def neuron_divergence(y: torch.Tensor, weight: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """Per-neuron divergence: ``y`` (B, *T, N) linear output, ``weight`` (N, D); -> (N,)."""
    b, n = y.shape[0], y.shape[-1]
    y3 = y.reshape(b, -1, n)
    t = y3.shape[1]
    act = (F.relu(y3) if relu else y3).norm(dim=1).mean(0)
    return act * weight.detach().reshape(n, -1).norm(dim=1) / (n * t)


def head_divergence(o: torch.Tensor, qkv_weight: torch.Tensor, num_heads: int, relu: bool = False) -> torch.Tensor:
    """Per-head divergence: ``o`` (B, T, H*d) concatenated head outputs, ``qkv_weight`` (3*H*d, D); -> (H,)."""
    b, t, hd = o.shape
    d = hd // num_heads
    oh = o.reshape(b, t, num_heads, d)
    if relu:
        oh = F.relu(oh)
    act = oh.permute(0, 2, 1, 3).reshape(b, num_heads, -1).norm(dim=2).mean(0)
    w = qkv_weight.detach().reshape(3, num_heads, d, -1).permute(1, 0, 2, 3).reshape(num_heads, -1).norm(dim=1)
    return act * w / (num_heads * t * d)


def attention_layer_divergence(head_scores: torch.Tensor) -> float:
    """The divergence of an attention layer: the sum of its heads' divergences."""
    return float(head_scores.sum())


def _unit_kind(unit) -> str:
    m = unit.module
    if getattr(unit, "kind", None) == "head" or (hasattr(m, "qkv") and hasattr(m, "num_heads")):
        return "head"
    if isinstance(m, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(m, nn.Linear):
        return "linear"
    if is_recurrent(m):
        return "recurrent"
    raise FlowpruneError(f"divergence score: unit {unit.name!r} has module {type(m).__name__}; "
                         "supported: Conv1d/Conv2d filters, Linear neurons, timm-style attention heads, "
                         "LSTM/GRU/RNN hidden units")


def _producers(unit) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(module_name, idxs, root_idxs)`` of the unit's Conv/Linear producers (root first)."""
    prods = [(p.module_name, p.idxs, p.root_idxs) for p in getattr(unit, "producers", []) or []]
    if not prods:
        ar = torch.arange(int(unit.size))
        return [(unit.name, ar, ar)]
    prods.sort(key=lambda p: p[0] != unit.name)
    return prods


@torch.no_grad()
def divergence_scores(model: nn.Module, units: Sequence, batches: Iterable, *, relu_heads: bool = False,
                      group_reduce: str = "mean") -> dict[str, torch.Tensor]:
    """``{unit.name: Tensor(unit.size)}`` of flow divergences, averaged over the batches' samples.

    Args:
        model: not changed (hooks removed afterwards; forward in eval mode).
        units: prunable units (``name``, ``kind``, ``module``, ``size``, ``producers``) from
            :func:`flowprune.units.find_units`.
        batches: ``(x, y)`` pairs or input tensors.
        relu_heads: apply ReLU to head outputs too (default False, see the module docstring).
        group_reduce: how a unit whose channels are produced by several coupled layers (a
            residual stream: the stem conv and every block's last conv write the same channels)
            combines their per-filter scores: ``mean`` (default; keeps coupled units on the same
            scale as single-layer ones in the global ranking), ``sum`` (the total flow into the
            channel) or ``root`` (the root layer only, as the authors' per-layer code does).
    """
    from flowprune.measure import eval_mode

    if group_reduce not in ("mean", "sum", "root"):
        raise FlowpruneError(f"group_reduce must be mean, sum or root, got {group_reduce!r}")
    acc = _Sums()
    handles, plans = _attach(model, units, acc, relu_heads, group_reduce)
    n_batches = 0
    try:
        with eval_mode(model):
            dev = next((p.device for p in model.parameters()), torch.device("cpu"))
            for b in batches:
                x = b[0] if isinstance(b, (tuple, list)) else b
                model(x.to(dev))
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
    if n_batches == 0:
        raise FlowpruneError("the divergence score needs at least one calibration batch")
    return {u.name: _unit_score(u, plans.get(u.name), acc, group_reduce) for u in units}


class _Sums:
    """Per-key running sums of per-sample scores (weighted by the batch size) and sample counts."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, key: str, s: torch.Tensor, b: int) -> None:
        s = s.detach().double().cpu() * b
        self.sums[key] = self.sums[key] + s if key in self.sums else s
        self.counts[key] = self.counts.get(key, 0) + b

    def mean(self, key: str) -> torch.Tensor | None:
        return self.sums[key] / self.counts[key] if key in self.sums else None


def _attach(model: nn.Module, units: Sequence, acc: _Sums, relu_heads: bool, group_reduce: str):
    """Register the score hooks; returns ``(handles, {unit: [(producer, idxs, root_idxs)]})``."""
    handles = []
    modules = dict(model.named_modules())
    plans: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
    for u in units:
        kind = _unit_kind(u)
        m = u.module
        if kind == "head":
            proj = getattr(m, "proj", None)
            qkv = getattr(m, "qkv", None)
            if not isinstance(proj, nn.Linear) or not isinstance(qkv, nn.Linear):
                raise FlowpruneError(f"divergence score: attention unit {u.name!r} needs 'qkv' and 'proj' Linear "
                                     "layers (timm Attention layout)")

            def pre_hook(_mod, inp, key=u.name, att=m):
                o = inp[0]
                acc.add(key, head_divergence(o, att.qkv.weight, int(att.num_heads), relu_heads), o.shape[0])
            handles.append(proj.register_forward_pre_hook(pre_hook))
            continue
        if kind == "recurrent":
            own = u.producers[0]
            plans[u.name] = [(u.name, own.idxs, own.root_idxs)]

            def rnn_hook(md, _inp, out, key=f"{u.name}#0"):
                y = output_sequence(md, out)
                acc.add(key, neuron_divergence(y, unit_rows(md), relu=False), y.shape[0])
            handles.append(m.register_forward_hook(rnn_hook))
            continue
        prods = _producers(u)
        if group_reduce == "root":
            prods = prods[:1]
        prods = [p for p in prods if isinstance(modules.get(p[0]), (nn.modules.conv._ConvNd, nn.Linear))]
        if not prods:
            prods = [(u.name, torch.arange(int(u.size)), torch.arange(int(u.size)))]
            modules.setdefault(u.name, m)
        plans[u.name] = prods
        for j, (mname, _idxs, _root) in enumerate(prods):
            mod = modules[mname]
            if isinstance(mod, nn.modules.conv._ConvNd):
                def hook(md, _inp, out, key=f"{u.name}#{j}"):
                    acc.add(key, conv_filter_divergence(out, md.weight), out.shape[0])
            else:
                def hook(md, _inp, out, key=f"{u.name}#{j}"):
                    acc.add(key, neuron_divergence(out, md.weight), out.shape[0])
            handles.append(mod.register_forward_hook(hook))
    return handles, plans


def _unit_score(u, plan, acc: _Sums, group_reduce: str) -> torch.Tensor:
    """The unit's score vector from the hooks' sums (coupled producers combined by ``group_reduce``)."""
    size = int(u.size)
    if plan is not None:
        total = torch.zeros(size, dtype=torch.float64)
        hits = torch.zeros(size, dtype=torch.float64)
        for j, (_mname, idxs, root) in enumerate(plan):
            per_row = acc.mean(f"{u.name}#{j}")
            if per_row is None:
                continue
            total.index_add_(0, root.long(), per_row[idxs.long()])
            hits.index_add_(0, root.long(), torch.ones(len(root), dtype=torch.float64))
        if hits.min() == 0:
            raise FlowpruneError(f"divergence score: unit {u.name!r} was never run by the forward pass")
        s = total / hits if group_reduce == "mean" else total
    else:
        s = acc.mean(u.name)
        if s is None:
            raise FlowpruneError(f"divergence score: unit {u.name!r} was never run by the forward pass")
    if s.numel() != size:
        raise FlowpruneError(f"divergence score: unit {u.name!r} has size {size} but its module gives "
                             f"{s.numel()} scores")
    return s.float()


@register_score("divergence")
class DivergenceScore(Score):
    """IDAP++ flow divergence (see the module docstring); higher = keep.

    Options: ``relu_heads`` (False), ``group_reduce`` (``mean`` | ``sum`` | ``root``).
    """

    OPTIONS = {"relu_heads": False, "group_reduce": "mean"}

    def validate(self) -> None:
        if self.options["group_reduce"] not in ("mean", "sum", "root"):
            raise FlowpruneError(f"group_reduce must be mean, sum or root, got {self.options['group_reduce']!r}")

    def compute(self, model: nn.Module, units: list, batches: list) -> dict[str, torch.Tensor]:
        return divergence_scores(model, units, batches, relu_heads=bool(self.options["relu_heads"]),
                                 group_reduce=str(self.options["group_reduce"]))
