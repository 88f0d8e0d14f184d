"""Unit kinds beyond the built-in ``channel`` / ``neuron`` / ``head`` of :mod:`flowprune.units`.

One small, explicit extension point, so a new kind of prunable structure lives in its own module
instead of growing ``units.py``. A kind is a :class:`UnitKind` registered with
:func:`register_unit_kind` by the module that implements it (imported by ``flowprune/__init__``,
e.g. :mod:`flowprune.recurrent`). ``units.py`` consults this registry at five places only:

* ``module_types``: leaf module types whose parameters the kind cuts (not reported as
  unsupported; their parameters are not "unwrapped" parameters for Torch-Pruning, and when a
  group cuts their input channels they are the group's consumers);
* ``pruners()``: Torch-Pruning ``customized_pruners`` for those types, given to every trace;
* ``tracing(model)``: a context manager active while Torch-Pruning traces ``model``;
* ``add_units(model, dg, x, named, mod2name, skip, validate)``: the kind's units of a traced model
  and ``{layer name: why it is left intact}``;
* its ``name`` is accepted in ``kinds=`` and is part of the default (every kind).

Surgery needs nothing more: a unit carries its Torch-Pruning group root, and the kind's pruner
does the cut when :func:`flowprune.cut.apply_cuts` prunes the group.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from flowprune.errors import FlowpruneError


@dataclass(frozen=True)
class UnitKind:
    """One registered unit kind (see the module docstring for what each field is used for)."""

    name: str
    module_types: tuple[type, ...]
    pruners: Callable[[], dict]
    tracing: Callable[[nn.Module], contextlib.AbstractContextManager]
    add_units: Callable[..., tuple[list, dict[str, str]]]


_KINDS: dict[str, UnitKind] = {}


def register_unit_kind(kind: UnitKind) -> UnitKind:
    """Register ``kind`` under ``kind.name`` (re-registering the same name replaces it)."""
    if not isinstance(kind, UnitKind) or not kind.name.isidentifier():
        raise FlowpruneError(f"register_unit_kind needs a UnitKind with an identifier name, got {kind!r}")
    _KINDS[kind.name] = kind
    return kind


def unit_kinds() -> list[UnitKind]:
    """The registered kinds, in registration order."""
    return list(_KINDS.values())


def kind_names() -> tuple[str, ...]:
    return tuple(_KINDS)


def module_types() -> tuple[type, ...]:
    """Every module type some registered kind cuts."""
    return tuple(t for k in _KINDS.values() for t in k.module_types)


def pruners() -> dict:
    """Torch-Pruning ``customized_pruners`` of every registered kind."""
    out: dict = {}
    for k in _KINDS.values():
        out.update(k.pruners())
    return out


def add_units(kinds, units, model: nn.Module, dg, x, named: dict, mod2name: dict, skip: set[str],
              validate: bool) -> None:
    """Append to ``units`` (a ``UnitList``) the units of every registered kind named in ``kinds``;
    what a kind leaves intact goes to ``units.unsupported`` and ``units.reasons``."""
    for k in _KINDS.values():
        if k.name in kinds:
            found, why = k.add_units(model, dg, x, named, mod2name, skip, validate)
            units.extend(found)
            units.unsupported.extend(n for n in why if n not in units.reasons)
            units.reasons.update(why)


@contextlib.contextmanager
def tracing(model: nn.Module):
    """Every registered kind's tracing context, entered together."""
    with contextlib.ExitStack() as stack:
        for k in _KINDS.values():
            stack.enter_context(k.tracing(model))
        yield
