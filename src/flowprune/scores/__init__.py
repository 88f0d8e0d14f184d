"""Importance scores for structural units, behind one interface and one registry.

``get_score(name, **options)`` returns a callable score object::

    score = get_score("agf", calib="frozen", abs_mode="elementwise")
    scores = score(model, units, batches)   # {unit.name: tensor of shape (unit.size,)}, higher = keep

Every module in this package is imported on package import, so a file that defines
``@register_score("name")`` registers itself. See :mod:`flowprune.scores.base` for the base class
and :meth:`Score.as_tp_importance` for use inside Torch-Pruning's own pruners.
"""

from __future__ import annotations

import importlib
import pkgutil

from flowprune.scores.base import Score, get_score, list_scores, register_score

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Score", "get_score", "list_scores", "register_score"]
