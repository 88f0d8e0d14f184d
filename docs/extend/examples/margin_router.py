"""A new router in one file: the margin between the two most probable classes.

A sample whose two best classes are nearly tied is one the light expert is unsure about, so it
goes to the heavy expert. Registering the class is all it takes: ``route_experts(...,
router="margin", router_kwargs={"temperature": 2.0})``, ``flowprune route --router margin
--router-option temperature=2``, ``save_cascade`` / ``load_cascade``, the ONNX export and the tests
parametrised over ``list_routers()`` pick it up once this module is imported (put the file in
``src/flowprune/route/routers/`` or name it in ``FLOWPRUNE_PLUGINS``).
"""

from __future__ import annotations

import torch

from flowprune.errors import FlowpruneError
from flowprune.route import Router, register_router


@register_router("margin")
class MarginRouter(Router):
    """Score = ``1 - (p1 - p2)``: one minus the gap between the two largest softmax probabilities
    at ``temperature``. In [0, 1]; higher = a closer call = send to the heavy expert."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise FlowpruneError(f"the margin router's temperature must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)

    def forward(self, logits, feats=None):
        p = torch.softmax(logits.float() / self.temperature, dim=1)
        top2 = p.topk(2, dim=1).values
        return 1.0 - (top2[:, 0] - top2[:, 1])

    def config(self) -> dict:
        return {"temperature": self.temperature}  # what save_cascade stores to rebuild it
