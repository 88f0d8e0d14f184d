"""Errors that flowprune raises for bad input.

Every user-facing validation failure is a :class:`FlowpruneError` (a ``ValueError``) whose
message names the argument, the bad value and what is allowed, so the CLI can print it as one
line without a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class FlowpruneError(ValueError):
    """A bad argument or input, with a message that says what is allowed."""


def bad_choice(arg: str, value: object, choices: Iterable[str]) -> FlowpruneError:
    """Build the error for ``value`` not being one of ``choices`` for argument ``arg``."""
    allowed = ", ".join(sorted(str(c) for c in choices))
    return FlowpruneError(f"unknown {arg} {value!r}; allowed: {allowed}")


def check_positive_int(arg: str, value: object) -> int:
    """Return ``value`` as an int if it is a positive integer, else raise FlowpruneError."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise FlowpruneError(f"{arg} must be a positive integer, got {value!r}")
    return value


def check_fraction(arg: str, value: object, *, low: float = 0.0, high: float = 1.0,
                   low_open: bool = False, high_open: bool = True) -> float:
    """Return ``value`` as a float if it lies in the interval, else raise FlowpruneError.

    The interval is ``[low, high)`` by default; ``low_open``/``high_open`` make either end open.
    """
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise FlowpruneError(f"{arg} must be a number, got {value!r}") from None
    lo_ok = v > low if low_open else v >= low
    hi_ok = v < high if high_open else v <= high
    if not (lo_ok and hi_ok) or v != v:
        lb = "(" if low_open else "["
        rb = ")" if high_open else "]"
        raise FlowpruneError(f"{arg} must lie in {lb}{low}, {high}{rb}, got {value!r}")
    return v


class ImplausibleTiming(FlowpruneError):
    """A measured speed that cannot be true (faster than the work removed allows): the timing is
    broken and the number must not be reported. Raised by :func:`flowprune.timing.check_plausible`."""
