"""The Hyperflows pressure scheduler and the pressure -> sparsity law (METHODS.md §4).

Trajectory: ``R(e) = prod_{k=1..e} r_k`` with ``r_k = s0 + (0.999 - s0) * sigmoid((6/T) * (k - T/2))``;
``s0`` is found by bisection so that ``R(T)`` equals the target remaining fraction. Early epochs
therefore prune fast and late ones slowly. ``e`` may be fractional (the product is interpolated
geometrically inside an epoch). With ``resolution = u`` updates per epoch the trajectory is
defined over ``T * u`` sub-steps (``k`` counts sub-steps), which for ``u = 1`` is exactly the paper's
and for short runs lets the sigmoid reach low targets (with ``T = 4`` whole epochs the product
cannot go below ~0.07).

Controller (the paper gives "raise gamma when above the trajectory, lower it when below, with an
inertia term", not the exact rule; ours, documented): in log space,
``err = ln(remaining / R(e))``, ``v <- inertia * v + gain * err``, ``ln gamma <- ln gamma + v``,
with the step clipped to ``+-max_log_step`` and gamma to ``[gamma_min, gamma_max]``.
``gain=0.5`` and ``inertia=0.0`` by default (see :mod:`flowprune.pruning.hyperflows`).

Predictive (closed-loop) mode: the logits integrate the pressure, so weights already on their way
to zero keep crossing after gamma is lowered, and an error measured on the current remaining
fraction alone reacts too late (the cause of the overshoot measured before: 99.73 % for a 98 %
target on ResNet-20/digits). When the caller also passes ``predicted`` (the remaining fraction
that the logits' current velocities would give at the next update, see
:func:`flowprune.pruning.hyperflows.predicted_remaining`) and ``horizon`` (the time to that
update, in epochs), the error is ``ln(predicted / R(e + horizon))``: the controller corrects for
the pruning already in flight. After the last pruning epoch ``R`` stays at the target, so the
same controller holds the remaining fraction there during regrowth.

Law: under a constant pressure the final remaining fraction follows ``S(gamma) = c * gamma^(-a)``;
:func:`fit_power_law` fits it (and the log-quadratic form ``S = c * exp(-(a0 ln g + a1 ln^2 g))``)
by linear least squares in log space and reports R^2 of ``ln S``. :func:`gamma_for_remaining`
inverts a fit to seed the scheduler's initial gamma.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from flowprune.errors import FlowpruneError


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def trajectory_ratio(k: float, s0: float, total: int, top: float = 0.999) -> float:
    """``r_k``: the fraction of the remaining weights an epoch ``k`` keeps."""
    return s0 + (top - s0) * _sigmoid((6.0 / total) * (k - total / 2.0))


def trajectory(e: float, s0: float, total: int, top: float = 0.999) -> float:
    """``R(e)``; fractional ``e`` interpolates the last epoch geometrically."""
    e = max(0.0, min(float(e), float(total)))
    whole = int(math.floor(e))
    r = 1.0
    for k in range(1, whole + 1):
        r *= trajectory_ratio(k, s0, total, top)
    frac = e - whole
    if frac > 0:
        r *= trajectory_ratio(whole + 1, s0, total, top) ** frac
    return r


def solve_s0(target_remaining: float, total: int, top: float = 0.999, iters: int = 100) -> float:
    """Bisection for ``s0`` in ``[0, top]`` with ``R(total) = target_remaining``."""
    if not 0 < target_remaining < 1:
        raise FlowpruneError(f"target remaining fraction must lie in (0, 1), got {target_remaining!r}")
    if trajectory(total, 0.0, total, top) > target_remaining:
        raise FlowpruneError(f"a target of {target_remaining:.3g} remaining is unreachable in {total} epochs "
                             "with the sigmoid trajectory; use more pruning epochs")
    lo, hi = 0.0, top
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if trajectory(total, mid, total, top) > target_remaining:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


@dataclass
class PressureScheduler:
    """Steers gamma so the remaining fraction follows ``R(e)`` (see the module docstring).

    State (``gamma``, ``velocity``, ``history``) is JSON-safe: :meth:`state_dict` /
    :meth:`load_state_dict` let a run resume exactly.
    """

    target_remaining: float
    epochs: int
    gamma: float = 1.0
    inertia: float = 0.0
    gain: float = 0.5
    gamma_min: float = 1e-4
    gamma_max: float = 1e8
    velocity: float = 0.0
    resolution: int = 1
    max_log_step: float = 1.0
    kp: float = 0.0
    integral: float | None = None
    brake: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.epochs, int) and self.epochs > 0):
            raise FlowpruneError(f"pruning epochs must be a positive integer, got {self.epochs!r}")
        if not (self.gamma > 0 and math.isfinite(self.gamma)):
            raise FlowpruneError(f"initial pressure gamma must be a positive number, got {self.gamma!r}")
        if not 0 <= self.inertia < 1:
            raise FlowpruneError(f"inertia must lie in [0, 1), got {self.inertia!r}")
        if not (isinstance(self.resolution, int) and self.resolution > 0):
            raise FlowpruneError(f"scheduler resolution must be a positive integer, got {self.resolution!r}")
        self.s0 = solve_s0(self.target_remaining, self.epochs * self.resolution)
        self.history: list[dict] = []

    def expected(self, e: float) -> float:
        return trajectory(e * self.resolution, self.s0, self.epochs * self.resolution)

    def step(self, e: float, remaining: float, predicted: float | None = None, horizon: float = 0.0) -> float:
        """Update gamma after (fractional) epoch ``e`` given the measured remaining fraction.

        With ``predicted`` (the remaining fraction expected ``horizon`` epochs from now if the logits
        keep their current velocities), the error is taken against ``R(e + horizon)`` instead.
        """
        exp_r = self.expected(e)
        if predicted is not None:
            err = math.log(max(predicted, 1e-12) / self.expected(e + horizon))
        else:
            err = math.log(max(remaining, 1e-12) / exp_r)
        if self.integral is None:
            self.integral = math.log(self.gamma)
        if err < 0:  # below the trajectory: pruned weights come back slowly, so brake harder
            err *= self.brake
        self.velocity = self.inertia * self.velocity + self.gain * err
        self.velocity = max(-self.max_log_step, min(self.max_log_step, self.velocity))
        lo, hi = math.log(self.gamma_min), math.log(self.gamma_max)
        self.integral = min(max(self.integral + self.velocity, lo), hi)
        g = min(max(self.integral + self.kp * err, lo), hi)
        self.gamma = math.exp(g)
        rec = {"epoch": e, "remaining": remaining, "expected": exp_r, "gamma": self.gamma}
        if predicted is not None:
            rec["predicted"] = predicted
        self.history.append(rec)
        return self.gamma

    def state_dict(self) -> dict:
        return {**asdict(self), "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.gamma = float(state["gamma"])
        self.velocity = float(state["velocity"])
        self.integral = state.get("integral")
        self.history = list(state.get("history", []))


class ConstantPressure:
    """A fixed gamma with the scheduler's interface (pressure sweeps)."""

    def __init__(self, gamma: float):
        if not (gamma > 0 and math.isfinite(gamma)):
            raise FlowpruneError(f"a constant pressure gamma must be a positive number, got {gamma!r}")
        self.gamma = float(gamma)
        self.s0 = None
        self.history: list[dict] = []

    def expected(self, e: float) -> None:
        return None

    def step(self, e: float, remaining: float) -> float:
        return self.gamma

    def state_dict(self) -> dict:
        return {"gamma": self.gamma}

    def load_state_dict(self, state: dict) -> None:
        self.gamma = float(state["gamma"])


