"""The entropy router: predictive entropy of the softmax."""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F

from flowprune.route.routers.base import Router, register_router


@register_router("entropy")
class EntropyRouter(Router):
    """Score = entropy of the softmax (nats), in [0, ln K]."""

    name = "entropy"

    def forward(self, logits, feats=None):
        logp = F.log_softmax(logits.float(), dim=1)
        return -(logp.exp() * logp).sum(dim=1)

    def score_numpy(self, logits, feats):
        z = logits.astype(np.float32)
        m = z.max(axis=1, keepdims=True)
        logp = z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))
        return -(np.exp(logp) * logp).sum(axis=1).astype(np.float32)
