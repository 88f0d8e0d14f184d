"""The timing harness (flowprune.timing): structure and statistics on fake callables, never real speed."""

from __future__ import annotations

import statistics

import pytest
import torch
from torch import nn

from flowprune import device as fp_device
from flowprune import timing
from flowprune.errors import FlowpruneError, ImplausibleTiming
from flowprune.timing import Timings, check_plausible, time_callables, time_models


class FakeClock:
    """perf_counter that advances only when a fake callable 'works': exact, known costs."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", c)
    return c


def _cost(clock, seconds, log=None, name=None):
    def fn():
        if log is not None:
            log.append(name)
        clock.now += seconds
    return fn


def test_medians_and_quartiles_of_known_costs(clock):
    # binary fractions, so the fake clock adds up exactly
    t = time_callables({"a": _cost(clock, 1 / 64), "b": _cost(clock, 3 / 32)}, rounds=5, warmup=1,
                       min_round_s=1 / 16)
    # a: 4 calls reach 1/16 s -> 1/64 per call; b: 1 call of 3/32 is already past 1/16
    assert t.calls["a"] == [4] * 5 and t.calls["b"] == [1] * 5
    assert t.median["a"] == pytest.approx(1 / 64) and t.median["b"] == pytest.approx(6 / 64)
    assert t.speedup("b", "a") == pytest.approx(6.0)
    lo, hi = t.speedup_range("b", "a")
    assert lo == pytest.approx(6.0) and hi == pytest.approx(6.0)
    assert t.rounds == 5 and len(t.samples["a"]) == 5


def test_median_is_of_the_recorded_samples(clock):
    costs = iter([0.3, 0.1, 0.5, 0.2, 0.4])
    t = time_callables({"x": lambda: setattr(clock, "now", clock.now + next(costs))}, rounds=5, warmup=0,
                       min_round_s=0.0)
    assert t.samples["x"] == pytest.approx([0.3, 0.1, 0.5, 0.2, 0.4])
    assert t.median["x"] == pytest.approx(0.3)
    q = statistics.quantiles([0.3, 0.1, 0.5, 0.2, 0.4], n=4, method="inclusive")
    assert t.q25["x"] == pytest.approx(q[0]) and t.q75["x"] == pytest.approx(q[2])


def test_order_rotates_each_round_and_warmup_comes_first(clock):
    log: list[str] = []
    fns = {k: _cost(clock, 1.0, log, k) for k in "abc"}
    t = time_callables(fns, rounds=4, warmup=2, min_round_s=0.0)
    assert log[:6] == ["a", "a", "b", "b", "c", "c"]
    assert log[6:] == list("abc" "bca" "cab" "abc")
    assert t.order == [list("abc"), list("bca"), list("cab"), list("abc")]


def test_synchronise_before_every_clock_reading_and_load_recorded(clock, monkeypatch):
    synced = []
    monkeypatch.setattr(fp_device, "synchronize", lambda d: synced.append(d))
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (1.5, 1.0, 0.5))
    t = time_callables({"a": _cost(clock, 1 / 32)}, device="cpu", rounds=3, warmup=1, min_round_s=3 / 32)
    # warm-up: 1 sync; each round: 1 before the clock + 1 after each of the 3 calls
    assert len(synced) == 1 + 3 * (1 + 3)
    assert all(d == torch.device("cpu") for d in synced)
    assert t.load_before == (1.5, 1.0, 0.5) and t.load_after == (1.5, 1.0, 0.5)
    assert t.threads == torch.get_num_threads() and t.device == "cpu"
    d = t.to_dict()
    assert d["load_before"] == [1.5, 1.0, 0.5] and d["median"]["a"] == pytest.approx(1 / 32)


def _timings(base: list[float], other: list[float]) -> Timings:
    samples = {"base": base, "other": other}
    q = {k: timing._quartiles(v) for k, v in samples.items()}
    return Timings(median={k: v[1] for k, v in q.items()}, q25={k: v[0] for k, v in q.items()},
                   q75={k: v[2] for k, v in q.items()}, samples=samples, load_before=None, load_after=None,
                   device="cpu", backend="eager", threads=1, rounds=len(base))


def test_check_plausible_refuses_a_cascade_faster_than_its_light_expert():
    # the routed cascade ("other") timed 4x faster than its light expert ("base"): impossible
    t = _timings(base=[1.0, 1.1, 0.9, 1.0, 1.0], other=[0.25, 0.26, 0.24, 0.25, 0.25])
    with pytest.raises(ImplausibleTiming, match="cascade.*4.00x faster.*at most 1.00x less work"):
        check_plausible(t, base="base", other="other", work_ratio=1.0, what="cascade vs light expert")
    assert issubclass(ImplausibleTiming, FlowpruneError)


def test_check_plausible_passes_within_the_noise_band_and_below_the_bound():
    # 1.05x faster with a band reaching below 1: noise, not refused
    t = _timings(base=[1.0, 1.2, 0.9, 1.0, 1.1], other=[0.95, 1.1, 0.9, 1.0, 0.93])
    check_plausible(t, base="base", other="other", work_ratio=1.0, what="cascade vs light expert")
    # a pruned model 3x faster with 4x fewer MACs: plausible
    t = _timings(base=[3.0] * 5, other=[1.0] * 5)
    check_plausible(t, base="base", other="other", work_ratio=4.0, what="pruned vs dense")
    # 5x faster with 4x fewer MACs is refused strictly, admitted with 50% slack
    t = _timings(base=[5.0] * 5, other=[1.0] * 5)
    with pytest.raises(ImplausibleTiming):
        check_plausible(t, base="base", other="other", work_ratio=4.0, what="pruned vs dense")
    check_plausible(t, base="base", other="other", work_ratio=4.0, what="pruned vs dense", slack=0.5)


@pytest.mark.parametrize("kw", [{"rounds": 0}, {"warmup": -1}, {"min_round_s": -1.0}, {"min_round_s": "x"}])
def test_bad_arguments_are_refused(kw):
    with pytest.raises(FlowpruneError):
        time_callables({"a": lambda: None}, **kw)


def test_bad_inputs_are_refused():
    with pytest.raises(FlowpruneError, match="non-empty"):
        time_callables({})
    with pytest.raises(FlowpruneError, match="not callable"):
        time_callables({"a": 3})
    with pytest.raises(FlowpruneError, match="backend"):
        time_models({"m": nn.Linear(2, 2)}, torch.zeros(1, 2), backend="tensorrt")
    with pytest.raises(FlowpruneError, match="no timing named"):
        _timings([1.0], [1.0]).speedup("base", "nope")


def test_time_models_restores_modes_and_runs_without_grad(clock):
    calls = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            calls.append((self.training, torch.is_grad_enabled(), tuple(x.shape)))
            clock.now += 0.01
            return self.lin(x)

    m = Probe().train()
    m.lin.eval()  # a mixed state must come back exactly
    t = time_models({"p": m}, torch.zeros(4, 3), rounds=2, warmup=1, min_round_s=0.0)
    assert m.training and not m.lin.training
    assert calls and all(c == (False, False, (4, 3)) for c in calls)
    assert t.backend == "eager" and t.median["p"] == pytest.approx(0.01)


def test_compile_failure_falls_back_to_eager_with_a_note(clock, monkeypatch):
    def broken(model):
        raise RuntimeError("no C compiler\nmore detail")

    monkeypatch.setattr(timing.torch, "compile", broken)
    m = nn.Linear(3, 2)
    t = time_models({"m": m}, torch.zeros(2, 3), backend="compile", rounds=1, warmup=0, min_round_s=0.0)
    assert t.backend == "eager (torch.compile failed)"
    assert len(t.notes) == 1 and "RuntimeError: no C compiler" in t.notes[0] and "timed eager" in t.notes[0]
