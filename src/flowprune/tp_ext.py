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

Nothing here changes a model: hooks are removed when the trace ends.
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
        return None

    def get_in_channels(self, layer: nn.Module):
        return None


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
