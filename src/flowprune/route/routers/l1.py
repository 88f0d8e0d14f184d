"""The l1 router: the l1 norm of the penultimate features, its direction resolved on calibration data."""

from __future__ import annotations

import math

import numpy as np
import torch

from flowprune.errors import FlowpruneError, bad_choice
from flowprune.route.routers.base import Router, auroc, register_router

L1_DIRECTIONS = ("auto", "low_is_hard", "high_is_hard")


@register_router("l1")
class L1Router(Router):
    """Score = +/- l1 norm of the penultimate features, mean over feature dimensions.

    ``direction`` is ``"low_is_hard"`` (score = -mean|f|), ``"high_is_hard"`` (score = +mean|f|)
    or ``"auto"``: resolved on the calibration split by :meth:`fit` (:func:`resolve_l1_direction`).
    """

    name = "l1"
    needs_features = True
    fit_on = "calibration"

    def __init__(self, direction: str = "auto"):
        super().__init__()
        if direction not in L1_DIRECTIONS:
            raise bad_choice("l1 router direction", direction, L1_DIRECTIONS)
        self.direction = direction

    def norm(self, feats: torch.Tensor) -> torch.Tensor:
        return feats.float().abs().mean(dim=1)

    def forward(self, logits, feats=None):
        if feats is None:
            raise FlowpruneError("the l1 router needs the light expert's penultimate features")
        self.check_ready()
        n = self.norm(feats)
        return -n if self.direction == "low_is_hard" else n

    def fit(self, outs) -> dict:
        """Resolve an ``"auto"`` direction on calibration outputs; returns the evidence."""
        if outs.feats is None:
            raise FlowpruneError("the l1 router needs features in the calibration outputs")
        return resolve_l1_direction(self, outs.feats, ~outs.light_correct)

    def is_ready(self) -> bool:
        return self.direction != "auto"

    def check_ready(self) -> None:
        if self.direction == "auto":
            raise FlowpruneError("the l1 router's direction is 'auto' and has not been resolved; calibrate it "
                                 "(calibrate / router.fit) or pass direction='low_is_hard'/'high_is_hard'")

    def config(self) -> dict:
        return {"direction": self.direction}

    def score_numpy(self, logits, feats):
        n = np.abs(feats.astype(np.float32)).mean(axis=1)
        return (-n if self.direction == "low_is_hard" else n).astype(np.float32)


def resolve_l1_direction(router: L1Router, feats: torch.Tensor, light_wrong: torch.Tensor) -> dict:
    """Set ``router.direction`` from data when it is ``"auto"``; return the evidence.

    The direction whose score ranks the light expert's mistakes higher (AUROC > 0.5 for
    ``high_is_hard``) wins. Returns ``{"direction", "auroc_high_is_hard", "mean_norm_correct",
    "mean_norm_wrong"}``.
    """
    n = router.norm(feats)
    a = auroc(n, light_wrong)
    wrong = light_wrong.bool()
    info = {"auroc_high_is_hard": a,
            "mean_norm_correct": float(n[~wrong].mean()) if (~wrong).any() else math.nan,
            "mean_norm_wrong": float(n[wrong].mean()) if wrong.any() else math.nan}
    if router.direction == "auto":
        router.direction = "high_is_hard" if (a == a and a > 0.5) else "low_is_hard"
    info["direction"] = router.direction
    return info
