"""Cost of routing: MAC-based estimates and measured latency/throughput on real batches.

Relative costs are fractions of the heavy expert's MACs per sample (Torch-Pruning's counter,
:func:`flowprune.measure.count_macs_params`):

* ``c_l`` = (light MACs + router MACs) / heavy MACs (the learned router's MLP is counted here;
  the other routers are a few elementwise ops and count as 0).
* mixture cost (the paper's figure): ``C_mix = p_h + (1 - p_h) c_l``.
* real cascade cost (the light pass is paid for every input): ``C_cascade = c_l + p_h c_rest``,
  where ``c_rest`` is the relative cost of what an escalated sample still runs: 1 for two experts,
  the suffix after the exit stage for an early-exit network.

Measured speed (``measure_speed``): heavy-only, light-only and routed forwards are timed in
interleaved rounds on the **same real batches** (routing depends on the inputs, so random inputs
would misstate the routed cost); medians over rounds. Batch-1 latency is reported as the median
and the mean over real samples (the routed distribution is bimodal: light-only or light+heavy).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from flowprune.device import synchronize
from flowprune.measure import count_macs_params


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


def _timed(fn, x) -> float:
    synchronize(x.device)
    t0 = time.perf_counter()
    fn(x)
    synchronize(x.device)  # queued GPU kernels belong to this call
    return time.perf_counter() - t0


def _chunks(x: torch.Tensor, b: int) -> list[torch.Tensor]:
    n = (len(x) // b) * b
    if n == 0:
        return [x[:b]]
    return [x[i:i + b] for i in range(0, n, b)]


@torch.inference_mode()
def measure_speed(cascade, x: torch.Tensor, *, batch_sizes: Sequence[int] = (64, 256), latency_samples: int = 100,
                  rounds: int = 5, warmup: int = 2) -> dict:
    """Latency (batch 1) and throughput (each batch size) of heavy-only, light-only and routed.

    Args:
        cascade: a :class:`~flowprune.route.cascade.Cascade` or early-exit cascade (its threshold is used).
        x: real inputs ``(N, *input_shape)`` (the test split); throughput uses its first
            ``floor(N / b) * b`` samples in batches of ``b``; latency the first ``latency_samples``.
        rounds: interleaved timing rounds (heavy, light, routed in turn); medians over rounds.

    Returns:
        ``{"heavy": {...}, "light": {...}, "routed": {...}, "speedup_b256": ...}`` where each
        entry has ``latency_ms_b1`` (median), ``latency_ms_b1_mean`` and ``throughput_bB``
        (samples/s), and ``"routed"`` also ``heavy_usage`` on the timed samples.
    """
    light, heavy = cascade.light.eval(), cascade.heavy.eval()
    cascade.eval()
    x = x.to(cascade.input_device())
    fns = {"heavy": heavy, "light": light, "routed": lambda z: cascade.route(z)}
    res: dict = {k: {} for k in fns}
    lat_x = x[:latency_samples]
    for fn in fns.values():  # warm-up
        for _ in range(warmup):
            fn(lat_x[:1])
            fn(x[: max(batch_sizes)])
    lat: dict[str, list[float]] = {k: [] for k in fns}
    thr: dict[str, dict[int, list[float]]] = {k: {b: [] for b in batch_sizes} for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            per = [_timed(fn, lat_x[i:i + 1]) for i in range(len(lat_x))]
            lat[k].append(per)
            for b in batch_sizes:
                chunks = _chunks(x, b)
                total = sum(_timed(fn, c) for c in chunks)
                thr[k][b].append(sum(len(c) for c in chunks) / total)
    for k in fns:
        flat = [t for per in lat[k] for t in per]
        res[k]["latency_ms_b1"] = 1e3 * statistics.median(flat)
        res[k]["latency_ms_b1_mean"] = 1e3 * statistics.fmean(flat)
        for b in batch_sizes:
            res[k][f"throughput_b{b}"] = statistics.median(thr[k][b])
    if hasattr(cascade.router, "reset"):
        cascade.router.reset()
    b_max = max(batch_sizes)
    usage = [cascade.route(c).heavy_usage for c in _chunks(x, b_max)]
    res["routed"]["heavy_usage"] = statistics.fmean(usage)
    for b in batch_sizes:
        res[f"routed_speedup_b{b}"] = res["routed"][f"throughput_b{b}"] / res["heavy"][f"throughput_b{b}"]
    res["rounds"] = rounds
    return res


@torch.inference_mode()
def profile_overhead(cascade, x: torch.Tensor, *, repeats: int = 20) -> dict:
    """Time the parts of one routed forward on batch ``x`` (medians over ``repeats``, seconds).

    Parts: ``light_plain`` (the light expert's own forward), ``light_part`` (the light pass as
    the cascade runs it, with the feature hook when the router needs features), ``router``
    (scores), ``gather`` (mask + nonzero + index_select), ``heavy_sub`` (heavy on the sub-batch),
    ``scatter`` (index_copy_). ``overhead_frac`` = (router + gather + scatter + hook) /
    light_plain, the routing overhead relative to the light expert's time, where ``hook`` =
    light_part - light_plain when the router needs features (l1, learned) and 0 otherwise.
    """
    cascade.eval()
    light = cascade.light.eval()
    x = x.to(cascade.input_device())

    def clock() -> float:  # the device's queued work is finished before the clock is read
        synchronize(x.device)
        return time.perf_counter()

    t: dict[str, list[float]] = {k: [] for k in ("light_plain", "light_part", "router", "gather", "heavy_sub",
                                                 "scatter")}
    thr = cascade.threshold
    for r in range(repeats + 2):
        t0 = clock()
        light(x)
        t1 = clock()
        logits, feats, carry = cascade.light_part(x)
        t2 = clock()
        score = cascade.router(logits, feats)
        t3 = clock()
        idx = (score > thr).nonzero().squeeze(1)
        sub = carry.index_select(0, idx)
        t4 = clock()
        h = cascade.heavy_part(sub) if idx.numel() else None
        t5 = clock()
        if h is not None:
            logits.index_copy_(0, idx, h.to(logits.dtype))
        t6 = clock()
        if r >= 2:
            for k, v in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
                t[k].append(v)
    med = {k: statistics.median(v) for k, v in t.items()}
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

