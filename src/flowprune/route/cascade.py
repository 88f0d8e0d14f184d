"""Cascades: a light expert answers every input, a router escalates the hard ones to a heavy expert.

Two modules share one interface (``route(x) -> CascadeOutput``, ``forward(x) -> logits``):

* :class:`Cascade` -- two separate networks (the AGF-pruned light expert and the full heavy one).
  Cost per input: the light pass always, plus the heavy pass when escalated.
* :class:`EarlyExitCascade` -- one network with a classifier head on an intermediate stage. The
  "light expert" is the network up to that stage plus the head; an escalated input *continues*
  from the stage's activation through the rest of the network (nothing is recomputed).

Dispatch is per sample inside a batch: the light part runs on the whole batch, the router scores
every sample, the rejected samples are gathered (``index_select``), the heavy part runs **once**
on that sub-batch, and its answers are scattered back (``index_copy_``). A batch of size 1, a batch
where nobody escalates (the heavy part is skipped) and one where everybody does all work.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
from torch import nn

from flowprune.errors import FlowpruneError
from flowprune.models import forward_with_features
from flowprune.route.routers import Router


class CascadeOutput(NamedTuple):
    """What a routed forward returns.

    logits: ``(B, K)`` -- each row from the expert that answered it.
    expert: ``(B,)`` int64 -- 0 = light expert answered, 1 = heavy expert answered.
    score:  ``(B,)`` float -- the router's difficulty score (escalate iff ``score > threshold``).
    """

    logits: torch.Tensor
    expert: torch.Tensor
    score: torch.Tensor

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(1)

    @property
    def heavy_usage(self) -> float:
        return float(self.expert.float().mean()) if self.expert.numel() else 0.0


def _base(model: nn.Module) -> dict:
    return getattr(model, "flowprune_base", None) or {}


def expert_signature(model: nn.Module, input_shape=None) -> tuple[tuple[int, ...] | None, int | None]:
    """(input shape, number of classes) of a model, from ``flowprune_base`` (or ``input_shape``)."""
    b = _base(model)
    shape = tuple(int(s) for s in b["input_shape"]) if "input_shape" in b else (
        tuple(int(s) for s in input_shape) if input_shape is not None else None)
    nc = b.get("num_classes")
    return shape, (int(nc) if nc is not None else None)


def check_experts(light: nn.Module, heavy: nn.Module, input_shape=None) -> tuple[tuple[int, ...], int]:
    """Raise :class:`FlowpruneError` unless both experts take the same input shape and classes.

    Classes are read from ``flowprune_base`` and checked by a forward of one random input (the
    classifier may have been replaced). Returns ``(input_shape, num_classes)``.
    """
    for m, what in ((light, "light"), (heavy, "heavy")):
        if not isinstance(m, nn.Module):
            raise FlowpruneError(f"the {what} expert must be a torch.nn.Module, got {type(m).__name__}")
    ls, lc = expert_signature(light, input_shape)
    hs, hc = expert_signature(heavy, input_shape)
    if ls is None or hs is None:
        raise FlowpruneError("cannot tell the experts' input shape: build them with flowprune.build_model "
                             "or pass input_shape=(C, H, W)")
    if ls != hs:
        raise FlowpruneError(f"the experts take different inputs: light {ls}, heavy {hs}; "
                             "route between two models of the same task")
    if lc is not None and hc is not None and lc != hc:
        raise FlowpruneError(f"the experts have different numbers of classes: light {lc}, heavy {hc}")
    x = torch.zeros(1, *ls, device=next(iter(light.parameters()), torch.zeros(())).device)
    from flowprune.measure import eval_mode

    with torch.no_grad(), eval_mode(light), eval_mode(heavy):
        ko = light(x).shape[-1]
        kh = heavy(x.to(next(iter(heavy.parameters()), torch.zeros(())).device)).shape[-1]
    if ko != kh:
        raise FlowpruneError(f"the experts have different numbers of classes: light outputs {ko}, heavy {kh}")
    return ls, int(ko)


class _RoutedBase(nn.Module):
    """Shared dispatch: subclasses provide ``light_part(x) -> (logits, feats, carry)`` and
    ``heavy_part(carry_subbatch) -> logits``."""

    router: Router
    threshold: float

    def light_part(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover

    def heavy_part(self, carry: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def input_device(self) -> torch.device:
        """The device inputs are moved to (the first parameter's; the CPU for a parameter-free model)."""
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def _check_threshold(self, threshold: float) -> float:
        try:
            t = float(threshold)
        except (TypeError, ValueError):
            raise FlowpruneError(f"threshold must be a number, got {threshold!r}") from None
        if math.isnan(t):
            raise FlowpruneError("threshold must not be NaN (use inf to never escalate, -inf to always)")
        return t

    @torch.no_grad()
    def route(self, x: torch.Tensor, threshold: float | None = None) -> CascadeOutput:
        """Route a batch ``x`` of shape ``(B, *input_shape)``; see :class:`CascadeOutput`.

        ``threshold`` overrides the calibrated one for this call (threshold sweeps).
        """
        thr = self.threshold if threshold is None else self._check_threshold(threshold)
        x = x.to(self.input_device())
        was_training = self.training
        if was_training:  # routing is inference: BatchNorm must use running statistics
            self.eval()
        try:
            logits, feats, carry = self.light_part(x)
            score = self.router(logits, feats)
            mask = score > thr
            idx = mask.nonzero().squeeze(1)
            out = logits
            if idx.numel() > 0:
                heavy_logits = self.heavy_part(carry.index_select(0, idx))
                out = out.to(heavy_logits.dtype) if out.dtype != heavy_logits.dtype else out
                out.index_copy_(0, idx, heavy_logits)
            return CascadeOutput(out, mask.long(), score)
        finally:
            if was_training:
                self.train(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Routed logits ``(B, K)``; use :meth:`route` to see which expert answered."""
        return self.route(x).logits

    @torch.no_grad()
    def light_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Light logits and features, with no routing (calibration and sweeps)."""
        self.eval()
        logits, feats, _ = self.light_part(x.to(self.input_device()))
        return logits, feats


class Cascade(_RoutedBase):
    """A light and a heavy expert behind a router with a threshold (see the module docstring).

    Args:
        light: the light (pruned) expert; not copied (pass a copy if you will change it).
        heavy: the heavy (full) expert; not copied.
        router: a :class:`~flowprune.route.routers.Router` (``make_router(name)``).
        threshold: escalate a sample iff ``router score > threshold`` (``inf``: never, ``-inf``: always).
        input_shape: needed only for experts not built by ``flowprune.build_model``.

    Raises:
        FlowpruneError: experts with different input shapes or numbers of classes.
    """

    kind = "two_experts"

    def __init__(self, light: nn.Module, heavy: nn.Module, router: Router, threshold: float, *,
                 input_shape=None):
        super().__init__()
        if not isinstance(router, Router):
            raise FlowpruneError(f"router must be a flowprune Router (make_router(name)), got {type(router).__name__}")
        self.input_shape, self.num_classes = check_experts(light, heavy, input_shape)
        self.light = light.eval()
        self.heavy = heavy.eval()
        self.router = router
        self.threshold = self._check_threshold(threshold)
        self.eval()

    def light_part(self, x):
        if self.router.needs_features:
            logits, feats = forward_with_features(self.light, x)
        else:
            logits, feats = self.light(x), None
        return logits, feats, x

    def heavy_part(self, carry):
        return self.heavy(carry)


# --------------------------------------------------------------------------------------- early exit

def pipeline(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model as an ordered list of ``(name, module)`` whose composition is its forward.

    Known zoo classes: CifarResNet, WideResNet (conv1 ... layer1..3 ... fc) and the models with
    a ``body`` Sequential (MLP/LeNet-300, CNN1d, VGG: ``body.0``, ``body.1``, ...).
    """
    from flowprune.models import MLP, VGG, CifarResNet, CNN1d, WideResNet

    if isinstance(model, CifarResNet):
        names = ["conv1", "bn1", "relu", "layer1", "layer2", "layer3", "pool", "flatten", "fc"]
    elif isinstance(model, WideResNet):
        names = ["conv1", "layer1", "layer2", "layer3", "bn", "relu", "pool", "flatten", "fc"]
    elif isinstance(model, MLP):
        names = ["flatten"] + [f"body.{i}" for i in range(len(model.body))] + ["fc"]
    elif isinstance(model, (CNN1d, VGG)):
        names = [f"body.{i}" for i in range(len(model.body))] + ["pool", "flatten", "fc"]
    else:
        raise FlowpruneError(f"early exit supports CifarResNet, WideResNet, MLP, CNN1d and VGG models, "
                             f"not {type(model).__name__}; use a two-expert Cascade instead")
    return [(n, model.get_submodule(n)) for n in names]


def default_exit_stage(model: nn.Module) -> str:
    """ResNets: ``layer1``; body models: the middle of the body, after a ReLU."""
    names = [n for n, _ in pipeline(model)]
    if "layer1" in names:
        return "layer1"
    body = [n for n, m in pipeline(model) if n.startswith("body.") and isinstance(m, nn.ReLU)]
    return body[max(0, (len(body) - 1) // 2)]


def split_at(model: nn.Module, stage: str) -> tuple[nn.Sequential, nn.Sequential]:
    """(prefix, suffix) Sequentials sharing ``model``'s modules, split after module ``stage``."""
    pipe = pipeline(model)
    names = [n for n, _ in pipe]
    if stage not in names[:-1]:
        raise FlowpruneError(f"unknown exit stage {stage!r} for {type(model).__name__}; "
                             f"allowed: {', '.join(names[:-1])}")
    k = names.index(stage) + 1
    return nn.Sequential(*[m for _, m in pipe[:k]]), nn.Sequential(*[m for _, m in pipe[k:]])


class ExitHead(nn.Module):
    """Global average pool (for 1-D/2-D maps) + flatten + ``Linear(channels, classes)``."""

    def __init__(self, channels: int, num_classes: int, ndim: int):
        super().__init__()
        self.in_features, self.out_features, self.ndim = int(channels), int(num_classes), int(ndim)
        pool = {4: nn.AdaptiveAvgPool2d(1), 3: nn.AdaptiveAvgPool1d(1)}.get(self.ndim, nn.Identity())
        self.pool = pool
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(self.in_features, self.out_features)

    def features(self, h: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.pool(h))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(h))


class EarlyExitCascade(_RoutedBase):
    """One network with an exit head after ``stage``: the same interface as :class:`Cascade`.

    ``self.light`` (prefix + head) and ``self.heavy`` (the whole network) are exposed for cost
    accounting; the escalated samples only run the suffix. The backbone is not copied.
    """

    kind = "early_exit"

    def __init__(self, model: nn.Module, stage: str, head: ExitHead, router: Router, threshold: float):
        super().__init__()
        if not isinstance(router, Router):
            raise FlowpruneError(f"router must be a flowprune Router (make_router(name)), got {type(router).__name__}")
        self.backbone = model.eval()
        self.stage = stage
        self.prefix, self.suffix = split_at(model, stage)
        self.head = head.eval()
        self.router = router
        self.threshold = self._check_threshold(threshold)
        self.eval()
        self.input_shape, self.num_classes = expert_signature(model)

    @property
    def light(self) -> nn.Module:
        return _LightExit(self.prefix, self.head, _base(self.backbone))

    @property
    def heavy(self) -> nn.Module:
        return self.backbone

    def light_part(self, x):
        h = self.prefix(x)
        f = self.head.features(h)
        return self.head.fc(f), f, h

    def heavy_part(self, carry):
        return self.suffix(carry)


class _LightExit(nn.Module):
    def __init__(self, prefix: nn.Module, head: ExitHead, base: dict):
        super().__init__()
        self.prefix, self.head = prefix, head
        self.flowprune_base = base

    def forward(self, x):
        return self.head(self.prefix(x))


def build_early_exit(model: nn.Module, data, *, stage: str | None = None, router: Router | None = None,
                     threshold: float = math.inf, epochs: int = 10, lr: float = 3e-3, batch_size: int = 128,
                     seed: int = 0) -> EarlyExitCascade:
    """Attach and train an exit head on a **copy** of ``model`` (the backbone stays frozen).

    The head is trained on ``data.train`` (no augmentation) with Adam, cross-entropy, on the
    stage activations computed once with the backbone in eval mode. Returns an
    :class:`EarlyExitCascade` with ``threshold`` (default ``inf``: never exit to the heavy part;
    calibrate it with :func:`flowprune.route.calibrate.calibrate_threshold`).
    """
    from flowprune.data import make_loader
    from flowprune.errors import check_positive_int
    from flowprune.route.routers import ConfidenceRouter

    check_positive_int("epochs", epochs)
    net = copy.deepcopy(model).eval()
    stage = stage or default_exit_stage(net)
    prefix, _ = split_at(net, stage)
    acts, ys = [], []
    with torch.no_grad():
        for x, y in make_loader(data.train, 512):
            acts.append(prefix(x))
            ys.append(y)
    h, y = torch.cat(acts), torch.cat(ys)
    g = torch.Generator().manual_seed(seed)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    head = ExitHead(h.shape[1], data.num_classes, h.dim())
    torch.random.set_rng_state(state)
    with torch.no_grad():
        f = head.features(h)
    opt = torch.optim.Adam(head.fc.parameters(), lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch_size):
            j = perm[i:i + batch_size]
            loss = nn.functional.cross_entropy(head.fc(f[j]), y[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return EarlyExitCascade(net, stage, head.eval(), router or ConfidenceRouter(), threshold)
