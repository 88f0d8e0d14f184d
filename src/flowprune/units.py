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

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from flowprune.errors import FlowpruneError, bad_choice

log = logging.getLogger(__name__)

KINDS = ("channel", "neuron", "head")

# Leaf module types whose parameters Torch-Pruning (and so flowprune) knows how to cut.
_SUPPORTED_PARAM_TYPES: tuple[type, ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.PReLU,
)
# Direct (unwrapped) parameters of container modules that are token embeddings: excluded, not unsupported.
_EMBED_PARAM_NAMES = ("cls_token", "pos_embed", "dist_token", "reg_token", "mask_token")


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

    def member_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """Name -> module of every member, resolved on ``model`` (a copy with the same names)."""
        mods = dict(model.named_modules())
        names = {m.module_name for m in self.producers + self.norms + self.consumers}
        return {n: mods[n] for n in names if n in mods}


class UnitList(list):
    """A list of :class:`PrunableUnit` plus what was left out: ``unsupported`` (layer names
    flowprune cannot cut, left intact) and ``excluded`` (classifier/embedding layers)."""

    unsupported: list[str]
    excluded: list[str]

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


def unsupported_layers(model: nn.Module, example_inputs: torch.Tensor | None = None) -> list[str]:
    """Names of modules holding parameters that flowprune cannot cut (left intact by every cut).

    A leaf module with parameters of a type outside Conv/Linear/BatchNorm/LayerNorm/GroupNorm/
    Embedding/PReLU, or a container with direct parameters other than token embeddings.
    ``example_inputs`` is accepted for symmetry with :func:`find_units` and unused.
    """
    bad = []
    for n, m in model.named_modules():
        own = [k for k, p in m._parameters.items() if p is not None]
        if not own:
            continue
        if isinstance(m, _SUPPORTED_PARAM_TYPES):
            continue
        if all(k in _EMBED_PARAM_NAMES for k in own):
            continue
        bad.append(n)
    return bad


def build_graph(model: nn.Module, example_inputs: torch.Tensor):
    """Torch-Pruning's DependencyGraph of ``model`` (traced once with ``example_inputs``)."""
    import torch_pruning as tp

    from flowprune.measure import eval_mode

    x = _as_inputs(example_inputs).to(next(model.parameters()).device)
    unwrapped = []
    for n, p in model.named_parameters():
        mod_name, _, leaf = n.rpartition(".")
        if leaf in _EMBED_PARAM_NAMES:
            unwrapped.append((p, p.dim() - 1))
    with eval_mode(model), torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=x, unwrapped_parameters=unwrapped or None,
                                                   verbose=False)
    return dg


def _members_from_group(group, dg, mod2name: dict[nn.Module, str]) -> tuple[list[Member], list[Member], list[Member],
                                                                          list[nn.Module]]:
    producers, norms, consumers, others = [], [], [], []
    for item in group:
        dep = item.dep
        m = dep.target.module
        idxs = torch.as_tensor(list(item.idxs), dtype=torch.long)
        root = torch.as_tensor(list(item.root_idxs), dtype=torch.long)
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
        else:
            others.append(m)
    return producers, norms, consumers, others


def _dedupe(members: list[Member]) -> list[Member]:
    seen, out = set(), []
    for m in members:
        key = (m.module_name, m.role)
        if key in seen:
            continue
        seen.add(key)
        out.append(m)
    return out


