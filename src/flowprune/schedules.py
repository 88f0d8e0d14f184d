"""Schedules of an iterative pruning run: the target after each of ``steps`` steps.

* MACs targets (a reduction factor R >= 1, e.g. 4.0 = 4x fewer MACs):
  ``geometric`` -- R_s = R ** (s / S) (every step removes the same *fraction* of what is left;
  default); ``linear`` -- R_s = 1 + (R - 1) * s / S.
* Ratios (a fraction r in [0, 1) of each unit's *original* width removed):
  ``geometric`` -- keep_s = (1 - r) ** (s / S); ``linear`` -- r_s = r * s / S.
"""

from __future__ import annotations

from flowprune.errors import bad_choice, check_positive_int

SCHEDULES = ("geometric", "linear")


def macs_schedule(target: float, steps: int, schedule: str = "geometric") -> list[float]:
    """Cumulative MACs reduction factors after steps 1..S (the last equals ``target``)."""
    check_positive_int("steps", steps)
    if schedule not in SCHEDULES:
        raise bad_choice("schedule", schedule, SCHEDULES)
    if schedule == "geometric":
        out = [float(target) ** (s / steps) for s in range(1, steps + 1)]
    else:
        out = [1.0 + (float(target) - 1.0) * s / steps for s in range(1, steps + 1)]
    out[-1] = float(target)
    return out


def ratio_schedule(ratio: float, steps: int, schedule: str = "geometric") -> list[float]:
    """Cumulative removed fractions (of the original width) after steps 1..S (the last equals ``ratio``)."""
    check_positive_int("steps", steps)
    if schedule not in SCHEDULES:
        raise bad_choice("schedule", schedule, SCHEDULES)
    if schedule == "geometric":
        out = [1.0 - (1.0 - float(ratio)) ** (s / steps) for s in range(1, steps + 1)]
    else:
        out = [float(ratio) * s / steps for s in range(1, steps + 1)]
    out[-1] = float(ratio)
    return out
