"""The one timing harness: every speed figure flowprune prints comes from here.

Timings on a shared machine drift by up to 2x between runs (docs/speed.md), so speed is only
ever compared as a ratio of things measured **together**:

* :func:`time_callables` times named callables, each doing one unit of work (one forward of one
  batch). Every callable is warmed up, then timed in ``rounds`` interleaved rounds; the order is
  rotated each round (round ``r`` starts at callable ``r mod n``) so none always runs first or
  right after another. In a round, a callable is called repeatedly until at least
  ``min_round_s`` have passed and the round records seconds per call. The device is
  synchronised (:func:`flowprune.device.synchronize`) before every clock reading, so queued GPU
  work is counted in the call that queued it.
* :func:`time_models` does the same for models on one input batch, in eval mode under
  ``torch.no_grad`` (each model's own train/eval flags are restored), with the backend named:
  ``eager`` or ``compile`` (``torch.compile``; a model it fails on falls back to eager and the
  failure is recorded in ``Timings.notes``).
* :class:`Timings` holds per-callable medians and quartiles of the round samples, the load
  average before and after, the device, backend and thread count. ``speedup(base, other)`` is
  ``median[base] / median[other]``; ``speedup_range`` the band from the quartiles.
* :func:`check_plausible` refuses a physically impossible result: a speed-up of ``other`` over
  ``base`` above the ratio of work removed by more than the noise band (a cascade that runs its
  light expert on every input cannot beat the light expert alone).

Nothing here changes a caller's model, and no function asserts anything about how fast a machine
is: the statistics are of whatever the clock read.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from flowprune import device as _device
from flowprune.errors import FlowpruneError, ImplausibleTiming, check_positive_int

BACKENDS = ("eager", "compile")


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put ``model`` in eval mode for the block and restore every module's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, f in flags:
            m.training = f


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    """(q25, median, q75) of ``xs`` (inclusive method; one sample gives it three times)."""
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def _load() -> tuple[float, float, float] | None:
    try:
        return tuple(float(v) for v in os.getloadavg())  # type: ignore[return-value]
    except (OSError, AttributeError):  # pragma: no cover - platforms without getloadavg
        return None


@dataclass
class Timings:
    """Seconds per call of each named callable, from one interleaved measurement."""

    median: dict[str, float]
    q25: dict[str, float]
    q75: dict[str, float]
    samples: dict[str, list[float]]
    load_before: tuple[float, float, float] | None
    load_after: tuple[float, float, float] | None
    device: str
    backend: str
    threads: int
    rounds: int = 0
    calls: dict[str, list[int]] = field(default_factory=dict)  # calls per round, per callable
    order: list[list[str]] = field(default_factory=list)  # the order of each round
    notes: list[str] = field(default_factory=list)

    def _check(self, *names: str) -> None:
        for n in names:
            if n not in self.median:
                raise FlowpruneError(f"no timing named {n!r}; measured: {', '.join(self.median)}")

    def speedup(self, base: str, other: str) -> float:
        """``median[base] / median[other]``: how many times faster ``other`` ran than ``base``."""
        self._check(base, other)
        return self.median[base] / self.median[other]

    def speedup_range(self, base: str, other: str) -> tuple[float, float]:
        """The noise band of :meth:`speedup` from the quartiles: ``(q25[base] / q75[other],
        q75[base] / q25[other])``."""
        self._check(base, other)
        return self.q25[base] / self.q75[other], self.q75[base] / self.q25[other]

    def per_second(self, name: str, items_per_call: int = 1) -> float:
        """Items per second of ``name`` (``items_per_call`` = the batch size for a forward)."""
        self._check(name)
        return items_per_call / self.median[name]

    def to_dict(self) -> dict:
        """JSON-safe: everything above, tuples as lists."""
        d = asdict(self)
        for k in ("load_before", "load_after"):
            d[k] = list(d[k]) if d[k] is not None else None
        return d

    def describe(self) -> str:
        """One line naming how these numbers were measured (for printed reports)."""
        lb = f"{self.load_before[0]:.2f}" if self.load_before else "?"
        la = f"{self.load_after[0]:.2f}" if self.load_after else "?"
        return (f"one interleaved measurement of {', '.join(self.median)}: {self.rounds} rounds, medians, "
                f"{self.backend} on {self.device}, {self.threads} thread(s), load {lb} -> {la}")


def _check_args(rounds: int, warmup: int, min_round_s: float) -> None:
    check_positive_int("rounds", rounds)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise FlowpruneError(f"warmup must be a non-negative integer, got {warmup!r}")
    if not isinstance(min_round_s, (int, float)) or not (min_round_s >= 0) or math.isinf(min_round_s):
        raise FlowpruneError(f"min_round_s must be a finite number >= 0 (seconds), got {min_round_s!r}")


def _one_round(fn: Callable[[], object], dev, min_round_s: float) -> tuple[float, int]:
    """Call ``fn`` until at least ``min_round_s`` passed; (seconds per call, calls)."""
    _device.synchronize(dev)
    t0 = time.perf_counter()
    n = 0
    while True:
        fn()
        n += 1
        _device.synchronize(dev)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_round_s:
            return elapsed / n, n


def time_callables(fns: Mapping[str, Callable[[], object]], *, device=None, rounds: int = 7, warmup: int = 2,
                   min_round_s: float = 0.05, backend: str = "callable") -> Timings:
    """Time each callable (one unit of work per call) in interleaved, rotated rounds.

    Args:
        fns: name -> callable taking no argument.
        device: where the work runs (synchronised before each clock reading); ``None`` = no
            device to wait for (the CPU).
        rounds: timed rounds; each gives one seconds-per-call sample per callable.
        warmup: untimed calls of each callable first.
        min_round_s: a round repeats a callable until at least this long passed (0: one call).
        backend: the label recorded in :attr:`Timings.backend`.
    """
    if not isinstance(fns, Mapping) or not fns:
        raise FlowpruneError("time_callables needs a non-empty mapping of name -> callable")
    bad = [k for k, f in fns.items() if not callable(f)]
    if bad:
        raise FlowpruneError(f"time_callables: {', '.join(map(repr, bad))} is not callable")
    _check_args(rounds, warmup, min_round_s)
    dev = torch.device(device) if device is not None else None
    names = list(fns)
    load_before = _load()
    for name in names:
        for _ in range(warmup):
            fns[name]()
            _device.synchronize(dev)
    samples: dict[str, list[float]] = {k: [] for k in names}
    calls: dict[str, list[int]] = {k: [] for k in names}
    order = []
    for r in range(rounds):
        k = r % len(names)
        this = names[k:] + names[:k]
        order.append(this)
        for name in this:
            s, n = _one_round(fns[name], dev, min_round_s)
            samples[name].append(s)
            calls[name].append(n)
    load_after = _load()
    q = {k: _quartiles(v) for k, v in samples.items()}
    return Timings(median={k: v[1] for k, v in q.items()}, q25={k: v[0] for k, v in q.items()},
                   q75={k: v[2] for k, v in q.items()}, samples=samples, load_before=load_before,
                   load_after=load_after, device=str(dev) if dev is not None else "cpu", backend=backend,
                   threads=torch.get_num_threads(), rounds=rounds, calls=calls, order=order)


def _compiled(model: nn.Module, x: torch.Tensor, notes: list[str], name: str):
    """``torch.compile(model)`` if it compiles and runs on ``x``, else the model (a note says why)."""
    try:
        fn = torch.compile(model)
        with torch.no_grad():
            fn(x)
        return fn
    except Exception as e:  # noqa: BLE001 -- any compiler failure falls back to eager, recorded
        notes.append(f"{name}: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                     "timed eager")
        return model


def time_models(models: Mapping[str, nn.Module], inputs: torch.Tensor, *, device=None, backend: str = "eager",
                rounds: int = 7, warmup: int = 2, min_round_s: float = 0.05) -> Timings:
    """Time one forward of each model on ``inputs`` (interleaved; see :func:`time_callables`).

    Each model runs in eval mode under ``torch.no_grad`` (its modules' flags are restored
    afterwards) on its own device; ``inputs`` is copied there once. ``device`` names the device
    to synchronise (default: the first model's). ``backend`` is ``eager`` or ``compile``.
    """
    if not isinstance(models, Mapping) or not models:
        raise FlowpruneError("time_models needs a non-empty mapping of name -> nn.Module")
    bad = [k for k, m in models.items() if not isinstance(m, nn.Module)]
    if bad:
        raise FlowpruneError(f"time_models: {', '.join(map(repr, bad))} is not an nn.Module")
    if not isinstance(inputs, torch.Tensor):
        raise FlowpruneError(f"time_models: inputs must be a tensor, got {type(inputs).__name__}")
    if backend not in BACKENDS:
        raise FlowpruneError(f"unknown timing backend {backend!r}; allowed: {', '.join(BACKENDS)} "
                             "(onnxruntime sessions are timed with time_callables)")
    _check_args(rounds, warmup, min_round_s)
    first = _device.model_device(next(iter(models.values())))
    dev = _device.resolve_device(device) if device is not None else (first or inputs.device)
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        fns = {}
        for name, m in models.items():
            stack.enter_context(eval_mode(m))
            x = inputs.to(_device.model_device(m) or dev)
            fn = _compiled(m, x, notes, name) if backend == "compile" else m
            fns[name] = (lambda f, z: (lambda: f(z)))(fn, x)
        t = time_callables(fns, device=dev, rounds=rounds, warmup=warmup, min_round_s=min_round_s,
                           backend=backend)
    t.notes.extend(notes)
    if backend == "compile" and len(notes) == len(models):
        t.backend = "eager (torch.compile failed)"
    return t


def check_plausible(t: Timings, *, base: str, other: str, work_ratio: float, what: str,
                    slack: float = 0.0) -> None:
    """Raise :class:`~flowprune.errors.ImplausibleTiming` if ``other`` beat ``base`` by more than
    the work it removed allows.

    ``work_ratio`` is the work of ``base`` over the work of ``other`` (a cascade vs its light
    expert: 1, since the cascade does the light work and more; a pruned vs the dense model: the
    MACs ratio). The result is refused when even the low end of the noise band
    (:meth:`Timings.speedup_range`) exceeds ``work_ratio * (1 + slack)``; ``slack`` admits known
    super-linear effects (a smaller model fitting in cache), 0 for a strict physical bound.
    """
    if not isinstance(work_ratio, (int, float)) or not work_ratio > 0 or math.isinf(work_ratio):
        raise FlowpruneError(f"work_ratio must be a positive finite number, got {work_ratio!r}")
    if not isinstance(slack, (int, float)) or not slack >= 0:
        raise FlowpruneError(f"slack must be a number >= 0, got {slack!r}")
    lo, hi = t.speedup_range(base, other)
    bound = work_ratio * (1.0 + slack)
    if lo > bound:
        raise ImplausibleTiming(
            f"implausible timing: {what}: {other} measured {t.speedup(base, other):.2f}x faster than {base} "
            f"(noise band {lo:.2f}-{hi:.2f}x), but it does at most {work_ratio:.2f}x less work"
            f"{f' (with {slack:.0%} slack)' if slack else ''}; the timing is broken (measured apart, under "
            f"changing load, or a lazy/cached result), so it is not reported "
            f"(load {t.load_before} -> {t.load_after})")
