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
#
# An exit is attached by a forward hook at a named module of any network (a flowprune zoo model, a
# torchvision or timm model): the light part runs the network until that module has produced its
# output (the hook stops the forward there), the exit head classifies that activation, and an
# escalated sample continues from it through the rest of the network, a torch.fx graph cut out of
# the network's own forward after the exit module. A network whose forward fx cannot trace (or
# whose later layers read values from before the exit) reruns whole on the escalated samples.

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.Hardswish)


class _ExitReached(Exception):
    """Raised by the exit hook: the forward stops once the exit module has run."""

    def __init__(self, out):
        super().__init__("exit reached")
        self.out = out


def check_exit(model: nn.Module, stage: str) -> str:
    """``stage`` if it names a module of ``model`` an exit can follow (not the model itself, not its classifier)."""
    from flowprune.models import classifier_layer

    mods = dict(model.named_modules())
    top = [n for n, _ in model.named_children()]
    if not isinstance(stage, str) or stage == "" or stage not in mods:
        raise FlowpruneError(f"unknown exit module {stage!r} for {type(model).__name__}; give the name of one of its "
                             f"modules (model.named_modules()), e.g. a top-level one: {', '.join(top)}")
    try:
        fc = classifier_layer(model)
    except FlowpruneError:
        fc = None
    if mods[stage] is fc:
        raise FlowpruneError(f"exit module {stage!r} is {type(model).__name__}'s classifier; an exit goes before it "
                             f"(top-level modules: {', '.join(top)})")
    return stage


