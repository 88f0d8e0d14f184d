"""The confidence router: ``-log max softmax`` (the paper's router)."""

from __future__ import annotations

import numpy as np
import torch

from flowprune.route.routers.base import Router, register_router


@register_router("confidence")
class ConfidenceRouter(Router):
    """Score = ``-log(max softmax probability)`` = ``log(1 + sum_{j != top} exp(l_j - l_top))``.

    A monotone function of ``1 - p_max`` (so the same decisions as thresholding the max softmax
    probability: escalate iff ``p_max < exp(-threshold)``), computed with ``log1p`` so that
    near-certain samples keep distinct scores in float32 instead of all tying at 0, which makes
    quantile calibration exact.
    """

    name = "confidence"

    def forward(self, logits, feats=None):
        z = logits.float()
        top = z.argmax(dim=1, keepdim=True)
        e = torch.exp(z - z.gather(1, top)).scatter(1, top, 0.0)
        return torch.log1p(e.sum(dim=1))

    def score_numpy(self, logits, feats):
        z = logits.astype(np.float32)
        top = z.argmax(axis=1)
        zt = np.take_along_axis(z, top[:, None], axis=1)
        e = np.exp(z - zt)
        e[np.arange(len(z)), top] = 0.0
        return np.log1p(e.sum(axis=1, dtype=np.float32)).astype(np.float32)
