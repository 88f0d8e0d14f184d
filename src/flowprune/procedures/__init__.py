"""Pruning procedures behind one interface and one registry: what :func:`flowprune.compare` runs.

A procedure cuts a copy of a dense model to a MACs target, one-shot; the comparison then
re-estimates BatchNorm and fine-tunes every method the same way::

    proc = get_procedure("agf")                      # or "tp-taylor-global", or your own
    pruned = proc.cut(dense, 4.0, CutContext(input_shape=(1, 8, 8), batches=calib))
    pruned.model, pruned.info, pruned.cuts

Names come from three places: procedures registered with ``@register_procedure("name")``; one
procedure per registered score (:mod:`flowprune.procedures.scored`: flowprune's plan and cut with
that score); Torch-Pruning's importances through Torch-Pruning's own pruner
(:mod:`flowprune.procedures.torch_pruning`: ``tp-magnitude``, ``tp-taylor-global``, ...).

Every module in this package is imported on package import, so a file in it that uses
``@register_procedure`` registers itself; a file elsewhere is loaded by
:func:`flowprune.plugins.load_plugins` (``FLOWPRUNE_PLUGINS``). See docs/extend/procedure.md.
"""

from __future__ import annotations

from flowprune.procedures.base import (
    CutContext,
    Pruned,
    PruningProcedure,
    get_procedure,
    list_procedures,
    register_family,
    register_procedure,
)
from flowprune.registry import import_submodules

import_submodules(__name__, __path__)  # every file in this folder registers itself

__all__ = ["CutContext", "Pruned", "PruningProcedure", "get_procedure", "list_procedures", "register_family",
           "register_procedure"]
