"""The procedure interface and registry (the timm registry pattern, as :mod:`flowprune.scores`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from flowprune.errors import FlowpruneError, bad_choice


@dataclass
class CutContext:
    """What a comparison fixes for every procedure.

    ``batches``: the calibration batches of this seed (scores, gradients, compensation);
    ``input_shape``: one example's shape; ``seed``: the run's seed; ``tol``: the relative MACs
    tolerance a procedure that searches its ratio must land in; ``plan_options`` /
    ``score_options`` / ``compensate`` / ``round_to`` / ``tp_mode``: the comparison's options for the
    procedures that use them; ``cache``: one dict the comparison keeps across methods, targets
    and seeds (e.g. ratios found by a search; key it by something your procedure owns).
    """

    input_shape: Sequence[int]
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()
    seed: int = 0
    tol: float = 0.03
    plan_options: dict = field(default_factory=dict)
    score_options: dict = field(default_factory=dict)
    compensate: bool | None = None
    round_to: int | None = None
    tp_mode: str = "auto"
    cache: dict = field(default_factory=dict)

    def example(self, model: nn.Module) -> torch.Tensor:
        """One random input on ``model``'s device."""
        return torch.randn(1, *self.input_shape, device=next(model.parameters()).device)


@dataclass
class Pruned:
    """A procedure's output: the cut ``model``, an ``info`` dict for the results file, and
    optionally ``cuts`` = ``{unit name: removed indices}`` in the dense unit's index space."""

    model: nn.Module
    info: dict = field(default_factory=dict)
    cuts: dict[str, list[int]] | None = None


class PruningProcedure:
    """Base class: :meth:`cut` returns a pruned copy of ``model`` with ``target`` x fewer MACs.

    It must not change ``model``. The comparison measures the achieved reduction itself, so a
    procedure that cannot land exactly returns its nearest point (and may say so in ``info``).
    """

    name: str = ""

    def cut(self, model: nn.Module, target: float, ctx: CutContext) -> Pruned:
        raise NotImplementedError


_REGISTRY: dict[str, Callable[[], PruningProcedure]] = {}
_FAMILIES: list[tuple[Callable[[], Sequence[str]], Callable[[str], PruningProcedure]]] = []


def register_procedure(name: str):
    """Decorator: register a :class:`PruningProcedure` subclass (or a no-argument factory) as ``name``."""
    if not isinstance(name, str) or not name.strip():
        raise FlowpruneError(f"a procedure name must be a non-empty string, got {name!r}")

    def deco(obj):
        if isinstance(obj, type):
            obj.name = name
        _REGISTRY[name] = obj
        return obj

    return deco


def register_family(names: Callable[[], Sequence[str]]):
    """Decorator: register ``factory(name) -> PruningProcedure`` for every name ``names()`` lists.

    For families whose members follow another registry (one procedure per score) or a naming
    scheme (``tp-<importance>-<mode>``). Explicitly registered names win over families.
    """
    def deco(factory: Callable[[str], PruningProcedure]):
        _FAMILIES.append((names, factory))
        return factory

    return deco


def list_procedures() -> list[str]:
    """Every procedure name: family members in registration order, then registered names, sorted."""
    out: list[str] = []
    for names, _ in _FAMILIES:
        out.extend(n for n in names() if n not in out)
    out.extend(n for n in sorted(_REGISTRY) if n not in out)
    return out


def get_procedure(name: str) -> PruningProcedure:
    """The procedure registered as ``name`` (a new object on each call)."""
    if name in _REGISTRY:
        proc = _REGISTRY[name]()
        if not isinstance(proc, PruningProcedure):
            raise FlowpruneError(f"procedure {name!r} is registered by {_REGISTRY[name]!r}, which did not return a "
                                 "PruningProcedure; subclass flowprune.procedures.PruningProcedure")
        proc.name = name
        return proc
    for names, factory in _FAMILIES:
        if name in names():
            proc = factory(name)
            proc.name = name
            return proc
    raise bad_choice("method", name, list_procedures())
