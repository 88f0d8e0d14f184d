"""Whole-layer removal (IDAP++ stage 2): find removable blocks, rank them by flow divergence, cut.

A *removable block* is a module whose output has exactly the shape of its input, so that the
identity can take its place without touching any other layer:

* ``residual``: a residual block with an identity shortcut -- flowprune's ``BasicBlock`` and
  ``PreActBlock`` (``shortcut`` is ``nn.Identity``), torchvision's and timm's ResNet
  ``BasicBlock``/``Bottleneck`` (``downsample is None``);
* ``transformer``: a transformer block with ``attn`` and ``mlp`` children (timm ViT
  ``blocks[i]``), which is ``x + attn(...)`` then ``x + mlp(...)``;
* ``plain``: a ``Conv1d``/``Conv2d``/``Linear`` that is a direct child of an ``nn.Sequential``,
  with ``groups == 1`` and output shape == input shape; a ``BatchNorm`` right after it in the
  same ``Sequential`` is removed with it (the pair becomes the identity; the following
  activation stays).

Every candidate's input and output shapes are *measured* with forward hooks on example inputs;
a block whose shapes differ (a strided block, a shortcut with a projection, a width change) is
never a candidate, whatever its class. Candidates nested inside another candidate are dropped
(the outer block is the unit).

**Removal = the identity.** A removed block is replaced by ``nn.Identity`` inside its container
(never deleted), so :func:`flowprune.io.save`/``load`` round-trip it: the loader replaces every
module recorded as ``Identity``. For a pre-activation block (``x + branch(x)``: WideResNet's
``PreActBlock``, ViT blocks) the identity *is* "drop the residual branch". For a
post-activation block (``relu(x + branch(x))``: ResNet ``BasicBlock``/``Bottleneck``) dropping
the branch gives ``relu(x)``, which equals ``x`` only when ``x >= 0``. In every post-activation
ResNet here (flowprune's CifarResNet, torchvision/timm ResNets) the block input is the output of
a ReLU (the stem's or the previous block's), so the identity and the dropped branch coincide.
:func:`find_removable_blocks` measures this on the example inputs and reports it as
``input_nonnegative``; the identity is used in every case (it is what a saved model can encode
without a custom module), and the ranking measures exactly the change the identity makes.

**Layer divergence** (docs/methods.md section 3): ``D_i = mean_x ||T_{i+1}(x) - T_i(x)||_2 /
(||T_{i+1}(x)||_2 + eps)`` with norms over one sample's whole feature tensor, ``T_i`` the block
input and ``T_{i+1}`` its output. For a pre-activation residual block this is
``||branch(x)|| / ||x + branch(x)||``; for a post-activation one it is the relative change the
removal actually undoes. Scale invariant; low = the block barely transforms the flow.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from flowprune.errors import FlowpruneError

EPS = 1e-8
RESIDUAL_CLASSES = ("BasicBlock", "Bottleneck", "PreActBlock")
PLAIN_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)
KINDS = ("residual", "transformer", "plain")


@dataclass
class RemovableBlock:
    """One block that the identity can replace.

    Attributes:
        name: module path in the model (``layer1.3``, ``blocks.2``, ``body.9``).
        kind: ``residual``, ``transformer`` or ``plain``.
        cls: the module's class name.
        shape: one sample's input (== output) shape, without the batch dimension.
        divergence: ``D_i`` on the example inputs (``nan`` until measured).
        input_nonnegative: the block input was ``>= 0`` on every example (post-ReLU), so for a
            post-activation block the identity equals dropping the branch.
        companions: module paths removed together with this one (a plain layer's BatchNorm).
    """

    name: str
    kind: str
    cls: str
    shape: tuple[int, ...]
    divergence: float = float("nan")
    input_nonnegative: bool = False
    companions: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["companions"] = list(self.companions)
        return d


def _structural_kind(name: str, m: nn.Module, parent: nn.Module | None) -> str | None:
    """The candidate kind by structure alone (shapes are checked separately), or None."""
    cls = type(m).__name__
    if cls in RESIDUAL_CLASSES:
        if hasattr(m, "shortcut"):
            return "residual" if isinstance(m.shortcut, nn.Identity) else None
        if hasattr(m, "downsample"):
            return "residual" if m.downsample is None or isinstance(m.downsample, nn.Identity) else None
        return None
    if hasattr(m, "attn") and hasattr(m, "mlp") and isinstance(m.attn, nn.Module):
        return "transformer"
    if isinstance(parent, nn.Sequential) and isinstance(m, PLAIN_TYPES) and getattr(m, "groups", 1) == 1:
        return "plain"
    return None


def _as_batches(example_inputs: torch.Tensor | Iterable) -> list[torch.Tensor]:
    if isinstance(example_inputs, torch.Tensor):
        return [example_inputs]
    out = []
    for b in example_inputs:
        out.append(b[0] if isinstance(b, (tuple, list)) else b)
    if not out:
        raise FlowpruneError("find_removable_blocks needs at least one example input batch")
    return out


@torch.no_grad()
def find_removable_blocks(model: nn.Module, example_inputs: torch.Tensor | Iterable,
                          kinds: Sequence[str] = KINDS) -> list[RemovableBlock]:
    """The blocks of ``model`` that can become the identity, with their layer divergence.

    Args:
        model: not changed (hooks are removed, train/eval flags restored; runs in eval mode).
        example_inputs: a batch ``(B, *input_shape)`` or an iterable of batches or ``(x, y)``
            pairs; divergences are averaged over every sample.
        kinds: which kinds of candidates to consider (default all of ``KINDS``).

    Returns:
        Candidates in module order, each with ``divergence`` measured. Empty when the model has
        no removable block.
    """
    for k in kinds:
        if k not in KINDS:
            raise FlowpruneError(f"unknown block kind {k!r}; allowed: {', '.join(KINDS)}")
    batches = _as_batches(example_inputs)
    modules = dict(model.named_modules())
    parents: dict[str, nn.Module | None] = {}
    for name in modules:
        if name:
            pname = name.rpartition(".")[0]
            parents[name] = modules[pname]
    structural = _structural_candidates(modules, parents, kinds)
    stats = _measure_candidates(model, modules, structural, batches)
    out: list[RemovableBlock] = []
    for n, kind in structural.items():
        s = stats[n]
        if len(s["shapes"]) != 1 or s["n"] == 0:
            continue  # never called, shapes differ, or shapes changed between batches
        (in_shape, out_shape), = s["shapes"]
        if in_shape != out_shape:
            continue
        companions = _plain_companions(n, parents[n]) if kind == "plain" else ()
        out.append(RemovableBlock(name=n, kind=kind, cls=type(modules[n]).__name__, shape=tuple(in_shape[1:]),
                                  divergence=s["div"] / s["n"], input_nonnegative=bool(s["nonneg"]),
                                  companions=companions))
    return out


def _structural_candidates(modules: dict[str, nn.Module], parents: dict[str, nn.Module | None],
                           kinds: Sequence[str]) -> dict[str, str]:
    """``{name: kind}`` of the candidates by structure alone, in module order, none nested in another."""
    structural: dict[str, str] = {}
    for name, m in modules.items():
        if not name:
            continue
        kind = _structural_kind(name, m, parents[name])
        if kind is not None and kind in kinds:
            structural[name] = kind
    # drop candidates nested in another candidate
    return {n: k for n, k in structural.items()
            if not any(n.startswith(o + ".") for o in structural if o != n)}


def _measure_candidates(model: nn.Module, modules: dict[str, nn.Module], structural: dict[str, str],
                        batches: list[torch.Tensor]) -> dict[str, dict]:
    """Run ``batches`` through ``model`` (eval mode, hooks removed after) and record, per candidate,
    the ``(input, output)`` shapes seen, the summed divergence ``div`` over ``n`` samples and
    whether every input was ``>= 0`` (``nonneg``)."""
    from flowprune.measure import eval_mode

    stats: dict[str, dict] = {n: {"shapes": set(), "div": 0.0, "n": 0, "nonneg": True} for n in structural}

    def make_hook(n: str):
        def hook(_m, inp, out):
            x = inp[0] if isinstance(inp, tuple) and inp else None
            s = stats[n]
            if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
                s["shapes"].add(("bad",))
                return
            s["shapes"].add((tuple(x.shape), tuple(out.shape)))
            if x.shape != out.shape:
                return
            b = x.shape[0]
            diff = (out - x).reshape(b, -1).norm(dim=1)
            den = out.reshape(b, -1).norm(dim=1) + EPS
            s["div"] += float((diff / den).sum())
            s["n"] += b
            s["nonneg"] = s["nonneg"] and bool((x >= 0).all())
        return hook

    handles = [modules[n].register_forward_hook(make_hook(n)) for n in structural]
    try:
        with eval_mode(model):
            dev = next((p.device for p in model.parameters()), torch.device("cpu"))
            for x in batches:
                model(x.to(dev))
    finally:
        for h in handles:
            h.remove()
    return stats


def _plain_companions(name: str, parent: nn.Module) -> tuple[str, ...]:
    """The BatchNorm right after plain layer ``name`` in its ``Sequential`` (removed with it), if any."""
    keys = list(parent._modules)
    child = name.rpartition(".")[2]
    i = keys.index(child)
    if i + 1 < len(keys) and isinstance(parent._modules[keys[i + 1]], nn.modules.batchnorm._BatchNorm):
        pn = name.rpartition(".")[0]
        return (f"{pn}.{keys[i + 1]}" if pn else keys[i + 1],)
    return ()


def rank_blocks(blocks: Sequence[RemovableBlock]) -> list[RemovableBlock]:
    """Blocks sorted by increasing divergence (the order stage 2 tries them); ties by name."""
    return sorted(blocks, key=lambda b: (b.divergence, b.name))


def _set_identity(model: nn.Module, name: str) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if child not in parent._modules:
        raise FlowpruneError(f"module {name!r} is not a child module of {parent_name or 'the model'}; "
                             "only registered sub-modules can be removed")
    setattr(parent, child, nn.Identity())


def remove_block(model: nn.Module, block: RemovableBlock | str, *, inplace: bool = False) -> nn.Module:
    """Replace ``block`` (and its companions) by ``nn.Identity`` in its container.

    Returns a new model unless ``inplace=True`` (then ``model`` itself, changed). The block must
    be a registered sub-module; it is not checked again for shapes here (use
    :func:`find_removable_blocks` to choose blocks).
    """
    target = model if inplace else copy.deepcopy(model)
    names = [block] if isinstance(block, str) else [block.name, *block.companions]
    for n in names:
        try:
            target.get_submodule(n)
        except AttributeError:
            raise FlowpruneError(f"model has no module {n!r} to remove") from None
        _set_identity(target, n)
    return target


def removed_modules(model: nn.Module) -> list[str]:
    """Paths of the sub-modules that are ``nn.Identity`` and are blocks of a Sequential (removed ones)."""
    out = []
    for name, m in model.named_modules():
        if name and isinstance(m, nn.Identity):
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            if isinstance(parent, nn.Sequential):
                out.append(name)
    return out
