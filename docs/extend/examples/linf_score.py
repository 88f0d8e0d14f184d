"""A new score in one file: the largest |weight| of each filter (L-infinity magnitude).

Registering it is all it takes: ``flowprune.prune(model, data, "linf", ...)``,
``flowprune prune --method linf``, ``flowprune compare --methods linf,...`` and the tests
parametrised over ``list_scores()`` pick it up once this module is imported (put the file in
``src/flowprune/scores/`` or name it in ``FLOWPRUNE_PLUGINS``).
"""

from __future__ import annotations

import torch

from flowprune.scores import Score, register_score
from flowprune.scores.base import modules_of, weight_rows


@register_score("linf")
class LInf(Score):
    """Largest |w| over the unit's filter rows, in every producer of the unit. Higher = keep."""

    needs_data = False  # a weight score: no calibration batches needed

    def compute(self, model, units, batches):
        mods = modules_of(model)
        out = {}
        for u in units:
            acc = torch.zeros(u.size, dtype=torch.float64)
            for p in u.producers:  # the layers whose output rows make the unit's channels
                rows = weight_rows(mods[p.module_name].weight, p.idxs).double().cpu().abs()
                acc.scatter_reduce_(0, p.root_idxs, rows.amax(1), reduce="amax")
            out[u.name] = acc
        return out
