"""flowprune's extensions of Torch-Pruning, through its public hooks only.

Torch-Pruning builds its dependency graph from the autograd graph of one forward pass. A module
flowprune cannot cut (see :func:`flowprune.units.unsupported_reasons`: e.g. torchvision's
``ShiftedWindowAttention``, which reads ``qkv``/``proj`` weights functionally and holds a
relative-position table) is made **opaque** while tracing:

* it is registered as a Torch-Pruning *customized layer* (``customized_pruners=``) with
  :class:`OpaquePruner`, whose input and output channels are not coupled and which refuses to
  prune, so every group that reaches the module through its input or output contains it and
  flowprune leaves that group intact (and reports the module);
* a forward hook (only during the trace) re-attaches the module's output to its tensor inputs
  through one autograd node (:class:`_Opaque`), so Torch-Pruning sees one node instead of the
  module's internals (window partitions, rolls, functional linears): faster, and nothing inside
  it can be mistaken for a channel-preserving operation.

Functional channel permutations Torch-Pruning cannot map (torchvision ShuffleNet-v2's
``channel_shuffle``: a view/transpose/view that makes its reshape mapping divide by zero) are
made opaque the same way while tracing (:func:`barriers_while_tracing`): the function is wrapped
so its result reaches the graph through a :class:`ShuffleBarrier` node. Groups through a
shuffle are left intact (reported as ``<shuffle>``); the channels inside each branch are cut.

Nothing here changes a model for good: hooks, wrappers and the barrier module are removed when
the trace ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from flowprune.errors import FlowpruneError


def _tp_base():
    import torch_pruning as tp

    return tp.pruner.function.BasePruningFunc


class OpaquePruner(_tp_base()):
    """A Torch-Pruning layer pruner that never prunes (flowprune drops every group holding it)."""

    TARGET_MODULES = nn.Module

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise FlowpruneError(f"flowprune cannot cut the output channels of {type(layer).__name__}; "
                             "it is left intact (see units.reasons)")

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise FlowpruneError(f"flowprune cannot cut the input channels of {type(layer).__name__}; "
                             "it is left intact (see units.reasons)")

    def get_out_channels(self, layer: nn.Module):
        return getattr(layer, "seen_out_channels", None)  # known for a ShuffleBarrier, else unknown

    def get_in_channels(self, layer: nn.Module):
        return getattr(layer, "seen_in_channels", None)


class _Opaque(torch.autograd.Function):
    """Identity on ``out`` whose autograd node links only to the module's tensor inputs."""

    @staticmethod
    def forward(ctx, out, *inputs):
        ctx.n = len(inputs)
        return out.clone()

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover -- graphs built for tracing are never run backward
        return (grad,) + (None,) * ctx.n


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _opaque_hook(module, args, kwargs, output):
    inputs = [t for t in _tensors(args) + _tensors(kwargs) if t.requires_grad]
    if isinstance(output, torch.Tensor):
        return _Opaque.apply(output.detach(), *inputs)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (_Opaque.apply(output[0].detach(), *inputs),) + tuple(output[1:])
    return None


def opaque_types(modules: Iterable[nn.Module]) -> dict[type, OpaquePruner]:
    """``customized_pruners`` for Torch-Pruning: every module type in ``modules`` made opaque.

    Module *types* are registered (Torch-Pruning registers forward hooks with ``isinstance``), so
    every instance of such a type is opaque.
    """
    pruner = OpaquePruner()
    return {type(m): pruner for m in modules}


@contextlib.contextmanager
def opaque_while_tracing(model: nn.Module, types: Iterable[type]):
    """Within the block, every module of ``types`` in ``model`` appears to autograd as one node."""
    types = tuple(types)
    handles = []
    try:
        if types:
            for m in model.modules():
                if isinstance(m, types):
                    handles.append(m.register_forward_hook(_opaque_hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


class ShuffleBarrier(nn.Module):
    """Stands for a channel permutation during a trace: one opaque node from input to output."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.seen_in_channels, self.seen_out_channels = int(x.shape[1]), int(y.shape[1])
        return _Opaque.apply(y.detach(), x)


BARRIER_NAME = "_flowprune_shuffle_barrier"


def _shuffle_functions():
    """(module, attribute) of the channel-shuffle functions known to be untraceable."""
    out = []
    try:
        import torchvision.models.shufflenetv2 as sv2

        out.append((sv2, "channel_shuffle"))
    except ImportError:  # pragma: no cover -- torchvision is optional
        pass
    return out


def uses_channel_shuffle(model: nn.Module) -> bool:
    try:
        from torchvision.models.shufflenetv2 import InvertedResidual
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, InvertedResidual) for m in model.modules())


@contextlib.contextmanager
def barriers_while_tracing(model: nn.Module):
    """Within the block, channel shuffles reach autograd through one :class:`ShuffleBarrier`.

    The barrier is attached to ``model`` as ``_flowprune_shuffle_barrier`` (so Torch-Pruning sees
    it as a module) and removed on exit, with the wrapped functions restored.
    """
    if not uses_channel_shuffle(model):
        yield None
        return
    barrier = ShuffleBarrier()
    patched = []
    try:
        setattr(model, BARRIER_NAME, barrier)
        for mod, attr in _shuffle_functions():
            orig = getattr(mod, attr)

            def wrapped(x, *args, _orig=orig, **kwargs):
                return barrier(x, _orig(x, *args, **kwargs))

            setattr(mod, attr, wrapped)
            patched.append((mod, attr, orig))
        yield barrier
    finally:
        for mod, attr, orig in patched:
            setattr(mod, attr, orig)
        if BARRIER_NAME in model._modules:
            del model._modules[BARRIER_NAME]


def is_opaque(dg, module) -> bool:
    """Whether Torch-Pruning handles ``module`` with :class:`OpaquePruner` in graph ``dg``."""
    return isinstance(module, nn.Module) and isinstance(dg.get_pruner_of_module(module), OpaquePruner)


def dedupe_group(group) -> None:
    """Drop repeated indices from every item of a Torch-Pruning group, in place.

    When a unit's channels reach a layer along two paths (e.g. GhostNet's concatenation read
    through an alias and a squeeze-excite mean), Torch-Pruning can list an index twice; its layer
    pruners then subtract the repeats from ``in_channels``/``out_channels`` and leave the
    attribute smaller than the weight.
    """
    from torch_pruning._helpers import GroupItem

    for k, item in enumerate(list(group.items)):
        idxs = list(item.idxs)
        if len(set(idxs)) == len(idxs):
            continue
        roots = list(item.root_idxs) if item.root_idxs is not None else [None] * len(idxs)
        seen, keep_i, keep_r = set(), [], []
        for i, r in zip(idxs, roots):
            if i not in seen:
                seen.add(i)
                keep_i.append(i)
                keep_r.append(r)
        new = GroupItem(dep=item.dep, idxs=keep_i)
        new.root_idxs = keep_r if item.root_idxs is not None else None
        group[k] = new
