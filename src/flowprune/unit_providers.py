"""The extension point of :func:`flowprune.units.find_units` for models Torch-Pruning cannot trace.

A *unit provider* finds the prunable units of a model family from its module structure instead
of Torch-Pruning's DependencyGraph (Hugging Face ``transformers`` models: their forward takes
token dicts, builds caches and masks, and their attention layouts are known by name, see
:mod:`flowprune.hf.units`). A provider is a function ``provider(model, kinds, ignored) ->
UnitList | None``: ``None`` when the model is not of its family. Every unit it returns carries
its own surgery, ``unit.apply_cut(indices)`` (called by :func:`flowprune.cut.apply_cuts`), so
the caller never needs a dependency graph for it.

Providers register with :func:`register_unit_provider`; :func:`units_from_provider` asks each
in registration order and returns the first answer.

An *extra unit finder* adds units of one module type to those found on the graph (the heads of
``nn.MultiheadAttention``, :mod:`flowprune.mha`): ``finder(named, kinds, ignored, excluded) ->
list of units`` (each with ``apply_cut``), registered with :func:`register_extra_units`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

_PROVIDERS: list[Callable] = []


def register_unit_provider(provider: Callable) -> Callable:
    """Add ``provider`` (see the module docstring); returns it, so it can be a decorator."""
    if provider not in _PROVIDERS:
        _PROVIDERS.append(provider)
    return provider


def units_from_provider(model: nn.Module, kinds: Sequence[str], ignored: set[str]):
    """The units of ``model`` from the first provider that knows its family, else ``None``."""
    for provider in _PROVIDERS:
        found = provider(model, tuple(kinds), set(ignored))
        if found is not None:
            return found
    return None


_EXTRA: list[Callable] = []


def register_extra_units(finder: Callable) -> Callable:
    """Add an extra unit finder (see the module docstring); returns it."""
    if finder not in _EXTRA:
        _EXTRA.append(finder)
    return finder


def extra_units(named: dict[str, nn.Module], kinds: Sequence[str], ignored: set[str], excluded: set[str]) -> list:
    """The units every registered extra finder adds."""
    return [u for finder in _EXTRA for u in finder(named, tuple(kinds), ignored, excluded)]