def analyse(model: nn.Module, example_inputs: torch.Tensor, *, kinds: Sequence[str] = KINDS,
            ignored_layers: Sequence[nn.Module | str] | None = None):
    """:func:`find_units` plus the DependencyGraph it used: ``(units, dg)``."""
    import torch_pruning as tp

    kinds = tuple(kinds)
    for k in kinds:
        if k not in KINDS:
            raise bad_choice("unit kind", k, KINDS)
    named = dict(model.named_modules())
    mod2name = {m: n for n, m in named.items()}
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
    excluded = _classifier_names(model) | _embedding_names(model)
    unsupported = unsupported_layers(model)
    if unsupported:
        log.warning("flowprune cannot cut these layers; they and every layer coupled to them are left intact: %s",
                    ", ".join(unsupported))
    attn_names = {n for n, m in named.items() if is_attention(m)}
    attn_inner = set()
    for a in attn_names:
        attn_inner.update({f"{a}.qkv", f"{a}.gate"})
    dg = build_graph(model, example_inputs)

    units = UnitList()
    units.unsupported = unsupported
    units.excluded = sorted(excluded)
    order = {n: i for i, n in enumerate(named)}
    unsupported_mods = {named[n] for n in unsupported}
    ignored_mods = [named[n] for n in ignored | excluded if n in named]
    if kinds != ("head",):
        for group in dg.get_all_groups(ignored_layers=ignored_mods, root_module_types=(tp.ops.TORCH_CONV,
                                                                                        tp.ops.TORCH_LINEAR)):
            producers, norms, consumers, others = _members_from_group(group, dg, mod2name)
            names_out = [p.module_name for p in producers]
            if not producers:
                continue
            # excluded: classifier outputs, embeddings, unwrapped parameters, qkv outputs
            if any(n in excluded or n in ignored or n in attn_inner for n in names_out):
                continue
            if any(isinstance(o, nn.Parameter) for o in others):
                continue  # coupled to a token embedding (transformer residual stream)
            all_mods = {named[m.module_name] for m in producers + norms + consumers}
            touched_bad = [o for o in others if isinstance(o, nn.Module) and o in unsupported_mods]
            if touched_bad or (all_mods & unsupported_mods):
                continue
            if any(c.module_name in attn_inner or c.module_name.endswith(".proj") and
                   c.module_name.rpartition(".")[0] in attn_names for c in consumers):
                continue
            # Name the unit after its first member in module order, re-rooting the group there, when
            # that member carries every channel of the group one to one (residual streams); across a
            # concatenation no single member does, and the group keeps Torch-Pruning's root.
            tp_root = group[0].dep.target.module
            group_size = len(group[0].idxs)
            root_name = min(names_out, key=lambda n: order[n])
            first = next(p for p in producers if p.module_name == root_name)
            pr = dg.get_pruner_of_module(named[root_name])
            if len(first.idxs) != group_size or int(pr.get_out_channels(named[root_name])) != group_size:
                root_name = mod2name[tp_root]
            root = named[root_name]
            kind = "channel" if isinstance(root, nn.modules.conv._ConvNd) else "neuron"
            if kind not in kinds:
                continue
            pruner = dg.get_pruner_of_module(root)
            size = int(pruner.get_out_channels(root))
            if root is not tp_root:
                group = dg.get_pruning_group(root, pruner.prune_out_channels, list(range(size)))
                producers, norms, consumers, _ = _members_from_group(group, dg, mod2name)
            units.append(PrunableUnit(name=root_name, kind=kind, module=root, size=size,
                                      producers=_dedupe(producers), norms=_dedupe(norms),
                                      consumers=_dedupe(consumers), block=root_name.rpartition(".")[0],
                                      group=group))
    if "head" in kinds:
        for a in sorted(attn_names, key=lambda n: order[n]):
            if a in ignored or a in excluded:
                continue
            m = named[a]
            if isinstance(getattr(m, "norm", None), nn.Module) and not isinstance(m.norm, (nn.Identity, nn.LayerNorm)):
                log.warning("attention %s has an unsupported scale norm %s; its heads are left intact", a,
                            type(m.norm).__name__)
                units.unsupported.append(f"{a}.norm")
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
    units.sort(key=lambda u: order[u.name])
    return units, dg


def find_units(model: nn.Module, example_inputs: torch.Tensor, *, kinds: Sequence[str] = KINDS,
               ignored_layers: Sequence[nn.Module | str] | None = None) -> UnitList:
    """Every prunable unit of ``model`` (channels, neurons, heads), in module order.

    Args:
        model: any traceable model; it is traced once (eval mode, restored) and not changed.
        example_inputs: one input batch, e.g. ``torch.randn(1, *input_shape)``.
        kinds: which kinds of unit to return.
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
