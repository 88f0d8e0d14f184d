"""Structural surgery: cut planned units out of a copy of a model.

Surgery is done by Torch-Pruning (``DependencyGraph.get_pruning_group(...).prune()``): it already
knows how to shrink every coupled layer consistently (BatchNorm, residual additions,
concatenations, depthwise convs, flattened linears, per-channel scale parameters such as
ConvNeXt's ``layer_scale``), so flowprune adds no second tracer. A unit of a group with grouped
convolutions is a *class* of channels (the same offset in every conv group, see
:func:`flowprune.units.channel_classes`), expanded to its channels here, so every conv group
loses the same offsets and none is cut to zero width. Heads of timm-style attention are cut with
Torch-Pruning's linear pruning functions on ``qkv`` (the q, k and v rows of each removed head),
``proj`` (its input columns) and an optional ``gate`` / scale ``norm``; flowprune then fixes
``num_heads``, ``attn_dim`` (and keeps ``head_dim`` and ``scale``, which a head cut does not
change) so the model runs without manual patching.

:func:`flowprune.pruning.structural.apply_cuts` and ``cut_heads`` are these functions.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from flowprune.device import model_device
from flowprune.errors import FlowpruneError
from flowprune.measure import runs_on
from flowprune.tp_ext import dedupe_group as _dedupe_group


def _runs(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``model`` runs on ``x`` (a Hugging Face model through its input adapter)."""
    from flowprune.hf.adapter import as_tensor_model

    return runs_on(as_tensor_model(model), x)


def _example(model: nn.Module, example_inputs: torch.Tensor | None) -> torch.Tensor:
    if example_inputs is not None:
        if not isinstance(example_inputs, torch.Tensor):
            raise FlowpruneError("example_inputs must be a tensor batch, e.g. torch.randn(1, 3, 32, 32)")
        x = example_inputs
    else:
        base = getattr(model, "flowprune_base", None)
        if base is None:
            raise FlowpruneError("example_inputs is required for a model not built by flowprune.build_model")
        x = torch.randn(1, *base["input_shape"])
    # the example goes where the model is (calibration batches live on the CPU; the model may not)
    dev = model_device(model)
    return x if dev is None else x.to(dev)


def cut_heads(attn: nn.Module, heads: Sequence[int]) -> None:
    """Remove ``heads`` from a timm-style attention module in place and fix its attributes."""
    import torch_pruning as tp

    h, d = int(attn.num_heads), int(attn.head_dim)
    heads = sorted({int(i) for i in heads})
    if not heads:
        return
    if heads[0] < 0 or heads[-1] >= h:
        raise FlowpruneError(f"head index out of range for an attention with {h} heads: {heads}")
    if len(heads) >= h:
        raise FlowpruneError(f"cannot remove all {h} heads of an attention module; keep at least one")
    dims = [hd * d + j for hd in heads for j in range(d)]
    qkv_rows = [s * h * d + i for s in range(3) for i in dims]
    tp.prune_linear_out_channels(attn.qkv, qkv_rows)
    tp.prune_linear_in_channels(attn.proj, dims)
    if isinstance(getattr(attn, "gate", None), nn.Linear):
        tp.prune_linear_out_channels(attn.gate, dims)
    if isinstance(getattr(attn, "norm", None), nn.LayerNorm):
        tp.prune_layernorm_out_channels(attn.norm, dims)
    attn.num_heads = h - len(heads)
    if "attn_dim" in attn.__dict__ or hasattr(attn, "attn_dim"):
        attn.attn_dim = attn.num_heads * d
    attn.head_dim = d  # unchanged by a head cut, and so is ``scale`` (head_dim ** -0.5 or a custom value)


# _dedupe_group lives in flowprune.tp_ext (a Torch-Pruning group helper units.py needs too)
def _keep_every_member(unit, lst: list[int]) -> list[int]:
    """``lst`` minus what would leave a member layer with no channel at all.

    Across a concatenation one unit spans several producers (each owning part of the unit); a
    cut that takes every channel of one of them would leave a zero-width layer. That member keeps
    its first unit (the rest of the cut stands), as Torch-Pruning's own pruner refuses such a
    group.
    """
    cut = set(lst)
    if not cut:
        return lst
    for m in list(unit.producers) + list(unit.consumers):
        owned = set(m.root_idxs.tolist())
        if owned and owned <= cut and len(owned) < unit.size:
            cut.discard(min(owned))
    return sorted(cut)


