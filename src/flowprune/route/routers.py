"""Routers: per-sample "difficulty" scores computed from the light expert's output.

Every router maps the light expert's logits ``(B, K)`` and penultimate features ``(B, D)`` to a
difficulty score ``(B,)``; a sample is escalated to the heavy expert iff ``score > threshold``.
Higher always means "harder", so one calibration (:mod:`flowprune.route.calibrate`) serves all.

=============  ===================================================================  ==========
name           score (higher = escalate)                                            cost
=============  ===================================================================  ==========
``confidence`` ``-log max softmax probability`` (the paper's router; monotone in      zero
               ``1 - p_max``, computed without float32 ties near certainty)
``entropy``    predictive entropy of the softmax, in nats                           zero
``l1``         l1 norm of the penultimate features, signed by ``direction``:        zero
               ``"low_is_hard"`` -> ``-||f||_1``, ``"high_is_hard"`` -> ``||f||_1``.
               ``"auto"`` (default) picks the direction on the calibration split
               (the one whose score ranks the light expert's mistakes higher, by
               AUROC). On mnist5k and mnist1d a *low* norm marks a hard input (see
               docs/results/route.md).
``learned``    a small MLP on ``[logits, features]`` predicting P(light is wrong),   counted
               trained on a held-out split (see :func:`fit_learned_router`).
``random``     i.i.d. uniform draws from a seeded generator, the baseline. With a       zero
               threshold of ``1 - p`` it sends a fraction ``p`` to the heavy expert.
=============  ===================================================================  ==========

The random router is not a function of the input: its decisions depend on the generator state,
so it is deterministic for a given seed and call sequence (``reset()`` rewinds it) but not
"per sample".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flowprune.errors import FlowpruneError, bad_choice, check_positive_int

ROUTERS = ("confidence", "entropy", "l1", "learned", "random")
L1_DIRECTIONS = ("auto", "low_is_hard", "high_is_hard")


class Router(nn.Module):
    """Base class. ``forward(logits, feats) -> scores (B,)``; higher = send to the heavy expert."""

    name: str = "base"
    needs_features: bool = False
    needs_fitting: bool = False

    def forward(self, logits: torch.Tensor, feats: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def config(self) -> dict:
        """JSON-safe constructor arguments (saved in router.json)."""
        return {}

    def reset(self) -> None:
        """Rewind any internal state (only the random router has one)."""


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


class EntropyRouter(Router):
    """Score = entropy of the softmax (nats), in [0, ln K]."""

    name = "entropy"

    def forward(self, logits, feats=None):
        logp = F.log_softmax(logits.float(), dim=1)
        return -(logp.exp() * logp).sum(dim=1)


class L1Router(Router):
    """Score = +/- l1 norm of the penultimate features, mean over feature dimensions.

    ``direction`` is ``"low_is_hard"`` (score = -mean|f|), ``"high_is_hard"`` (score = +mean|f|)
    or ``"auto"``: resolved on the calibration split by :func:`resolve_l1_direction` before use.
    """

    name = "l1"
    needs_features = True

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
        if self.direction == "auto":
            raise FlowpruneError("the l1 router's direction is 'auto' and has not been resolved; "
                                 "calibrate it (calibrate_threshold) or pass direction='low_is_hard'/'high_is_hard'")
        n = self.norm(feats)
        return -n if self.direction == "low_is_hard" else n

    def config(self) -> dict:
        return {"direction": self.direction}


class LearnedRouter(Router):
    """A small MLP on ``[logits, sorted softmax, features]`` -> P(light expert is wrong).

    Input: ``2K + D`` numbers (logits, softmax sorted in decreasing order, features); one hidden
    layer of ``hidden`` ReLU units (default 32); output the probability of a mistake (the score).
    Inputs are standardised with the mean/std of its training set (stored as buffers).
    """

    name = "learned"
    needs_features = True
    needs_fitting = True

    def __init__(self, num_classes: int, feature_dim: int, hidden: int = 32):
        super().__init__()
        check_positive_int("hidden", hidden)
        self.num_classes, self.feature_dim, self.hidden = int(num_classes), int(feature_dim), int(hidden)
        d = 2 * self.num_classes + self.feature_dim
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("std", torch.ones(d))
        self.net = nn.Sequential(nn.Linear(d, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1))
        self.fitted = False

    def inputs(self, logits: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(logits.float(), dim=1).sort(dim=1, descending=True).values
        return torch.cat([logits.float(), p, feats.float()], dim=1)

    def forward(self, logits, feats=None):
        if feats is None:
            raise FlowpruneError("the learned router needs the light expert's penultimate features")
        z = (self.inputs(logits, feats) - self.mean) / self.std
        return torch.sigmoid(self.net(z)).squeeze(1)

    def config(self) -> dict:
        return {"num_classes": self.num_classes, "feature_dim": self.feature_dim, "hidden": self.hidden}

    def macs(self) -> int:
        """Multiply-accumulates per sample (weights + biases, the measure.py convention)."""
        return sum(m.in_features * m.out_features + m.out_features for m in self.net if isinstance(m, nn.Linear))


class RandomRouter(Router):
    """Uniform random scores in [0, 1) from a seeded generator (the baseline)."""

    name = "random"

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = int(seed)
        self.reset()

    def reset(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def forward(self, logits, feats=None):
        return torch.rand(logits.shape[0], generator=self.generator).to(logits.device)

    def config(self) -> dict:
        return {"seed": self.seed}


_CLASSES: dict[str, type[Router]] = {"confidence": ConfidenceRouter, "entropy": EntropyRouter, "l1": L1Router,
                                     "learned": LearnedRouter, "random": RandomRouter}


def make_router(name: str, **kwargs) -> Router:
    """Build a router by registry name (``ROUTERS``); kwargs go to its constructor."""
    if name not in _CLASSES:
        raise bad_choice("router", name, ROUTERS)
    try:
        return _CLASSES[name](**kwargs)
    except TypeError as e:
        raise FlowpruneError(f"bad option for router {name!r}: {e}") from None


def auroc(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for detecting ``positives`` (bool), ties counted half.

    NaN when one class is empty.
    """
    s = scores.double().flatten()
    pos = positives.bool().flatten()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    # rank-based (Mann-Whitney U), average ranks for ties
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    uniq, inv = torch.unique(s, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, ranks)
    cnts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, torch.ones_like(ranks))
    ranks = (sums / cnts)[inv]
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


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


