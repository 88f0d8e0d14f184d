"""Importance scores for structural units, behind one interface and one registry.

``get_score(name, **options)`` returns a callable score object::

    score = get_score("agf", calib="frozen", abs_mode="elementwise")
    scores = score(model, units, batches)   # {unit.name: tensor of shape (unit.size,)}, higher = keep

Every module in this package is imported on package import, so a file that defines
``@register_score("name")`` registers itself. See :mod:`flowprune.scores.base` for the base class
and :meth:`Score.as_tp_importance` for use inside Torch-Pruning's own pruners.
"""

from __future__ import annotations

from flowprune.registry import import_submodules
from flowprune.scores.base import Score, get_score, list_scores, register_score

import_submodules(__name__, __path__)  # every file in this folder registers itself

__all__ = ["Score", "get_score", "list_scores", "register_score"]
