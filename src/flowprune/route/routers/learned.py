"""The learned router: a small MLP predicting the light expert's mistakes, fitted on held-out data."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flowprune.errors import FlowpruneError, check_positive_int
from flowprune.route.routers.base import Router, register_router


@register_router("learned")
class LearnedRouter(Router):
    """A small MLP on ``[logits, sorted softmax, features]`` -> P(light expert is wrong).

    Input: ``2K + D`` numbers (logits, softmax sorted in decreasing order, features); one hidden
    layer of ``hidden`` ReLU units (default 32); output the probability of a mistake (the score).
    Inputs are standardised with the mean/std of its training set (stored as buffers).

    Built unfitted (``get_router("learned", hidden=16)``) the network is made by :meth:`fit`, which
    trains it (full-batch Adam, ``epochs``, ``lr``, ``weight_decay``, ``seed``) on held-out outputs;
    ``num_classes`` and ``feature_dim`` build it at once (loading a saved router).
    """

    name = "learned"
    needs_features = True
    fit_on = "held_out"
    inherits = ("seed", "hidden")

    def __init__(self, num_classes: int | None = None, feature_dim: int | None = None, hidden: int = 32, *,
                 epochs: int = 200, lr: float = 1e-2, weight_decay: float = 1e-3, seed: int = 0):
        super().__init__()
        check_positive_int("hidden", hidden)
        check_positive_int("epochs", epochs)
        self.hidden, self.epochs, self.lr, self.weight_decay, self.seed = int(hidden), int(epochs), lr, weight_decay, seed
        self.num_classes = self.feature_dim = None
        self.net = None
        self.fitted = False
        if num_classes is not None and feature_dim is not None:
            self._build(num_classes, feature_dim)

    def _build(self, num_classes: int, feature_dim: int) -> None:
        self.num_classes, self.feature_dim = int(num_classes), int(feature_dim)
        d = 2 * self.num_classes + self.feature_dim
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("std", torch.ones(d))
        self.net = nn.Sequential(nn.Linear(d, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1))

    def inputs(self, logits: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(logits.float(), dim=1).sort(dim=1, descending=True).values
        return torch.cat([logits.float(), p, feats.float()], dim=1)

    def forward(self, logits, feats=None):
        if feats is None:
            raise FlowpruneError("the learned router needs the light expert's penultimate features")
        if self.net is None:
            self.check_ready()
        z = (self.inputs(logits, feats) - self.mean) / self.std
        return torch.sigmoid(self.net(z)).squeeze(1)

    def fit(self, outs) -> dict:
        """Train on held-out :class:`~flowprune.route.calibrate.ExpertOutputs` (targets: the light expert is wrong)."""
        wrong = ~outs.light_correct
        self.fit_tensors(outs.light_logits, outs.feats, wrong)
        return {"fit_samples": len(outs), "fit_mistakes": int(wrong.sum())}

    def fit_tensors(self, logits: torch.Tensor, feats: torch.Tensor | None, light_wrong: torch.Tensor) -> LearnedRouter:
        """Train (full-batch Adam, BCE, positives re-weighted by ``n_neg / n_pos``); returns ``self``."""
        if logits.shape[0] == 0:
            raise FlowpruneError("the learned router needs a non-empty training split")
        if feats is None:
            raise FlowpruneError("the learned router needs the light expert's penultimate features")
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)
        try:
            self._build(logits.shape[1], feats.shape[1])
        finally:
            torch.random.set_rng_state(gen_state)
        with torch.no_grad():
            z = self.inputs(logits, feats)
            self.mean.copy_(z.mean(0))
            self.std.copy_(z.std(0).clamp_min(1e-6) if len(z) > 1 else torch.ones(z.shape[1]))
            zn = (z - self.mean) / self.std
        y = light_wrong.float()
        n_pos = float(y.sum())
        pos_weight = torch.tensor((len(y) - n_pos) / max(n_pos, 1.0))
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        self.train()
        for _ in range(self.epochs):
            loss = F.binary_cross_entropy_with_logits(self.net(zn).squeeze(1), y, pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.eval()
        self.fitted = True
        return self

    def is_ready(self) -> bool:
        return self.net is not None  # fitted, loaded, or built with its shapes: a function of the input

    def config(self) -> dict:
        return {"num_classes": self.num_classes, "feature_dim": self.feature_dim, "hidden": self.hidden}

    def macs(self) -> int:
        """Multiply-accumulates per sample (weights + biases, the measure.py convention)."""
        if self.net is None:
            return 0
        return sum(m.in_features * m.out_features + m.out_features for m in self.net if isinstance(m, nn.Linear))


def fit_learned_router(logits: torch.Tensor, feats: torch.Tensor, light_wrong: torch.Tensor, *,
                       hidden: int = 32, epochs: int = 200, lr: float = 1e-2, weight_decay: float = 1e-3,
                       seed: int = 0) -> LearnedRouter:
    """Train a :class:`LearnedRouter` on held-out data (same as ``get_router("learned", ...).fit(outs)``).

    Args:
        logits: ``(N, K)`` light-expert logits on the router's training split.
        feats: ``(N, D)`` light-expert penultimate features.
        light_wrong: ``(N,)`` bool, the targets (the light expert's prediction is wrong).
        epochs: full-batch steps (default 200: the inputs are a few hundred rows).
        Positive examples are re-weighted by ``n_neg / n_pos`` (mistakes are rare).
    """
    r = LearnedRouter(hidden=hidden, epochs=epochs, lr=lr, weight_decay=weight_decay, seed=seed)
    return r.fit_tensors(logits, feats, light_wrong)
