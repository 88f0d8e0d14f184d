"""Cost of routing: MAC-based estimates and measured latency/throughput on real batches.

Relative costs are fractions of the heavy expert's MACs per sample (Torch-Pruning's counter,
:func:`flowprune.measure.count_macs_params`):

* ``c_l`` = (light MACs + router MACs) / heavy MACs (the learned router's MLP is counted here;
  the other routers are a few elementwise ops and count as 0).
* mixture cost (the paper's figure): ``C_mix = p_h + (1 - p_h) c_l``.
* real cascade cost (the light pass is paid for every input): ``C_cascade = c_l + p_h c_rest``,
  where ``c_rest`` is the relative cost of what an escalated sample still runs: 1 for two experts,
  the suffix after the exit stage for an early-exit network.

Measured speed (``measure_speed``): heavy-only, light-only and routed forwards are timed together
by the one harness (:mod:`flowprune.timing`: interleaved rotated rounds, medians) on the **same
real batches** (routing depends on the inputs, so random inputs would misstate the routed cost).
Batch-1 latency is the mean over real samples (the routed distribution is bimodal: light-only or
light+heavy). A routed figure faster than the light expert, or faster than ``1 / p_h`` times the
heavy expert, is physically impossible and refused (:func:`flowprune.timing.check_plausible`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flowprune.errors import ImplausibleTiming
from flowprune.measure import count_macs_params
from flowprune.timing import Timings, check_plausible, time_callables


def c_mix(p_h: float, c_l: float) -> float:
    """Mixture cost ``p_h + (1 - p_h) c_l`` (relative to the heavy expert)."""
    return p_h + (1.0 - p_h) * c_l


def c_cascade(p_h: float, c_l: float, c_rest: float = 1.0) -> float:
    """Real cascade cost ``c_l + p_h c_rest`` (relative to the heavy expert)."""
    return c_l + p_h * c_rest


def mac_costs(cascade) -> dict:
    """MACs per sample of the light part, the router, the heavy expert, and the relative costs."""
    shape = tuple(cascade.input_shape)
    heavy_macs, heavy_params = count_macs_params(cascade.heavy, shape)
    router_macs = int(cascade.router.macs()) if hasattr(cascade.router, "macs") else 0
    if getattr(cascade, "kind", "") == "early_exit":
        prefix_macs, _ = count_macs_params(cascade.prefix, shape)
        head_macs = cascade.head.in_features * cascade.head.out_features + cascade.head.out_features
        light_macs = prefix_macs + head_macs
        rest_macs = heavy_macs - prefix_macs
        light_params = sum(p.numel() for m in cascade.prefix_modules() for p in m.parameters(recurse=False)) + sum(
            p.numel() for p in cascade.head.parameters())
    else:
        light_macs, light_params = count_macs_params(cascade.light, shape)
        rest_macs = heavy_macs
    c_l = (light_macs + router_macs) / heavy_macs
    return {"macs_heavy": heavy_macs, "macs_light": light_macs, "macs_router": router_macs,
            "params_heavy": heavy_params, "params_light": light_params,
            "c_l": c_l, "c_rest": rest_macs / heavy_macs, "mac_reduction": heavy_macs / max(light_macs, 1)}


def _chunks(x: torch.Tensor, b: int) -> list[torch.Tensor]:
    n = (len(x) // b) * b
    if n == 0:
        return [x[:b]]
    return [x[i:i + b] for i in range(0, n, b)]


def _pass(fn, chunks: list[torch.Tensor]):
    """One unit of work for the harness: ``fn`` over every chunk (the same real samples for all)."""
    def run():
        for c in chunks:
            fn(c)
    return run


def _check_cascade(t: Timings, p_h: float, b: int) -> list[str]:
    """The two physical bounds of a cascade's time: it runs the light expert on every input, so it
    cannot beat the light expert; its escalated share runs the heavy expert, so it cannot beat the
    heavy expert by more than ``1 / p_h``. The messages of the bounds broken (empty: plausible)."""
    checks = [("light", 1.0, f"batch {b}: the routed cascade runs the light expert on every input, so it "
                             "cannot be faster than the light expert alone")]
    if p_h > 0:
        checks.append(("heavy", 1.0 / p_h, f"batch {b}: the routed cascade sends {p_h:.0%} of inputs to the "
                                            "heavy expert, so it cannot beat the heavy expert by more than 1/p_h"))
    out = []
    for base, ratio, what in checks:
        try:
            check_plausible(t, base=base, other="routed", work_ratio=ratio, what=what)
        except ImplausibleTiming as e:
            out.append(str(e))
    return out


def _usage(cascade, chunks: list[torch.Tensor]) -> float:
    if hasattr(cascade.router, "reset"):
        cascade.router.reset()
    n = sum(len(c) for c in chunks)
    usage = sum(cascade.route(c).heavy_usage * len(c) for c in chunks) / n
    if hasattr(cascade.router, "reset"):
        cascade.router.reset()
    return usage


def _timing_info(t: Timings) -> dict:
    return {"rounds": t.rounds, "device": t.device, "backend": t.backend, "threads": t.threads,
            "load_before": t.load_before, "load_after": t.load_after,
            "seconds_per_pass": dict(t.median), "q25": dict(t.q25), "q75": dict(t.q75)}


@torch.inference_mode()
def measure_speed(cascade, x: torch.Tensor, *, batch_sizes: Sequence[int] = (64, 256), latency_samples: int = 100,
                  rounds: int = 5, warmup: int = 1, min_round_s: float = 0.0) -> dict:
    """Latency (batch 1) and throughput (each batch size) of heavy-only, light-only and routed,
    **measured together**: one :func:`flowprune.timing.time_callables` call per batch size times
    the three interleaved (rotated order, medians over ``rounds``) on the same real samples.

    Args:
        cascade: a :class:`~flowprune.route.cascade.Cascade` or early-exit cascade (its threshold is used).
        x: real inputs ``(N, *input_shape)`` (the test split); throughput uses its first
            ``floor(N / b) * b`` samples in batches of ``b``; latency the first ``latency_samples``
            one at a time (so ``latency_ms_b1`` is the mean over real samples of a bimodal
            routed cost: light only, or light + heavy).

    Returns:
        ``{"heavy": {...}, "light": {...}, "routed": {...}, "routed_speedup_bB": ...,
        "timing": {...}, "refused": [...]}`` where each entry has ``latency_ms_b1`` and
        ``throughput_bB`` (samples/s), ``"routed"`` also ``heavy_usage`` on the timed samples.
        A routed figure that breaks a physical bound (faster than the light expert, or than
        ``1 / heavy_usage`` times the heavy expert, beyond the noise band) is re-measured once
        with twice the rounds; if it still does it is None and the reason is in ``refused``.
    """
    light, heavy = cascade.light.eval(), cascade.heavy.eval()
    cascade.eval()
    x = x.to(cascade.input_device())
    fns = {"heavy": heavy, "light": light, "routed": lambda z: cascade.route(z)}
    res: dict = {k: {} for k in fns}
    res.update(timing={}, refused=[])
    for b in (1, *batch_sizes):
        chunks = _chunks(x[:latency_samples], 1) if b == 1 else _chunks(x, b)
        n = sum(len(c) for c in chunks)
        p_h = _usage(cascade, chunks)
        for attempt in range(2):
            t = time_callables({k: _pass(fn, chunks) for k, fn in fns.items()}, device=x.device,
                               rounds=rounds * (attempt + 1), warmup=warmup, min_round_s=min_round_s,
                               backend="eager")
            refused = _check_cascade(t, p_h, b)
            if not refused:
                break
        key = "latency_ms_b1" if b == 1 else f"throughput_b{b}"
        for k in fns:
            res[k][key] = 1e3 * t.median[k] / n if b == 1 else n / t.median[k]
        if refused:
            res["routed"][key] = None
            res["refused"] += refused
        res["timing"][f"b{b}"] = {**_timing_info(t), "samples": n, "heavy_usage": p_h}
    res["routed"]["heavy_usage"] = res["timing"][f"b{max(batch_sizes)}"]["heavy_usage"]
    for b in batch_sizes:
        r = res["routed"][f"throughput_b{b}"]
        res[f"routed_speedup_b{b}"] = None if r is None else r / res["heavy"][f"throughput_b{b}"]
    res["rounds"] = rounds
    return res


@torch.inference_mode()
def profile_overhead(cascade, x: torch.Tensor, *, repeats: int = 7) -> dict:
    """Time the parts of one routed forward on batch ``x`` (medians over ``repeats`` interleaved
    rounds of :func:`flowprune.timing.time_callables`, seconds).

    Parts: ``light_plain`` (the light expert's own forward), ``light_part`` (the light pass as
    the cascade runs it, with the feature hook when the router needs features), ``router``
    (scores), ``gather`` (mask + nonzero + index_select), ``heavy_sub`` (heavy on the sub-batch),
    ``scatter`` (index_copy_). Each part runs on the outputs of the one before, computed once.
    ``overhead_frac`` = (router + gather + scatter + hook) / light_plain, the routing overhead
    relative to the light expert's time, where ``hook`` = light_part - light_plain when the router
    needs features (l1, learned) and 0 otherwise.
    """
    cascade.eval()
    light = cascade.light.eval()
    x = x.to(cascade.input_device())
    thr = cascade.threshold
    logits, feats, carry = cascade.light_part(x)
    score = cascade.router(logits, feats)
    idx = (score > thr).nonzero().squeeze(1)
    sub = carry.index_select(0, idx)
    h = cascade.heavy_part(sub) if idx.numel() else None
    out = logits.clone() if h is None else logits.clone().to(h.dtype)
    parts = {"light_plain": lambda: light(x), "light_part": lambda: cascade.light_part(x),
             "router": lambda: cascade.router(logits, feats),
             "gather": lambda: carry.index_select(0, (score > thr).nonzero().squeeze(1)),
             "heavy_sub": (lambda: cascade.heavy_part(sub)) if idx.numel() else (lambda: None),
             "scatter": (lambda: out.index_copy_(0, idx, h)) if h is not None else (lambda: None)}
    timed = time_callables(parts, device=x.device, rounds=repeats, warmup=1, min_round_s=0.01)
    med: dict = dict(timed.median)
    # the feature hook only exists when the router needs features; otherwise the difference is timing noise
    hook = max(0.0, med["light_part"] - med["light_plain"]) if cascade.router.needs_features else 0.0
    med["hook"] = hook
    med["overhead"] = med["router"] + med["gather"] + med["scatter"] + hook
    # conservative denominator: without a feature hook both passes run the same light forward, so the
    # smaller median is the better estimate of the light expert's time on a noisy machine
    light_t = med["light_plain"] if cascade.router.needs_features else min(med["light_plain"], med["light_part"])
    med["overhead_frac"] = med["overhead"] / light_t
    med["batch_size"] = int(x.shape[0])
    if hasattr(cascade.router, "reset"):
        cascade.router.reset()
    return med



def routed_speed_summary(sp: dict, costs: dict) -> dict:
    """The flat speed figures of a routed result (what every command reports with a model): the
    routed cascade's measured speed-up over the heavy expert at batch 1 (latency) and at each
    throughput batch, next to its MACs reduction ``1 / C_cascade``; None where refused."""
    lat_h, lat_r = sp["heavy"]["latency_ms_b1"], sp["routed"]["latency_ms_b1"]
    out = {"speedup_b1": None if lat_r is None else lat_h / lat_r,
           "macs_reduction": 1.0 / costs["C_cascade"] if costs.get("C_cascade") else None}
    for k, v in sp.items():
        if k.startswith("routed_speedup_b"):
            out[f"speedup_b{k.rpartition('_b')[2]}"] = v
    b1 = sp["timing"]["b1"]
    out["speed_backend"] = f"{b1['backend']} on {b1['device']}"
    return out