def default_exit_stage(model: nn.Module) -> str:
    """Where an exit goes when none is named, from the model's top-level stages.

    ``layer1`` when the model has one (flowprune's ResNets and WideResNets, torchvision and timm
    ResNets); otherwise the top-level Sequential with the most children (``body`` of flowprune's
    MLP, CNN1d and VGG; ``blocks`` of a ViT; ``features`` of a torchvision VGG): its middle
    activation (counting activations: ``(n - 1) // 2``), or its middle child when it has none.
    """
    names = dict(model.named_modules())
    if "layer1" in names:
        return "layer1"
    seqs = [(n, m) for n, m in model.named_children() if isinstance(m, (nn.Sequential, nn.ModuleList)) and len(m) >= 2]
    if not seqs:
        raise FlowpruneError(f"cannot pick an exit for {type(model).__name__}: no layer1 and no top-level Sequential; "
                             f"name one (stage=...), e.g. one of its top-level modules: "
                             f"{', '.join(n for n, _ in model.named_children())}")
    name, seq = max(seqs, key=lambda t: len(t[1]))
    acts = [i for i, m in enumerate(seq) if isinstance(m, _ACTIVATIONS)]
    k = acts[max(0, (len(acts) - 1) // 2)] if acts else (len(seq) - 1) // 2
    return f"{name}.{k}"


def pipeline(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The zoo model as an ordered list of ``(name, module)`` whose composition is its forward.

    Known zoo classes only (CifarResNet, WideResNet, MLP, CNN1d, VGG). The early-exit cascade no
    longer needs it (exits attach by hooks at any named module); kept for callers of :func:`split_at`.
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
        raise FlowpruneError(f"pipeline() knows CifarResNet, WideResNet, MLP, CNN1d and VGG models, not "
                             f"{type(model).__name__}; an EarlyExitCascade takes any model (exits by module name)")
    return [(n, model.get_submodule(n)) for n in names]


def split_at(model: nn.Module, stage: str) -> tuple[nn.Sequential, nn.Sequential]:
    """(prefix, suffix) Sequentials sharing a zoo ``model``'s modules, split after module ``stage``."""
    pipe = pipeline(model)
    names = [n for n, _ in pipe]
    if stage not in names[:-1]:
        raise FlowpruneError(f"unknown exit stage {stage!r} for {type(model).__name__}; "
                             f"allowed: {', '.join(names[:-1])}")
    k = names.index(stage) + 1
    return nn.Sequential(*[m for _, m in pipe[:k]]), nn.Sequential(*[m for _, m in pipe[k:]])


class _Prefix(nn.Module):
    """The backbone run until module ``stage`` has produced its output, which it returns (nothing after runs)."""

    def __init__(self, backbone: nn.Module, stage: str):
        super().__init__()
        self.backbone, self.stage = backbone, stage

    def forward(self, x):
        def stop(_m, _inp, out):
            raise _ExitReached(out)

        h = self.backbone.get_submodule(self.stage).register_forward_hook(stop)
        try:
            self.backbone(x)
        except _ExitReached as e:
            return e.out
        finally:
            h.remove()
        raise FlowpruneError(f"exit module {self.stage!r} did not run in {type(self.backbone).__name__}'s forward")


def suffix_after(model: nn.Module, stage: str) -> nn.Module | None:
    """The rest of ``model``'s forward after module ``stage``, as an fx GraphModule ``h -> logits``
    sharing ``model``'s modules; None when fx cannot trace the model or the rest reads anything
    computed before ``stage`` other than its output (then escalated samples rerun the model)."""
    import torch.fx as fx

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return qualname == stage or super().is_leaf_module(m, qualname)

    try:
        graph = _Tracer().trace(model)
    except Exception:  # noqa: BLE001 - not traceable: the rerun path
        return None
    nodes = list(graph.nodes)
    cut = [n for n in nodes if n.op == "call_module" and n.target == stage]
    if len(cut) != 1:
        return None
    i = nodes.index(cut[0])
    before = set(nodes[:i])
    new = fx.Graph()
    env = {cut[0]: new.placeholder("h")}
    for n in nodes[i + 1:]:
        for d in n.all_input_nodes:
            if d in before and d not in env:
                if d.op != "get_attr":
                    return None
                env[d] = new.node_copy(d, lambda a: env[a])
        env[n] = new.node_copy(n, lambda a: env[a])
    return fx.GraphModule(model, new)


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
    """One network with an exit head after module ``stage``: the same interface as :class:`Cascade`.

    ``stage`` is any named module of the network (``"layer1"``, ``"body.3"``, ``"blocks.1"``); the
    exit attaches by a forward hook, so any model works (see :func:`default_exit_stage`).
    ``self.light`` (network up to the exit + head) and ``self.heavy`` (the whole network) are
    exposed for cost accounting; escalated samples run only the rest of the network
    (:attr:`suffix`) when fx can cut it out (``continues_from_exit``), else the whole network.
    The backbone is not copied. ``input_shape`` is needed only for models not built by flowprune.
    """

    kind = "early_exit"

    def __init__(self, model: nn.Module, stage: str, head: ExitHead, router: Router, threshold: float, *,
                 input_shape=None):
        super().__init__()
        if not isinstance(router, Router):
            raise FlowpruneError(f"router must be a flowprune Router (get_router(name)), got {type(router).__name__}")
        self.backbone = model.eval()
        self.stage = check_exit(model, stage)
        self.head = head.eval()
        self.router = router
        self.threshold = self._check_threshold(threshold)
        self.eval()
        self.input_shape, self.num_classes = expert_signature(model, input_shape)
        if self.num_classes is None:
            self.num_classes = head.out_features

    def _cut(self, part: str) -> nn.Module | None:
        """``part`` (``"prefix"`` or ``"suffix"``) of the network at the exit, built once per (backbone,
        stage) and cached outside the module tree, so the routed forward does not rebuild it per batch.
        Both share the backbone's modules, as the old Sequential split did (replace a module of the
        backbone and build a new cascade)."""
        backbone = self.backbone
        key = (self.stage, id(backbone))
        cache = self.__dict__.get("_cut_cache")
        if cache is None or cache["key"] != key:
            cache = self.__dict__["_cut_cache"] = {"key": key}
        if part not in cache:
            cache[part] = _Prefix(backbone, self.stage) if part == "prefix" else suffix_after(backbone, self.stage)
        return cache[part]

    @property
    def prefix(self) -> nn.Module:
        """The network up to the exit (returns the exit module's output)."""
        return self._cut("prefix")

    @property
    def suffix(self) -> nn.Module | None:
        """The rest of the network after the exit (``h -> logits``), or None when it cannot be cut out."""
        return self._cut("suffix")

    @property
    def continues_from_exit(self) -> bool:
        """Whether escalated samples continue from the exit's activation (else the network reruns)."""
        return self.suffix is not None

    def prefix_modules(self) -> list[nn.Module]:
        """The modules that run before the exit (for parameter counts), found by one probe forward."""
        ran: list[nn.Module] = []
        hooks = [m.register_forward_pre_hook(lambda m, _i: ran.append(m)) for m in self.backbone.modules()]
        try:
            with torch.no_grad():
                self.prefix(torch.zeros(1, *self.input_shape, device=self.input_device()))
        finally:
            for h in hooks:
                h.remove()
        return list(dict.fromkeys(ran))

    @property
    def light(self) -> nn.Module:
        return _LightExit(self.prefix, self.head, _base(self.backbone))

    @property
    def heavy(self) -> nn.Module:
        return self.backbone

    def light_part(self, x):
        h = self.prefix(x)
        f = self.head.features(h)
        return self.head.fc(f), f, (h if self.continues_from_exit else x)

    def heavy_part(self, carry):
        rest = self.suffix
        return rest(carry) if rest is not None else self.backbone(carry)


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

    ``stage``: the name of the module the exit follows (any named module; default
    :func:`default_exit_stage`: ``layer1``, or the middle of the model's main Sequential).

    The head is trained on ``data.train`` (no augmentation) with Adam, cross-entropy, on the
    stage activations computed once with the backbone in eval mode. Returns an
    :class:`EarlyExitCascade` with ``threshold`` (default ``inf``: never exit to the heavy part;
    calibrate it with :func:`flowprune.route.calibrate.calibrate`).
    """
    from flowprune.data import make_loader
    from flowprune.errors import check_positive_int
    from flowprune.route.routers import ConfidenceRouter

    check_positive_int("epochs", epochs)
    net = copy.deepcopy(model).eval()
    stage = check_exit(net, stage or default_exit_stage(net))
    prefix = _Prefix(net, stage)
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
    return EarlyExitCascade(net, stage, head.eval(), router or ConfidenceRouter(), threshold,
                            input_shape=getattr(data, "input_shape", None))
