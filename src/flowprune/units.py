"""Prunable structural units, found with Torch-Pruning's DependencyGraph.

A :class:`PrunableUnit` is one thing a structural cut can shrink:

* ``channel`` -- the output channels of a convolution, *with every coupled layer*: channels tied
  across residual additions, concatenations and depthwise convolutions form one group (from
  ``torch_pruning.DependencyGraph.get_all_groups``) and are one unit, named after the first
  member convolution in module order (e.g. ``conv1`` for the stage-1 residual stream of a CIFAR
  ResNet, ``layer1.0.conv1`` for a block's inner channels);
* ``neuron`` -- the hidden neurons of a linear layer (e.g. ``blocks.0.mlp.fc1`` with ``fc2``'s
  inputs, ``body.0`` of an MLP);
* ``head``   -- the attention heads of a timm-style attention module (``qkv``/``proj`` linears
  and ``num_heads``/``head_dim`` attributes), named after the attention module (``blocks.0.attn``).

Every unit knows the feature ``Y`` that disappears when one of its units is removed: by default
the *inputs of the layers whose input channels are cut* ("consumers": the next conv / linear,
i.e. the post-activation tensor, or the head's context vector before ``proj``), and as an
option the raw outputs of the layers whose output channels are cut ("producers").

Excluded by design: the classifier's outputs, patch/token embeddings (``PatchEmbed``,
``nn.Embedding``, ``pos_embed``/``cls_token``) and so every group coupled to a transformer's
residual stream, and the ``qkv`` output groups (cut as heads instead). Layers flowprune cannot
cut (a module with parameters of a type Torch-Pruning has no rule for) are left intact: every
group that touches one is dropped, and the layer is reported in ``units.unsupported`` and by
:func:`unsupported_layers`, with a logged warning. Nothing is silently mis-cut.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from flowprune import notices, unit_kinds
from flowprune.errors import FlowpruneError, bad_choice

log = logging.getLogger(__name__)

KINDS = ("channel", "neuron", "head")

# Leaf module types whose parameters Torch-Pruning (and so flowprune) knows how to cut.
_SUPPORTED_PARAM_TYPES: tuple[type, ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.PReLU, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)
# Direct (unwrapped) parameters of container modules that are token embeddings: excluded, not unsupported.
_EMBED_PARAM_NAMES = ("cls_token", "pos_embed", "dist_token", "reg_token", "mask_token", "class_token",
                      "pos_embedding", "absolute_pos_embed", "pos_embed_window")
# Why a supported-looking module type is still left intact.
_UNSUPPORTED_TYPE_REASONS = {
    nn.MultiheadAttention: "nn.MultiheadAttention: its embed dim (the residual stream) is left intact; its heads are "
                           "cut unless kdim/vdim differ, add_bias_kv or add_zero_attn (see flowprune.mha)",
}


@dataclass
class Member:
    """One layer of a unit's group: ``module_name``, and for every index it cuts, the unit index.

    ``idxs[i]`` is an index along the layer's cut dimension and ``root_idxs[i]`` the unit
    (0..size-1) it belongs to. ``role`` is ``"out"`` (output channels / features / BN channels
    are cut) or ``"in"`` (input channels of a consumer are cut).
    """

    module_name: str
    role: str
    idxs: torch.Tensor
    root_idxs: torch.Tensor


@dataclass(eq=False)
class PrunableUnit:
    """One prunable structure: ``size`` units (channels, neurons or heads) cut together.

    Attributes:
        name: module path of the root layer (``layer1.0.conv1``, ``blocks.0.mlp.fc1``,
            ``blocks.0.attn`` for heads). Stable across cuts, so plans and scores key on it.
        kind: ``channel`` | ``neuron`` | ``head``.
        module: the root layer (for heads, the attention module).
        size: current number of units.
        producers: Conv/Linear members whose *output* rows are cut (filters of the unit).
        norms: BatchNorm/LayerNorm/GroupNorm members cut with it.
        consumers: Conv/Linear members whose *input* channels are cut: their input is the
            feature ``Y`` (post-activation) the AGF score uses; depthwise convs count as
            consumers (their input channel is the unit's channel).
        block: the enclosing block (module path of the root's parent) for block-relative
            normalisation.
        head_dim: per-head width (heads only).
        group: the Torch-Pruning group (``None`` for heads).
        classes: for a group with grouped convolutions / GroupNorms (see :func:`channel_classes`),
            the root-layer channels of every unit: unit ``i`` is the channels at one offset of
            every conv group, cut together so groups stay consistent (``size`` is then the
            number of offsets); ``None`` when unit ``i`` is root channel ``i``.
        channel_groups: the largest group count of a grouped member (1 if none).
    """

    name: str
    kind: str
    module: nn.Module
    size: int
    producers: list[Member] = field(default_factory=list)
    norms: list[Member] = field(default_factory=list)
    consumers: list[Member] = field(default_factory=list)
    block: str = ""
    head_dim: int = 0
    group: object | None = field(default=None, repr=False)
    classes: list[list[int]] | None = field(default=None, repr=False)
    channel_groups: int = 1

    def channels(self, idxs: Sequence[int]) -> list[int]:
        """Root-layer channel indices of the units ``idxs`` (a unit of a grouped group is a class of
        channels at the same offset in every conv group; otherwise unit i is channel i)."""
        if self.classes is None:
            return sorted(int(i) for i in idxs)
        return sorted(c for i in idxs for c in self.classes[int(i)])

    def member_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """Name -> module of every member, resolved on ``model`` (a copy with the same names)."""
        mods = dict(model.named_modules())
        names = {m.module_name for m in self.producers + self.norms + self.consumers}
        return {n: mods[n] for n in names if n in mods}


class UnitList(list):
    """A list of :class:`PrunableUnit` plus what was left out: ``unsupported`` (layer names
    flowprune cannot cut, left intact), ``reasons`` (``{name: why}`` for each of them) and
    ``excluded`` (classifier/embedding layers, left intact by design)."""

    unsupported: list[str]
    excluded: list[str]
    reasons: dict[str, str]

    def by_name(self) -> dict[str, PrunableUnit]:
        return {u.name: u for u in self}


def _as_inputs(example_inputs) -> torch.Tensor:
    if isinstance(example_inputs, torch.Tensor):
        return example_inputs
    raise FlowpruneError("example_inputs must be a tensor batch, e.g. torch.randn(1, 3, 32, 32)")


def is_attention(m: nn.Module) -> bool:
    """True for a timm-style attention: ``qkv`` and ``proj`` linears, ``num_heads`` and ``head_dim``."""
    qkv, proj = getattr(m, "qkv", None), getattr(m, "proj", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)):
        return False
    h, d = getattr(m, "num_heads", None), getattr(m, "head_dim", None)
    if not isinstance(h, int) or not isinstance(d, int):
        return False
    return qkv.out_features == 3 * h * d and proj.in_features == h * d


def _classifier_names(model: nn.Module) -> set[str]:
    from flowprune.models import classifier_layer

    names = set()
    try:
        fc = classifier_layer(model)
    except FlowpruneError:
        return names
    for n, m in model.named_modules():
        if m is fc:
            names.add(n)
    # timm models: the head attribute
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        names.update(n for n, m in model.named_modules() if m is head)
    return names


def _embedding_names(model: nn.Module) -> set[str]:
    out = set()
    for n, m in model.named_modules():
        if isinstance(m, nn.Embedding) or "PatchEmbed" in type(m).__name__:
            out.update(n2 for n2, _ in m.named_modules(prefix=n))
    return out


def param_kind(name: str, p: torch.Tensor) -> str:
    """How flowprune treats a direct (unwrapped) parameter of a module Torch-Pruning has no rule for.

    ``embed`` -- a token embedding (``cls_token``, ``pos_embed``, a ``(1, N, D)`` tensor): its
    channels are a transformer's residual stream, excluded by design; ``scale`` -- a per-channel
    vector (exactly one dimension > 1, e.g. ConvNeXt's ``layer_scale`` of shape ``(C, 1, 1)`` or
    timm's ``gamma`` of shape ``(C,)``): cut with the channels it scales; ``scalar`` -- no
    dimension > 1 (never cut, never in the way); ``other`` -- anything else (unsupported).
    """
    leaf = name.rpartition(".")[2]
    if leaf in _EMBED_PARAM_NAMES or (p.dim() == 3 and p.shape[0] == 1 and p.shape[1] > 1):
        return "embed"
    big = [s for s in p.shape if s > 1]
    if not big:
        return "scalar"
    if len(big) == 1:
        return "scale"
    return "other"


def _scale_dim(p: torch.Tensor) -> int:
    """The pruned dimension of an unwrapped parameter: its last dimension > 1 (Torch-Pruning's rule)."""
    big = [i for i, s in enumerate(p.shape) if s > 1]
    return big[-1] if big else p.dim() - 1


def unsupported_reasons(model: nn.Module) -> dict[str, str]:
    """``{module name: why flowprune cannot cut it}`` for every module left intact by every cut.

    A module is unsupported when it holds a parameter flowprune has no cutting rule for: a leaf
    of a type outside Conv/Linear/BatchNorm/LayerNorm/GroupNorm/InstanceNorm/Embedding/PReLU
    whose direct parameters are not all token embeddings or per-channel scale vectors (see
    :func:`param_kind`), or an ``nn.MultiheadAttention`` (PyTorch cannot run it with fewer heads).
    """
    bad: dict[str, str] = {}
    for n, m in model.named_modules():
        own = [(k, p) for k, p in m._parameters.items() if p is not None]
        if not own:
            continue
        for typ, why in _UNSUPPORTED_TYPE_REASONS.items():
            if isinstance(m, typ):
                bad[n] = why
                break
        if n in bad or isinstance(m, _SUPPORTED_PARAM_TYPES + unit_kinds.module_types()):
            continue
        others = [(k, p) for k, p in own if param_kind(f"{n}.{k}", p) == "other"]
        if others:
            k, p = others[0]
            bad[n] = (f"{type(m).__name__} holds parameter {k!r} of shape {tuple(p.shape)}, which is neither a "
                      "per-channel vector nor a token embedding; flowprune has no rule to cut it")
    return bad


def unsupported_layers(model: nn.Module, example_inputs: torch.Tensor | None = None) -> list[str]:
    """Names of modules holding parameters that flowprune cannot cut (left intact by every cut).

    See :func:`unsupported_reasons` for the rule and the reason of each. ``example_inputs`` is
    accepted for symmetry with :func:`find_units` and unused.
    """
    return list(unsupported_reasons(model))


def _unwrapped(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    import torch_pruning as tp

    wrapped = set()
    for m in model.modules():
        if ops_prunable(tp, m) or isinstance(m, unit_kinds.module_types()):
            wrapped.update(id(p) for p in m.parameters())
    out = []
    for n, p in model.named_parameters():
        if id(p) not in wrapped and any(s > 1 for s in p.shape):
            out.append((p, p.dim() - 1 if param_kind(n, p) == "embed" else _scale_dim(p)))
    return out


def ops_prunable(tp, m: nn.Module) -> bool:
    t = tp.ops.module2type(m)
    return t in tp.pruner.function.PrunerBox and t != tp.ops.OPTYPE.ELEMENTWISE


def _traced_modules(dg) -> set:
    return {id(k) for k in dg.module2node}


def _unreached(model: nn.Module, dg) -> list[str]:
    """Modules owning parameters that the trace never reached (not run for the example input).

    A module inside a traced module (``out_proj`` of an ``nn.MultiheadAttention``) counts as
    reached, and so does one whose only parameters are all-singleton scalars (never traced).
    """
    seen = _traced_modules(dg)
    traced_names = [n for n, m in model.named_modules() if id(m) in seen]
    traced_names += list(unsupported_reasons(model))  # inside an unsupported module: reported with it
    out = []
    for n, m in model.named_modules():
        own = [p for p in m._parameters.values() if p is not None and any(s > 1 for s in p.shape)]
        if not own:
            continue
        if id(m) in seen or any(id(p) in seen for p in own):
            continue
        if any(n.startswith(t + ".") for t in traced_names if t):
            continue
        out.append(n)
    return out


def _failing_module(model: nn.Module, x: torch.Tensor) -> str | None:
    """The innermost module whose forward raises for ``x`` (None if the forward runs)."""
    stack: list[str] = []
    failed: list[str] = []
    handles = []

    def pre(name):
        def f(_m, _i):
            stack.append(name)
        return f

    def post(_m, _i, _o):
        if stack:
            stack.pop()

    for n, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(pre(n)))
        handles.append(m.register_forward_hook(post))
    try:
        with torch.no_grad():
            model(x)
    except Exception:  # noqa: BLE001 -- we only want where it failed
        failed.append(stack[-1] if stack else "")
    finally:
        for h in handles:
            h.remove()
    return failed[0] if failed else None


def functional_users(model: nn.Module, x: torch.Tensor) -> dict[str, str]:
    """Modules that use a child's parameters without calling the child (``F.linear(x, self.qkv.weight)``).

    Found with one forward pass (eval mode, restored): a parameter in the autograd graph whose
    owning module's forward never ran is used functionally by its nearest ancestor that ran.
    Torch-Pruning cannot follow channels through such a module, so flowprune leaves it intact
    (and makes it opaque while tracing). Types Torch-Pruning has its own rule for
    (``nn.MultiheadAttention``) are not listed.
    """
    import torch_pruning as tp

    from flowprune.measure import eval_mode

    ran: set[int] = set()
    handles = [m.register_forward_hook(lambda m, i, o: ran.add(id(m))) for m in model.modules()]
    try:
        with eval_mode(model), torch.enable_grad():
            out = model(x)
    except Exception:  # noqa: BLE001 -- the trace that follows reports the failure
        return {}
    finally:
        for h in handles:
            h.remove()
    used: set[int] = set()
    stack = [t.grad_fn for t in _flat_tensors(out) if t.grad_fn is not None]
    seen: set[int] = set()
    while stack:
        fn = stack.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        var = getattr(fn, "variable", None)
        if var is not None:
            used.add(id(var))
        stack.extend(f for f, _ in getattr(fn, "next_functions", ()) if f is not None)
    named = dict(model.named_modules())
    owner = {id(p): n for n, m in named.items() for p in m._parameters.values() if p is not None}
    found: dict[str, str] = {}
    for pid in used:
        n = owner.get(pid)
        if n is None or id(named[n]) in ran:
            continue
        a = n
        while a:
            a = a.rpartition(".")[0]
            if id(named[a]) in ran:
                break
        if not a or ops_prunable(tp, named[a]) or a in found:
            continue
        found[a] = (f"{type(named[a]).__name__} uses the parameters of {n!r} without calling it (a functional "
                    "forward); Torch-Pruning cannot follow channels through it")
    order = {n: i for i, n in enumerate(named)}
    return {n: found[n] for n in sorted(found, key=order.__getitem__)}


def _flat_tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _flat_tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _flat_tensors(o)]
    return []


def _opaque_modules(model: nn.Module, reasons: dict[str, str]) -> list[nn.Module]:
    """Unsupported modules of types Torch-Pruning has no rule for: made opaque while tracing."""
    import torch_pruning as tp

    out = []
    for n in reasons:
        try:
            m = model.get_submodule(n)
        except AttributeError:
            continue
        if not ops_prunable(tp, m):
            out.append(m)
    return out


def _trace(model: nn.Module, x: torch.Tensor, unwrapped, *, train: bool, opaque: Sequence[nn.Module] = ()):
    import torch_pruning as tp

    from flowprune.measure import eval_mode
    from flowprune.tp_ext import (
        OpaquePruner,
        ShuffleBarrier,
        barriers_while_tracing,
        opaque_types,
        opaque_while_tracing,
    )

    custom = opaque_types(opaque)
    types = tuple(custom)
    custom[ShuffleBarrier] = OpaquePruner()
    custom.update(unit_kinds.pruners())
    if not train:
        with eval_mode(model), torch.enable_grad(), opaque_while_tracing(model, types), barriers_while_tracing(model), \
                unit_kinds.tracing(model):
            return tp.DependencyGraph().build_dependency(model, example_inputs=x, unwrapped_parameters=unwrapped,
                                                         customized_pruners=custom, verbose=False)
    # train-mode trace (auxiliary heads run only in training): BatchNorm running statistics,
    # train flags and the RNG are restored afterwards, so the model is not changed.
    flags = [(m, m.training) for m in model.modules()]
    bufs = [(b, b.detach().clone()) for b in model.buffers()]
    xb = torch.cat([x, x.flip(0) + 0.01 * torch.randn_like(x)]) if x.shape[0] < 2 else x

    def forward_train(m, inp):  # Torch-Pruning switches to eval before tracing; run the forward in train mode
        m.train()
        return m(inp)

    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad(), opaque_while_tracing(model, types), \
                barriers_while_tracing(model), unit_kinds.tracing(model):
            return tp.DependencyGraph().build_dependency(model, example_inputs=xb, unwrapped_parameters=unwrapped,
                                                         customized_pruners=custom, forward_fn=forward_train,
                                                         verbose=False)
    finally:
        for m, f in flags:
            m.training = f
        with torch.no_grad():
            for b, v in bufs:
                b.copy_(v)


class _caches_restored:
    """Context manager: dict/list attributes of every module restored on exit (in place).

    Some models cache tensors during an eval forward (timm LeViT's ``attention_bias_cache``);
    filled under autograd by a trace, they would make the caller's model un-deep-copyable.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.saved = []
        for m in self.model.modules():
            for k, v in m.__dict__.items():
                if not k.startswith("_") and isinstance(v, (dict, list)):
                    self.saved.append((m, k, v, copy.copy(v)))
        return self

    def __exit__(self, *exc):
        for m, k, obj, snap in self.saved:
            if m.__dict__.get(k) is not obj:  # replaced (LeViT's train() assigns a fresh cache)
                m.__dict__[k] = obj
            if isinstance(obj, dict):
                if obj.keys() != snap.keys() or any(obj[i] is not snap[i] for i in snap):
                    obj.clear()
                    obj.update(snap)
            elif len(obj) != len(snap) or any(a is not b for a, b in zip(obj, snap)):
                obj[:] = snap


def build_graph(model: nn.Module, example_inputs: torch.Tensor):
    """Torch-Pruning's DependencyGraph of ``model``; see :func:`_build_graph` (caches restored)."""
    with _caches_restored(model):
        return _build_graph(model, example_inputs)


def _build_graph(model: nn.Module, example_inputs: torch.Tensor):
    """Torch-Pruning's DependencyGraph of ``model`` (traced once with ``example_inputs``).

    Traced in eval mode; if that leaves modules with parameters unreached (auxiliary heads that
    run only in training, e.g. GoogLeNet / Inception-v3), traced again in train mode (statistics
    restored) and the trace that reaches more is used. Raises :class:`FlowpruneError` naming the
    failing module when the model cannot be traced.
    """
    try:
        dev = next(model.parameters()).device
    except StopIteration:
        raise FlowpruneError("the model has no parameters; there is nothing to prune") from None
    x = _as_inputs(example_inputs).to(dev)
    reasons = unsupported_reasons(model)
    for n, why in functional_users(model, x).items():
        reasons.setdefault(n, why)
    opaque = _opaque_modules(model, reasons)
    inside = {id(p) for m in opaque for p in m.parameters()}
    unwrapped = [(p, d) for p, d in _unwrapped(model) if id(p) not in inside]
    try:
        dg = _trace(model, x, unwrapped or None, train=False, opaque=opaque)
    except Exception as e:  # noqa: BLE001 -- turned into one clear error
        from flowprune.measure import eval_mode

        with eval_mode(model):
            where = _failing_module(model, x)
        if where is not None:
            raise FlowpruneError(f"flowprune cannot trace {type(model).__name__}: its forward fails in module "
                                 f"{where or '<top>'!r} ({type(model.get_submodule(where)).__name__}) for an input of "
                                 f"shape {tuple(x.shape)}: {type(e).__name__}: {e}; check example_inputs") from None
        raise FlowpruneError(f"flowprune cannot trace {type(model).__name__} with Torch-Pruning's DependencyGraph: "
                             f"{type(e).__name__}: {e}") from None
    missed = _unreached(model, dg)
    if missed:
        try:
            dg2 = _trace(model, x, unwrapped or None, train=True, opaque=opaque)
        except Exception:  # noqa: BLE001 -- the eval-mode graph stands
            dg2 = None
        if dg2 is not None:
            missed2 = _unreached(model, dg2)
            if len(missed2) < len(missed):
                dg, missed = dg2, missed2
    dg.flowprune_unreached = [n for n in missed if not any(n.startswith(r + ".") for r in reasons)]
    dg.flowprune_reasons = reasons
    return dg


def _members_from_group(group, dg, mod2name: dict[nn.Module, str]) -> tuple[list[Member], list[Member], list[Member],
                                                                          list[nn.Module]]:
    producers, norms, consumers, others = [], [], [], []
    for item in group:
        dep = item.dep
        m = dep.target.module
        pairs = dict(zip(list(item.idxs), list(item.root_idxs)))  # an index reached twice counts once
        idxs = torch.as_tensor(list(pairs), dtype=torch.long)
        root = torch.as_tensor(list(pairs.values()), dtype=torch.long)
        name = mod2name.get(m) if isinstance(m, nn.Module) else None
        if name is None:
            others.append(m)
            continue
        is_out = dg.is_out_channel_pruning_fn(dep.handler)
        is_in = dg.is_in_channel_pruning_fn(dep.handler)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            depthwise = isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.groups == m.in_channels
            if is_out:
                producers.append(Member(name, "out", idxs, root))
                if depthwise:
                    consumers.append(Member(name, "in", idxs, root))
            elif is_in:
                consumers.append(Member(name, "in", idxs, root))
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
            norms.append(Member(name, "out", idxs, root))
        elif is_in and isinstance(m, unit_kinds.module_types()):
            consumers.append(Member(name, "in", idxs, root))
        else:
            others.append(m)
    return producers, norms, consumers, others


def _is_tp_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups == m.out_channels and m.out_channels > 1


def graph_ties(group, dg, root: nn.Module, size: int) -> list[tuple[int, int]]:
    """Pairs of root channels that the graph ties together (cutting one cuts the other).

    Torch-Pruning's full group visits every layer once, so a loop (a depthwise "cheap" branch
    concatenated back onto its own source, as in GhostNet) is invisible there; a group started
    from one root channel shows it: the root layer itself is reached at more than one channel.
    Probed only for groups holding a concatenation / split / slice and a depthwise conv (a loop
    needs both), at the first, middle and last channel; a shift pattern that explains those
    probes is applied to every channel, otherwise every channel is probed.
    """
    import torch_pruning as tp

    kinds = (tp.ops.OPTYPE.CONCAT, tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.SLICE)
    if size < 2 or not any(getattr(dg.module2node.get(it.dep.target.module), "type", None) in kinds
                           for it in group):
        return []
    if not any(_is_tp_depthwise(it.dep.target.module) for it in group):
        return []  # a loop back onto the root needs a layer whose input and output channels are one
    fn = dg.get_pruner_of_module(root).prune_out_channels

    def reached(r: int) -> set[int]:
        out = set()
        for it in dg.get_pruning_group(root, fn, [r]):
            if it.dep.target.module is root and dg.is_out_channel_pruning_fn(it.dep.handler):
                out.update(int(i) for i in it.idxs)
        return out

    probes = sorted({0, size // 2, size - 1})
    seen = {r: reached(r) for r in probes}
    if all(v <= {r} for r, v in seen.items()):
        return []
    # a tie pattern is usually a shift (GhostNet: channel r with r + size/2); predict it from the
    # probes and check it on them, else probe every channel
    shifts = {i - r for r, v in seen.items() for i in v if i != r}

    def predicted(r: int) -> set[int]:
        return {r} | {r + d for d in shifts if 0 <= r + d < size}

    if all(predicted(r) == v | {r} for r, v in seen.items()):
        return [(r, r + d) for r in range(size) for d in shifts if 0 <= r + d < size]
    return [(r, i) for r in range(size) for i in reached(r) if i != r and 0 <= i < size]


def channel_classes(group, dg, size: int, mod2name: dict,
                    ties: Sequence[tuple[int, int]] = ()) -> tuple[list[list[int]] | None, int, str | None]:
    """Group-consistent channel classes of a Torch-Pruning group (grouped convs, GroupNorm).

    A grouped convolution with ``G`` groups (not depthwise) can only lose the *same* offsets in
    every group (its weight's input slice is shared by position, and every group must keep the
    same width); a GroupNorm likewise needs the same count in each of its groups. Root channels
    that sit at the same offset of such a layer's groups are tied into one class (union-find over
    every grouped member), and a cut removes whole classes: so every group loses the same
    offsets and keeps at least one channel while one class is kept (this is Torch-Pruning's
    MetaPruner rule of pruning ``ch_groups``-replicated indices, applied per unit).

    Root channels the graph itself ties (one layer channel reached from two root channels, e.g.
    GhostNet's depthwise "cheap" half concatenated back onto its source) are one class too.

    Returns ``(classes, groups, reason)``: ``classes`` (list of root-channel index lists, in order
    of their first channel) or None when every root channel is its own class; ``groups`` the largest group
    count met; ``reason`` a sentence when the group cannot be cut consistently (a grouped layer
    that reads only part of its channels from this group).
    """
    uf = _UnionFind(size)
    # 1. channels tied by the graph itself: one layer channel reached from two root channels (a
    #    depthwise "cheap" branch concatenated back onto its source, as in GhostNet) -- cutting one
    #    root channel cuts the other too, so they are one unit.
    tied = _tie_shared_channels(group, size, ties, uf)
    # 2. grouped convolutions and GroupNorms: the same offset in every group
    g_max, why = _tie_group_offsets(group, dg, mod2name, uf)
    if why is not None:
        return None, g_max, why
    if g_max == 1 and not tied:
        return None, 1, None
    classes: dict[int, list[int]] = {}
    for r in range(size):
        classes.setdefault(uf.find(r), []).append(r)
    out = sorted(classes.values(), key=lambda c: c[0])
    return (out if len(out) < size else None), g_max, None


class _UnionFind:
    """Union-find over ``0..size-1``; a class is represented by its smallest member."""

    def __init__(self, size: int):
        self.parent = list(range(size))

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def _tie_shared_channels(group, size: int, ties: Sequence[tuple[int, int]], uf: _UnionFind) -> bool:
    """Union the root channels of ``ties`` and those that reach one layer channel through the same
    handler; True if any root channels were tied."""
    reached: dict[tuple, int] = {}
    tied = bool(ties)
    for a, b in ties:
        uf.union(a, b)
    for item in group:
        key0 = (id(item.dep.target.module), item.dep.handler)
        for i, r in zip(item.idxs, item.root_idxs):
            r = int(r)
            if not 0 <= r < size:
                continue
            key = key0 + (int(i),)
            if key in reached and reached[key] != r:
                uf.union(reached[key], r)
                tied = True
            else:
                reached.setdefault(key, r)
    return tied


def _tie_group_offsets(group, dg, mod2name: dict, uf: _UnionFind) -> tuple[int, str | None]:
    """Union the root channels at the same offset of every group of each grouped conv / GroupNorm member.

    Returns ``(largest group count met, None)``, or ``(that layer's group count, reason)`` for a
    grouped layer that takes only part of its channels from this group (no consistent cut).
    """
    g_max = 1
    for item in group:
        m = item.dep.target.module
        if not isinstance(m, nn.Module):
            continue
        is_out = dg.is_out_channel_pruning_fn(item.dep.handler)
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and not _is_tp_depthwise(m):
            dim, g = (m.out_channels if is_out else m.in_channels), m.groups
        elif isinstance(m, nn.GroupNorm) and m.num_groups > 1:
            dim, g = m.num_channels, m.num_groups
        else:
            continue
        idxs = [int(i) for i in item.idxs]
        roots = [int(r) for r in item.root_idxs]
        if len(set(idxs)) != dim:
            return g, (f"grouped layer {mod2name.get(m, type(m).__name__)!r} ({g} groups) takes only part of its "
                       f"{dim} channels from this group; a group-consistent cut is not possible")
        g_max = max(g_max, g)
        w = dim // g
        first: dict[int, int] = {}
        for i, r in zip(idxs, roots):
            off = i % w
            if off in first:
                uf.union(first[off], r)
            else:
                first[off] = r
    return g_max, None


def _output_layers(dg, mod2name: dict) -> set[str]:
    """Conv/Linear layers whose outputs reach a model output through no other Conv/Linear (the
    classifier, auxiliary classifiers, SqueezeNet's final conv): their outputs are never cut."""
    import torch_pruning as tp

    out = set()
    for mod, node in dg.module2node.items():
        if not isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)) or mod not in mod2name:
            continue
        stack, seen = list(node.outputs), set()
        reaches = not node.outputs
        while stack and not reaches:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            if isinstance(n.module, (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention)) or \
                    n.type in (tp.ops.OPTYPE.CONV, tp.ops.OPTYPE.LINEAR, tp.ops.OPTYPE.MHA, tp.ops.OPTYPE.LSTM):
                continue
            if not n.outputs:
                reaches = True
            stack.extend(n.outputs)
        if reaches:
            out.add(mod2name[mod])
    return out


def _dim_of(m: nn.Module, role: str) -> int | None:
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.out_channels if role == "out" else m.in_channels
    if isinstance(m, nn.Linear):
        return m.out_features if role == "out" else m.in_features
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return m.num_features
    if isinstance(m, nn.GroupNorm):
        return m.num_channels
    if isinstance(m, nn.LayerNorm):
        return int(m.normalized_shape[-1])
    return None


def _bad_indices(members: list[Member], named: dict) -> str | None:
    """A sentence if Torch-Pruning mapped an index outside a member's channels (a topology its
    index mapping gets wrong, e.g. Res2Net's chained splits); such a group is left intact."""
    for mb in members:
        dim = _dim_of(named[mb.module_name], mb.role)
        if dim is not None and len(mb.idxs) and (int(mb.idxs.max()) >= dim or int(mb.idxs.min()) < 0):
            return (f"Torch-Pruning maps channel {int(mb.idxs.max())} onto {mb.module_name!r}, which has {dim} "
                    f"{'output' if mb.role == 'out' else 'input'} channels (an index mapping it gets wrong here)")
    return None


def _dedupe(members: list[Member]) -> list[Member]:
    seen, out = set(), []
    for m in members:
        key = (m.module_name, m.role)
        if key in seen:
            continue
        seen.add(key)
        out.append(m)
    return out


def _remap(members: list[Member], class_of: torch.Tensor) -> list[Member]:
    return [Member(m.module_name, m.role, m.idxs, class_of[m.root_idxs]) for m in members]


def analyse(model: nn.Module, example_inputs: torch.Tensor, *, kinds: Sequence[str] | None = None,
            ignored_layers: Sequence[nn.Module | str] | None = None, validate: bool = True):
    """:func:`find_units` plus the DependencyGraph it used: ``(units, dg)``."""
    from flowprune.unit_providers import extra_units, units_from_provider

    kinds = _check_analyse_args(model, kinds)
    named = dict(model.named_modules())
    mod2name = {m: n for n, m in named.items()}
    ignored = _ignored_names(ignored_layers, named, mod2name)
    provided = units_from_provider(model, kinds, ignored)  # a family found by layout (no graph)
    if provided is not None:
        return provided, None
    excluded = _classifier_names(model) | _embedding_names(model)
    reasons = unsupported_reasons(model)
    attn_names = {n for n, m in named.items() if is_attention(m)}
    dg = build_graph(model, example_inputs)
    _add_graph_reasons(model, dg, reasons, excluded)
    excluded |= _output_layers(dg, mod2name)

    units = UnitList()
    units.unsupported = list(reasons)
    units.reasons = reasons
    units.excluded = sorted(excluded)
    order = {n: i for i, n in enumerate(named)}
    if {"channel", "neuron"} & set(kinds):
        scan = _ChannelGroups(model, dg, named, mod2name, order, ignored, excluded, attn_names, units.unsupported)
        scan.add_units(units, kinds)
    if "head" in kinds:
        _add_head_units(units, named, order, attn_names, ignored, excluded)
        units.extend(extra_units(named, kinds, ignored, excluded))  # e.g. nn.MultiheadAttention heads
    unit_kinds.add_units(kinds, units, model, dg, example_inputs, named, mod2name, ignored | excluded, validate)
    units.sort(key=lambda u: order[u.name])
    if validate and _has_splits(dg):
        units = _without_trial_failures(model, example_inputs, units, kinds, ignored_layers)
    return units, dg


def _check_analyse_args(model: nn.Module, kinds: Sequence[str] | None) -> tuple[str, ...]:
    """``kinds`` as a tuple (None: every kind, built-in and registered), once ``model`` is an
    ``nn.Module`` and every kind is known (else FlowpruneError)."""
    if not isinstance(model, nn.Module):
        raise FlowpruneError(f"model must be a torch nn.Module, got {type(model).__name__}")
    known = KINDS + unit_kinds.kind_names()
    if kinds is None:
        return known
    if isinstance(kinds, str):
        raise FlowpruneError(f"kinds must be a sequence of unit kinds such as ('channel',), got the string {kinds!r}")
    kinds = tuple(kinds)
    for k in kinds:
        if k not in known:
            raise bad_choice("unit kind", k, known)
    return kinds


def _ignored_names(ignored_layers: Sequence[nn.Module | str] | None, named: dict[str, nn.Module],
                   mod2name: dict[nn.Module, str]) -> set[str]:
    """Module names of ``ignored_layers`` (modules or names), each checked to be a module of the model."""
    ignored: set[str] = set()
    for layer in ignored_layers or ():
        if isinstance(layer, str):
            if layer not in named:
                raise FlowpruneError(f"ignored layer {layer!r} is not a module of the model")
            ignored.add(layer)
        else:
            if layer not in mod2name:
                raise FlowpruneError("an ignored layer is not a module of the model")
            ignored.add(mod2name[layer])
    return ignored


def _add_graph_reasons(model: nn.Module, dg, reasons: dict[str, str], excluded: set[str]) -> None:
    """Add to ``reasons`` what the trace found (channel shuffles, functional users, modules it never
    reached that are not excluded) and log a warning listing every layer left intact."""
    from flowprune.tp_ext import uses_channel_shuffle

    if uses_channel_shuffle(model):
        reasons.setdefault("<shuffle>", "channel shuffle (a view/transpose/view permutation): the channels it "
                                        "permutes are left intact; the channels inside each branch are cut")
    for n, why in getattr(dg, "flowprune_reasons", {}).items():
        reasons.setdefault(n, why)
    for n in getattr(dg, "flowprune_unreached", []):
        if n not in reasons and n not in excluded:
            reasons[n] = ("not reached when tracing the model with the example input (eval and train mode); its "
                          "input channels cannot be followed, so cuts feeding it may not fit")
    if reasons:
        notices.warn(log, "flowprune cannot cut these layers; they and every layer coupled to them are left intact",
                     list(reasons), reasons)


class _ChannelGroups:
    """The channel / neuron units of one traced model, from Torch-Pruning's groups (for :func:`analyse`).

    Holds the model's names and what is left out: ``ignored`` and ``excluded`` layer names, the
    attention modules (their ``qkv``/``gate`` outputs and ``proj`` inputs are cut as heads) and the
    modules flowprune cannot cut (``unsupported``: every group touching one is left intact).
    """

    def __init__(self, model: nn.Module, dg, named: dict[str, nn.Module], mod2name: dict[nn.Module, str],
                 order: dict[str, int], ignored: set[str], excluded: set[str], attn_names: set[str],
                 unsupported: Sequence[str]):
        self.dg, self.named, self.mod2name, self.order = dg, named, mod2name, order
        self.ignored, self.excluded, self.attn_names = ignored, excluded, attn_names
        self.attn_inner = set()
        for a in attn_names:
            self.attn_inner.update({f"{a}.qkv", f"{a}.gate"})
        self.unsupported_mods = {named[n] for n in unsupported if n in named}
        self.pname = {id(p): n for n, p in model.named_parameters()}

    def add_units(self, units: UnitList, kinds: tuple[str, ...]) -> None:
        """Append a unit of ``kinds`` for every group that can be cut; a group whose indices or grouped
        layers cannot be cut consistently goes to ``units.unsupported`` with its reason (logged)."""
        import torch_pruning as tp

        dg, named = self.dg, self.named
        ignored_mods = [named[n] for n in self.ignored | self.excluded if n in named]
        for group in dg.get_all_groups(ignored_layers=ignored_mods, root_module_types=(tp.ops.TORCH_CONV,
                                                                                        tp.ops.TORCH_LINEAR)):
            producers, norms, consumers, others = _members_from_group(group, dg, self.mod2name)
            if self._left_intact(producers, norms, consumers, others):
                continue
            root_name = self._root_name(group, producers)
            root = named[root_name]
            kind = "channel" if isinstance(root, nn.modules.conv._ConvNd) else "neuron"
            if kind not in kinds:
                continue
            pruner = dg.get_pruner_of_module(root)
            size = int(pruner.get_out_channels(root))
            if root is not group[0].dep.target.module:
                group = dg.get_pruning_group(root, pruner.prune_out_channels, list(range(size)))
                producers, norms, consumers, _ = _members_from_group(group, dg, self.mod2name)
            why = _bad_indices(producers + norms + consumers, named)
            if why is None:
                classes, n_groups, why = channel_classes(group, dg, size, self.mod2name,
                                                         graph_ties(group, dg, root, size))
            if why is not None:
                units.unsupported.append(root_name)
                units.reasons[root_name] = why
                notices.warn(log, "channels left intact (indices cannot be cut consistently)", [root_name],
                             {root_name: why})
                continue
            producers, norms, consumers = _dedupe(producers), _dedupe(norms), _dedupe(consumers)
            if classes is not None:
                class_of = torch.empty(size, dtype=torch.long)
                for c, members in enumerate(classes):
                    class_of[members] = c
                producers, norms, consumers = (_remap(producers, class_of), _remap(norms, class_of),
                                               _remap(consumers, class_of))
            units.append(PrunableUnit(name=root_name, kind=kind, module=root,
                                      size=len(classes) if classes is not None else size,
                                      producers=producers, norms=norms, consumers=consumers,
                                      block=root_name.rpartition(".")[0], group=group, classes=classes,
                                      channel_groups=n_groups))

    def _left_intact(self, producers: list[Member], norms: list[Member], consumers: list[Member],
                     others: list) -> bool:
        """True for a group flowprune does not cut: no producer, or it touches an excluded, ignored or
        unsupported layer, a token embedding or other unsupported parameter, or an attention's inside."""
        from flowprune.tp_ext import is_opaque

        named, attn_inner = self.named, self.attn_inner
        names_out = [p.module_name for p in producers]
        if not producers:
            return True
        # excluded: classifier outputs, embeddings, unwrapped parameters, qkv outputs
        if any(n in self.excluded or n in self.ignored or n in attn_inner for n in names_out):
            return True
        params = [o for o in others if isinstance(o, nn.Parameter)]
        if any(param_kind(self.pname.get(id(p), ""), p) != "scale" for p in params):
            return True  # coupled to a token embedding (transformer residual stream) or an unsupported parameter
        all_mods = {named[m.module_name] for m in producers + norms + consumers}
        touched_bad = [o for o in others
                       if isinstance(o, nn.Module) and (o in self.unsupported_mods or is_opaque(self.dg, o))]
        if touched_bad or (all_mods & self.unsupported_mods):
            return True
        return any(c.module_name in attn_inner or c.module_name.endswith(".proj") and
                   c.module_name.rpartition(".")[0] in self.attn_names for c in consumers)

    def _root_name(self, group, producers: list[Member]) -> str:
        """The unit's root layer: its first producer in module order when that member carries every
        channel of the group one to one (residual streams), else Torch-Pruning's root (across a
        concatenation no single member does)."""
        named = self.named
        tp_root = group[0].dep.target.module
        group_size = len(group[0].idxs)
        root_name = min((p.module_name for p in producers), key=lambda n: self.order[n])
        first = next(p for p in producers if p.module_name == root_name)
        pr = self.dg.get_pruner_of_module(named[root_name])
        if len(first.idxs) != group_size or int(pr.get_out_channels(named[root_name])) != group_size:
            root_name = self.mod2name[tp_root]
        return root_name


def _add_head_units(units: UnitList, named: dict[str, nn.Module], order: dict[str, int], attn_names: set[str],
                    ignored: set[str], excluded: set[str]) -> None:
    """Append a head unit for every attention module not ignored or excluded, in module order; one
    with a scale norm other than LayerNorm goes to ``units.unsupported`` (logged)."""
    for a in sorted(attn_names, key=lambda n: order[n]):
        if a in ignored or a in excluded:
            continue
        m = named[a]
        if isinstance(getattr(m, "norm", None), nn.Module) and not isinstance(m.norm, (nn.Identity, nn.LayerNorm)):
            notices.warn(log, "attention heads left intact (unsupported scale norm)", [a],
                         {a: type(m.norm).__name__})
            units.unsupported.append(f"{a}.norm")
            units.reasons[f"{a}.norm"] = f"attention scale norm of type {type(m.norm).__name__} has no head rule"
            continue
        h, d = int(m.num_heads), int(m.head_dim)
        ar = torch.arange(h * d)
        heads_of = ar // d
        qkv_idx = torch.cat([ar + s * h * d for s in range(3)])
        producers = [Member(f"{a}.qkv", "out", qkv_idx, heads_of.repeat(3))]
        if isinstance(getattr(m, "gate", None), nn.Linear):
            producers.append(Member(f"{a}.gate", "out", ar, heads_of))
        norms = [Member(f"{a}.norm", "out", ar, heads_of)] if isinstance(getattr(m, "norm", None),
                                                                         nn.LayerNorm) else []
        units.append(PrunableUnit(name=a, kind="head", module=m, size=h, producers=producers, norms=norms,
                                  consumers=[Member(f"{a}.proj", "in", ar, heads_of)],
                                  block=a.rpartition(".")[0], head_dim=d))


def _without_trial_failures(model: nn.Module, example_inputs: torch.Tensor, units: UnitList,
                            kinds: tuple[str, ...], ignored_layers) -> UnitList:
    """``units`` less those whose trial cut breaks the model (:func:`trial_cuts`), which move to
    ``unsupported`` with their reason (logged); ``units`` itself when every trial cut runs."""
    bad = trial_cuts(model, example_inputs, units, kinds=kinds, ignored_layers=ignored_layers)
    if not bad:
        return units
    notices.warn(log, "channels left intact (a trial cut breaks the model)", list(bad), bad)
    keep = UnitList(u for u in units if u.name not in bad)
    keep.unsupported = units.unsupported + list(bad)
    keep.reasons = {**units.reasons, **bad}
    keep.excluded = units.excluded
    return keep


def _has_splits(dg) -> bool:
    """A split or slice, or more than one reshape (the one before a classifier is harmless)."""
    import torch_pruning as tp

    types = [n.type for n in dg.module2node.values()]
    return (any(t in (tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.SLICE) for t in types)
            or sum(t == tp.ops.OPTYPE.RESHAPE for t in types) > 1)


def trial_cuts(model: nn.Module, example_inputs: torch.Tensor, units: Sequence[PrunableUnit], *,
               kinds: Sequence[str] | None = None, ignored_layers=None) -> dict[str, str]:
    """``{unit name: reason}`` for units whose cut leaves the model unable to run.

    Torch-Pruning's index mapping through splits, slices and reshapes (CSP stages, Res2Net,
    selective kernels) is wrong for some topologies. For a graph holding a split or slice (or more
    than one reshape), every channel / neuron unit is cut by half on a copy (one more trace), one
    after the other, and the copy
    is run on ``example_inputs`` after each; a unit whose cut breaks it is reported and the copy
    rebuilt. The caller's model is not changed.
    """
    import copy

    from flowprune.measure import runs_on as _runs
    from flowprune.tp_ext import dedupe_group as _dedupe_group

    x = example_inputs

    def fresh():
        work = copy.deepcopy(model)
        found, dg = analyse(work, x, kinds=kinds, ignored_layers=ignored_layers, validate=False)
        return work, found.by_name(), dg

    work, by, dg = fresh()
    bad: dict[str, str] = {}
    for u in units:
        if u.kind == "head" or u.size < 2:
            continue
        w = by.get(u.name)
        if w is None:
            continue
        try:
            g = dg.get_pruning_group(w.module, dg.get_pruner_of_module(w.module).prune_out_channels,
                                     w.channels(list(range((w.size + 1) // 2, w.size))))
            _dedupe_group(g)
            g.prune()
            ok = _runs(work, x)
        except Exception:  # noqa: BLE001 -- any failure marks the unit
            ok = False
        if not ok:
            bad[u.name] = ("a trial cut of this unit leaves the model unable to run (Torch-Pruning maps it wrongly "
                           "through a split/slice/reshape, or it touches a parameter Torch-Pruning does not cut, "
                           "such as the gain of timm's ScaledStdConv2d); left intact")
            work, by, dg = fresh()
    return bad


def find_units(model: nn.Module, example_inputs: torch.Tensor, *, kinds: Sequence[str] | None = None,
               ignored_layers: Sequence[nn.Module | str] | None = None) -> UnitList:
    """Every prunable unit of ``model`` (channels, neurons, heads), in module order.

    Args:
        model: any traceable model; it is traced once (eval mode, restored) and not changed.
        example_inputs: one input batch, e.g. ``torch.randn(1, *input_shape)``.
        kinds: which kinds of unit to return (default: every kind, :data:`KINDS` and the kinds
            registered in :mod:`flowprune.unit_kinds`, e.g. ``recurrent``).
        ignored_layers: modules (or their names) whose output channels must not be cut.

    Returns:
        a :class:`UnitList` (a list) with ``.unsupported`` (layers left intact because flowprune
        cannot cut them) and ``.excluded`` (classifier / embedding layers).
    """
    units, _ = analyse(model, example_inputs, kinds=kinds, ignored_layers=ignored_layers)
    return units


def widths(model: nn.Module, units: Sequence[PrunableUnit]) -> dict[str, int]:
    """Current width of every unit (``{name: size}``)."""
    return {u.name: int(u.size) for u in units}
