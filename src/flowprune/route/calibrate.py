"""Threshold calibration on a held-out split (the val split; never the test split).

Two targets, exactly one per call:

* ``heavy_budget`` in [0, 1]: the fraction of inputs sent to the heavy expert. The threshold is
  the score quantile that escalates ``round(budget * n)`` calibration samples (the nearest count
  reachable when scores tie). ``0`` gives ``threshold = inf`` (never escalate), ``1`` gives
  ``-inf``. The random router needs no data: its threshold is ``1 - budget``.
* ``max_drop`` in [0, 1]: the largest accepted accuracy drop versus the heavy expert **on the
  calibration split**: the threshold escalating the fewest samples such that
  ``routed accuracy >= heavy accuracy - max_drop`` (escalating everything always qualifies).

Precision: ``tolerance`` (default 0.05) is the standard error the caller accepts on the heavy
usage (or accuracy) estimated from ``n`` calibration samples. The calibration refuses to run
(before any work) when ``n < 1 / tolerance`` (the estimate cannot resolve the target), when
``sqrt(p (1 - p) / n) > tolerance`` at the requested budget ``p``, or when a non-zero
``max_drop`` is finer than ``1 / n``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from flowprune.errors import FlowpruneError, check_fraction

CALIBRATION_MODES = ("heavy_budget", "max_drop")


@dataclass
class ExpertOutputs:
    """Both experts' outputs on one split (computed once, reused by calibration and sweeps).

    light_logits ``(N, K)``, feats ``(N, D)`` or None, heavy_logits ``(N, K)``, labels ``(N,)``.
    """

    light_logits: torch.Tensor
    feats: torch.Tensor | None
    heavy_logits: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def light_correct(self) -> torch.Tensor:
        return self.light_logits.argmax(1) == self.labels

    @property
    def heavy_correct(self) -> torch.Tensor:
        return self.heavy_logits.argmax(1) == self.labels

    def subset(self, idx: torch.Tensor) -> ExpertOutputs:
        return ExpertOutputs(self.light_logits[idx], None if self.feats is None else self.feats[idx],
                             self.heavy_logits[idx], self.labels[idx])


@torch.no_grad()
def collect_outputs(cascade, dataset, batch_size: int = 512) -> ExpertOutputs:
    """Run the light part (with features) and the full heavy expert over a ``TensorDataset``."""
    from flowprune.measure import eval_mode

    if dataset is None or len(dataset) == 0:
        raise FlowpruneError("the calibration split is empty; routing needs held-out labelled samples "
                             "(use a val_fraction > 0)")
    x_all, y_all = dataset.tensors[0], dataset.tensors[1]
    ll, ff, hl = [], [], []
    needs = cascade.router.needs_features
    cascade.router.needs_features = True  # features are cheap to keep; l1/learned need them later
    try:
        with eval_mode(cascade):
            for i in range(0, len(y_all), batch_size):
                x = x_all[i:i + batch_size]
                lo, f = cascade.light_outputs(x)
                ll.append(lo.float().cpu())
                ff.append(f.float().cpu() if f is not None else None)
                hl.append(cascade.heavy(x.to(cascade.input_device())).float().cpu())
    finally:
        cascade.router.needs_features = needs
    feats = torch.cat(ff) if all(f is not None for f in ff) else None
    return ExpertOutputs(torch.cat(ll), feats, torch.cat(hl), y_all.clone())


def routed_accuracy(scores: torch.Tensor, threshold: float, outs: ExpertOutputs) -> tuple[float, float]:
    """(heavy usage, accuracy) of routing ``outs`` with ``scores`` at ``threshold`` (no forward)."""
    esc = scores > threshold
    correct = torch.where(esc, outs.heavy_correct, outs.light_correct)
    return float(esc.float().mean()), float(correct.float().mean())


@dataclass
class Calibration:
    """The chosen threshold and what it achieved on the calibration split."""

    mode: str
    target: float
    threshold: float
    n: int
    tolerance: float
    calib_heavy_usage: float
    calib_accuracy: float
    calib_light_accuracy: float
    calib_heavy_accuracy: float
    router: str
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["threshold"] = threshold_to_json(self.threshold)
        return d


def threshold_to_json(t: float) -> float | str:
    return t if math.isfinite(t) else ("inf" if t > 0 else "-inf")


def threshold_from_json(t) -> float:
    return float(t)


def check_target(heavy_budget: float | None, max_drop: float | None) -> tuple[str, float]:
    """Validate that exactly one target is given and lies in [0, 1]; returns (mode, value)."""
    if (heavy_budget is None) == (max_drop is None):
        raise FlowpruneError("give exactly one calibration target: heavy_budget (fraction of inputs sent to "
                             "the heavy expert) or max_drop (accuracy drop allowed versus the heavy expert)")
    if heavy_budget is not None:
        return "heavy_budget", check_fraction("heavy_budget", heavy_budget, high_open=False)
    return "max_drop", check_fraction("max_drop", max_drop, high_open=False)


def check_precision(n: int, mode: str, target: float, tolerance: float) -> None:
    """Raise unless ``n`` calibration samples can reach ``target`` to within ``tolerance``."""
    if n == 0:
        raise FlowpruneError("the calibration split is empty; routing needs held-out labelled samples "
                             "(use a val_fraction > 0)")
    need = math.ceil(1.0 / tolerance - 1e-9)
    if mode == "heavy_budget":
        need = max(need, math.ceil(target * (1 - target) / tolerance ** 2 - 1e-9))
    if n < need:
        raise FlowpruneError(f"the calibration split has {n} samples, too few for {mode}={target} at "
                             f"tolerance {tolerance} (needs at least {need}); use a larger val split or "
                             "a larger tolerance")
    if mode == "max_drop" and 0 < target < 1.0 / n:
        raise FlowpruneError(f"max_drop={target} is finer than one sample of the {n}-sample calibration split "
                             f"(1/n = {1.0 / n:.4g}); use max_drop=0 or >= {1.0 / n:.4g}, or more data")


def _candidates(scores: torch.Tensor) -> tuple[torch.Tensor, list[int], list[float]]:
    """Sorted (desc) scores, the escalation counts reachable with a strict ``>`` and their thresholds."""
    s = scores.double().sort(descending=True).values
    n = len(s)
    ks, taus = [0], [math.inf]
    for k in range(1, n):
        if s[k - 1] > s[k]:
            ks.append(k)
            taus.append(float((s[k - 1] + s[k]) / 2))
    ks.append(n)
    taus.append(-math.inf)
    return s, ks, taus


def threshold_for_budget(scores: torch.Tensor, budget: float) -> float:
    """The threshold escalating the reachable count nearest ``budget * n`` of ``scores``."""
    n = len(scores)
    if budget <= 0:
        return math.inf
    if budget >= 1:
        return -math.inf
    _, ks, taus = _candidates(scores)
    want = budget * n
    j = min(range(len(ks)), key=lambda i: (abs(ks[i] - want), ks[i]))
    return taus[j]


def threshold_for_drop(scores: torch.Tensor, outs: ExpertOutputs, max_drop: float) -> float:
    """The threshold escalating the fewest samples with routed acc >= heavy acc - max_drop."""
    order = scores.double().argsort(descending=True, stable=True)
    hc = outs.heavy_correct[order].double()
    lc = outs.light_correct[order].double()
    n = len(order)
    # acc(k): the top-k scores go to the heavy expert
    acc = (torch.cat([torch.zeros(1, dtype=torch.float64), hc.cumsum(0)])
           + lc.sum() - torch.cat([torch.zeros(1, dtype=torch.float64), lc.cumsum(0)])) / n
    target = float(hc.mean()) - max_drop
    _, ks, taus = _candidates(scores)
    for k, t in zip(ks, taus):
        if float(acc[k]) >= target - 1e-12:
            return t
    return -math.inf  # pragma: no cover - k = n always qualifies


def calibrate(cascade, outs: ExpertOutputs, *, heavy_budget: float | None = None, max_drop: float | None = None,
              tolerance: float = 0.05) -> Calibration:
    """Pick ``cascade.threshold`` on calibration outputs; sets it **in place** and returns the record.

    A router with ``fit_on == "calibration"`` is fitted on ``outs`` first (the l1 router resolves an
    ``"auto"`` direction in place; its evidence is recorded in ``extra[router.name]``). A router
    with a data-free ``budget_threshold`` (random) uses it. The router's state is rewound afterwards.

    Raises:
        FlowpruneError: no or two targets, a target outside [0, 1], an empty calibration split, or
            one too small for ``tolerance`` (see the module docstring) -- all before any work.
    """
    mode, target = check_target(heavy_budget, max_drop)
    tolerance = check_fraction("tolerance", tolerance, low_open=True, high_open=False)
    check_precision(len(outs), mode, target, tolerance)
    router = cascade.router
    extra: dict = {}
    if router.fit_on == "calibration":
        extra[router.name] = router.fit(outs)
    if router.fit_on == "held_out" and not getattr(router, "fitted", False):
        raise FlowpruneError(f"the {router.name} router has not been trained; fit it on held-out outputs first "
                             "(router.fit(outputs), or fit_learned_router)")
    with torch.no_grad():
        scores = router(outs.light_logits, outs.feats).detach().cpu()
    data_free = router.budget_threshold(target) if mode == "heavy_budget" else None
    if data_free is not None:
        tau = data_free
    elif mode == "heavy_budget":
        tau = threshold_for_budget(scores, target)
    else:
        tau = threshold_for_drop(scores, outs, target)
    router.reset()
    usage, acc = routed_accuracy(scores, tau, outs)
    cascade.threshold = tau
    return Calibration(mode=mode, target=target, threshold=tau, n=len(outs), tolerance=tolerance,
                       calib_heavy_usage=usage, calib_accuracy=acc,
                       calib_light_accuracy=float(outs.light_correct.float().mean()),
                       calib_heavy_accuracy=float(outs.heavy_correct.float().mean()), router=router.name,
                       extra=extra)