def apply_cuts(model: nn.Module, cuts: Mapping[str, torch.Tensor | Sequence[int]], *,
               example_inputs: torch.Tensor | None = None, units=None) -> nn.Module:
    """A NEW model (deep copy) with the planned units removed.

    Args:
        model: not modified.
        cuts: ``{unit name: indices to remove}`` (from :func:`flowprune.plan.plan_cuts`); indices
            are unit indices in ``[0, unit.size)`` (for a grouped unit, channel classes).
        example_inputs: one input batch (default: random, from ``model.flowprune_base``).

    Returns:
        the pruned copy, carrying ``flowprune_base`` and ``flowprune_metadata["cuts"]`` (the cuts
        made, appended to any earlier ones) so :func:`flowprune.io.save`/``load`` round-trip it.

    Raises:
        FlowpruneError: unknown unit, indices out of range, a cut removing a whole unit, or a
            surgery Torch-Pruning cannot do or a cut that leaves the model unable to run (the
            cut copy is run once on ``example_inputs``; on failure the units are cut again one by
            one to name the one that breaks it).
    """
    if not isinstance(model, nn.Module):
        raise FlowpruneError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if not isinstance(cuts, Mapping):
        raise FlowpruneError(f"cuts must be a mapping {{unit name: indices}}, got {type(cuts).__name__}")
    x = _example(model, example_inputs)
    new = _cut(model, cuts, x, check_each=False)
    if not _runs(new, x):
        _cut(model, cuts, x, check_each=True)  # raises, naming the unit whose cut breaks the model
        raise FlowpruneError("the cut model does not run on example_inputs, though every unit cut alone in "
                             "sequence did; cut fewer units at a time")
    return new


def _cut(model: nn.Module, cuts, x: torch.Tensor, *, check_each: bool) -> nn.Module:
    from flowprune.units import analyse

    new = copy.deepcopy(model)
    found, dg = analyse(new, x, validate=False)
    by = found.by_name()
    clean: dict[str, list[int]] = {}
    for name, idx in cuts.items():
        if name not in by:
            extra = ""
            if name in getattr(found, "reasons", {}):
                extra = f" ({name!r} is left intact: {found.reasons[name]})"
            raise FlowpruneError(f"cut for unknown unit {name!r}{extra}; units are: {', '.join(sorted(by))}")
        try:
            lst = sorted({int(i) for i in (idx.tolist() if isinstance(idx, torch.Tensor) else idx)})
        except (TypeError, ValueError):
            raise FlowpruneError(f"cut indices for {name!r} must be integers, got {idx!r}") from None
        u = by[name]
        if lst and (lst[0] < 0 or lst[-1] >= u.size):
            raise FlowpruneError(f"cut indices for {name!r} must lie in [0, {u.size - 1}], got {lst[0]}..{lst[-1]}")
        if len(lst) >= u.size:
            raise FlowpruneError(f"cut of {name!r} removes all {u.size} units; keep at least one")
        lst = _keep_every_member(u, lst)
        if lst:
            clean[name] = lst
    for name, lst in clean.items():
        u = by[name]
        if hasattr(u, "apply_cut"):  # a unit that carries its own surgery (flowprune.unit_providers)
            u.apply_cut(lst)
            if check_each and not _runs(new, x):
                raise FlowpruneError(f"cutting unit {name!r} leaves the model unable to run")
            continue
        if u.kind == "head":
            continue
        pruner = dg.get_pruner_of_module(u.module)
        try:
            group = dg.get_pruning_group(u.module, pruner.prune_out_channels, u.channels(lst))
            _dedupe_group(group)
            group.prune()
        except Exception as e:  # noqa: BLE001 -- one clear error naming the unit
            raise FlowpruneError(f"Torch-Pruning could not cut unit {name!r} ({type(u.module).__name__}): "
                                 f"{type(e).__name__}: {e}") from None
        if check_each and not _runs(new, x):
            raise FlowpruneError(f"cutting unit {name!r} leaves the model unable to run: Torch-Pruning's index "
                                 "mapping of this architecture is wrong for that unit; leave it out of the cuts "
                                 f"or pass ignored_layers=[{name!r}] to find_units")
    for name, lst in clean.items():
        if by[name].kind == "head" and not hasattr(by[name], "apply_cut"):
            cut_heads(by[name].module, lst)
            if check_each and not _runs(new, x):
                raise FlowpruneError(f"cutting the heads of {name!r} leaves the model unable to run")
    meta = dict(getattr(model, "flowprune_metadata", {}) or {})
    history = list(meta.get("cuts", []))
    history.append({k: v for k, v in clean.items()})
    meta["cuts"] = history
    new.flowprune_metadata = meta
    return new