def fit_learned_router(logits: torch.Tensor, feats: torch.Tensor, light_wrong: torch.Tensor, *,
                       hidden: int = 32, epochs: int = 200, lr: float = 1e-2, weight_decay: float = 1e-3,
                       seed: int = 0) -> LearnedRouter:
    """Train a :class:`LearnedRouter` (full-batch Adam, BCE with class re-weighting) on held-out data.

    Args:
        logits: ``(N, K)`` light-expert logits on the router's training split.
        feats: ``(N, D)`` light-expert penultimate features.
        light_wrong: ``(N,)`` bool, the targets (the light expert's prediction is wrong).
        epochs: full-batch steps (default 200: the inputs are a few hundred rows).
        Positive examples are re-weighted by ``n_neg / n_pos`` (mistakes are rare).
    """
    if logits.shape[0] == 0:
        raise FlowpruneError("the learned router needs a non-empty training split")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        r = LearnedRouter(logits.shape[1], feats.shape[1], hidden)
    finally:
        torch.random.set_rng_state(gen_state)
    with torch.no_grad():
        z = r.inputs(logits, feats)
        r.mean.copy_(z.mean(0))
        r.std.copy_(z.std(0).clamp_min(1e-6) if len(z) > 1 else torch.ones(z.shape[1]))
        zn = (z - r.mean) / r.std
    y = light_wrong.float()
    n_pos = float(y.sum())
    pos_weight = torch.tensor((len(y) - n_pos) / max(n_pos, 1.0))
    opt = torch.optim.Adam(r.net.parameters(), lr=lr, weight_decay=weight_decay)
    r.train()
    for _ in range(epochs):
        loss = F.binary_cross_entropy_with_logits(r.net(zn).squeeze(1), y, pos_weight=pos_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    r.eval()
    r.fitted = True
    return r