def fit_power_law(gammas: Sequence[float], remaining: Sequence[float]) -> dict:
    """Fit ``S = c * gamma^(-a)`` and ``S = c * exp(-(a0 ln g + a1 ln^2 g))`` in log space.

    Args:
        gammas: constant pressures (> 0).
        remaining: final remaining fractions in (0, 1] measured under them.

    Returns:
        ``{"power": {"c", "a", "r2"}, "log_quadratic": {"c", "a0", "a1", "r2"}, "n"}``; R^2 is of
        ``ln S`` (the quantity fitted).
    """
    g = np.asarray(gammas, dtype=float)
    s = np.asarray(remaining, dtype=float)
    if g.shape != s.shape or g.size < 2:
        raise FlowpruneError(f"need at least two (gamma, remaining) pairs of equal length, got {g.size} and {s.size}")
    if np.any(g <= 0) or np.any(s <= 0):
        raise FlowpruneError("pressures and remaining fractions must be positive to fit a power law")
    lg, ls = np.log(g), np.log(s)
    ss_tot = float(np.sum((ls - ls.mean()) ** 2))

    def r2(pred: np.ndarray) -> float:
        ss = float(np.sum((ls - pred) ** 2))
        return 1.0 - ss / ss_tot if ss_tot > 0 else 1.0

    a_mat = np.stack([np.ones_like(lg), -lg], 1)
    (lc, a), *_ = np.linalg.lstsq(a_mat, ls, rcond=None)
    out = {"n": int(g.size), "power": {"c": float(np.exp(lc)), "a": float(a), "r2": r2(a_mat @ np.array([lc, a]))}}
    if g.size >= 3:
        q_mat = np.stack([np.ones_like(lg), -lg, -lg ** 2], 1)
        coef, *_ = np.linalg.lstsq(q_mat, ls, rcond=None)
        out["log_quadratic"] = {"c": float(np.exp(coef[0])), "a0": float(coef[1]), "a1": float(coef[2]),
                                "r2": r2(q_mat @ coef)}
    return out


def gamma_for_remaining(fit: dict, remaining: float) -> float:
    """Invert the power-law fit: the constant gamma predicted to leave ``remaining`` of the weights."""
    if not 0 < remaining <= 1:
        raise FlowpruneError(f"remaining fraction must lie in (0, 1], got {remaining!r}")
    p = fit["power"] if "power" in fit else fit
    c, a = float(p["c"]), float(p["a"])
    if a <= 0:
        raise FlowpruneError(f"the fitted exponent a={a:.3g} is not positive; the sweep shows no pressure law")
    return float((c / remaining) ** (1.0 / a))
