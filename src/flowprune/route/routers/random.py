"""The random router: seeded uniform draws, the baseline."""

from __future__ import annotations

import math

import torch

from flowprune.route.routers.base import Router, register_router


@register_router("random")
class RandomRouter(Router):
    """Uniform random scores in [0, 1) from a seeded generator (the baseline).

    Not a function of the input (``exportable = False``); for a heavy-usage budget ``p`` its
    threshold is ``1 - p`` without looking at data.
    """

    name = "random"
    exportable = False

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = int(seed)
        self.reset()

    def reset(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def forward(self, logits, feats=None):
        return torch.rand(logits.shape[0], generator=self.generator).to(logits.device)

    def budget_threshold(self, budget: float) -> float:
        return 1.0 - budget if 0 < budget < 1 else (math.inf if budget == 0 else -math.inf)

    def config(self) -> dict:
        return {"seed": self.seed}
