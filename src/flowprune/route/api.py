"""One call from two trained experts to a calibrated, measured, saved routed model.

:func:`route_experts` (two experts) and :func:`route_early_exit` (one network with an exit head)
run: validate -> collect both experts' outputs on val and test -> (learned router: fit on part of
val) -> calibrate the threshold on val -> route the test split for real -> random-routing
baseline at the achieved heavy usage -> MAC costs -> threshold sweep (Pareto curve, measured
cost) -> measured latency/throughput and routing overhead -> AGF signal-compression diagnostic
-> save (results.json, pareto.png, cascade/).

The learned router needs its own held-out data: by default the val split is cut in two
(seeded permutation; ``learned_fraction=0.5`` trains the router, the rest calibrates the
threshold). The test split is only ever used for reporting.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowprune.config import ProcedureConfig, ProcedureResult, jsonable
from flowprune.errors import FlowpruneError, check_fraction, check_positive_int
from flowprune.route.calibrate import (
    Calibration,
    ExpertOutputs,
    calibrate,
    check_precision,
    check_target,
    collect_outputs,
    routed_accuracy,
    threshold_for_budget,
)
from flowprune.route.cascade import Cascade, check_experts
from flowprune.route.cost import (
    c_cascade,
    c_mix,
    mac_costs,
    measure_speed,
    profile_overhead,
    routed_speed_summary,
)
from flowprune.route.routers import RandomRouter, Router, auroc, get_router, router_class

SWEEP_USAGES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass
class RouteResult(ProcedureResult):
    """The routed model and everything measured about it (``results`` is what results.json holds).

    ``.model`` is the cascade (the routed model); ``.to_dict()`` the JSON-safe ``results``.
    """

    cascade: nn.Module
    calibration: Calibration
    results: dict = field(default_factory=dict)

    @property
    def model(self) -> nn.Module:
        return self.cascade

    def to_dict(self) -> dict:
        """What results.json holds (calibration, test numbers, costs, sweep, ...), JSON-safe."""
        return jsonable(self.results)

    def summary(self) -> dict:
        """The headline numbers as a flat dict (percentages as fractions in [0, 1])."""
        r = self.results
        t = r["test"]
        s = {"router": r["router"], "kind": r["kind"], "target": f"{r['calibration']['mode']}={r['calibration']['target']}",
             "threshold": r["calibration"]["threshold"], "light_acc": t["light_accuracy"],
             "heavy_acc": t["heavy_accuracy"], "routed_acc": t["accuracy"], "heavy_usage": t["heavy_usage"],
             "random_acc_same_usage": t["random_accuracy_same_usage"], "c_l": r["cost"]["c_l"],
             "C_mix": r["cost"]["C_mix"], "C_cascade": r["cost"]["C_cascade"]}
        sp = r.get("speed")
        if sp:
            s["routed_speedup_b256"] = sp.get("routed_speedup_b256")
            s["speedup_b1"], s["speedup_b64"] = r.get("speedup_b1"), r.get("speedup_b64")
            s["latency_ms_b1_routed"] = sp["routed"]["latency_ms_b1"]
        if r.get("overhead"):
            s["overhead_frac_b256"] = r["overhead"]["overhead_frac"]
        if r.get("signal_compression"):
            sc = r["signal_compression"]
            s["agf_range_early"] = sc["early"]["p99_p1"]
            s["agf_range_converged"] = sc["converged"]["p99_p1"]
        return s


def _check_router_arg(router, options) -> type[Router] | None:
    """Raise unless ``router`` is a :class:`Router` or a registered name and ``options`` (router_kwargs)
    a dict or None; returns the registered class of a name."""
    if not isinstance(router, (Router, str)):
        raise FlowpruneError(f"router must be a registered name (flowprune.list_routers()) or a Router, "
                             f"got {type(router).__name__}")
    if options is not None and not isinstance(options, dict):
        raise FlowpruneError(f"router_kwargs must be a dict of the router's options, got {type(options).__name__}")
    return router_class(router) if isinstance(router, str) else None


def build_router(router: str | Router, options: dict | None = None, *, seed: int = 0, hidden: int = 32) -> Router:
    """A router from its registry name and ``options``, or a copy of a :class:`Router` instance
    (fitting and calibration change the router; the caller's stays as it was).

    A router class that lists ``"seed"`` or ``"hidden"`` in ``inherits`` gets ``seed`` / ``hidden``
    (route_experts' ``seed`` and ``learned_hidden``) unless ``options`` sets them.
    """
    if isinstance(router, Router):
        if options:
            raise FlowpruneError(f"router_kwargs {sorted(options)} apply to a router given by name; configure the "
                                 f"{type(router).__name__} instance itself")
        return copy.deepcopy(router)
    cls = _check_router_arg(router, options)
    inherited = {k: v for k, v in {"seed": seed, "hidden": hidden}.items() if k in cls.inherits}
    return get_router(router, **{**inherited, **(options or {})})


def _validate_common(data, router: Router, heavy_budget, max_drop, tolerance, learned_fraction) -> tuple[str, float, int]:
    if heavy_budget is None and max_drop is None:
        heavy_budget = 0.5
    mode, target = check_target(heavy_budget, max_drop)
    tolerance = check_fraction("tolerance", tolerance, low_open=True, high_open=False)
    n_val = len(data.val)
    if n_val == 0:
        raise FlowpruneError("the calibration (val) split is empty; routing needs held-out labelled samples "
                             "(load the data with val_fraction > 0)")
    if len(data.test) == 0:
        raise FlowpruneError("the test split is empty; nothing to report routed accuracy on")
    n_cal = n_val
    if router.fit_on == "held_out":
        check_fraction("learned_fraction", learned_fraction, low_open=True)
        n_fit = int(math.floor(learned_fraction * n_val))
        n_cal = n_val - n_fit
        if n_fit < 1:
            raise FlowpruneError(f"learned_fraction={learned_fraction} leaves no val sample to train the {router.name} "
                                 f"router on ({n_val} val samples)")
    check_precision(n_cal, mode, target, tolerance)
    return mode, target, n_cal


def _random_baseline(outs: ExpertOutputs, usage: float, draws: int = 20, seed: int = 0) -> dict:
    """Accuracy of sending a random ``round(usage * n)`` subset to the heavy expert (mean/std of draws)."""
    n = len(outs)
    k = int(round(usage * n))
    g = torch.Generator().manual_seed(seed)
    lc, hc = outs.light_correct, outs.heavy_correct
    accs = []
    for _ in range(draws):
        esc = torch.zeros(n, dtype=torch.bool)
        esc[torch.randperm(n, generator=g)[:k]] = True
        accs.append(float(torch.where(esc, hc, lc).float().mean()))
    return {"mean": statistics.fmean(accs), "std": statistics.pstdev(accs), "draws": draws, "usage": k / n}


@torch.inference_mode()
def _route_split(cascade, dataset, batch_size: int = 256) -> dict:
    """Route a split for real through ``cascade.route`` (batched dispatch)."""
    x_all, y_all = dataset.tensors
    experts, preds = [], []
    for i in range(0, len(y_all), batch_size):
        o = cascade.route(x_all[i:i + batch_size])
        experts.append(o.expert.cpu())
        preds.append(o.predictions.cpu())
    e, p = torch.cat(experts), torch.cat(preds)
    cascade.router.reset()
    return {"heavy_usage": float(e.float().mean()), "accuracy": float((p == y_all).float().mean()), "n": len(y_all)}


def _chunked(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    n = (len(x) // batch_size) * batch_size or len(x)
    return [x[i:i + batch_size] for i in range(0, n, batch_size)]


@torch.inference_mode()
def _relative_time(cascade, x: torch.Tensor, thresholds: list[float], routers: list, batch_size: int,
                   rounds: int) -> list[float]:
    """Routed time / heavy-only time on the same real batches: the heavy expert and every
    ``(threshold, router)`` pair timed together in one harness call (:mod:`flowprune.timing`,
    interleaved rotated rounds, medians); one ratio of medians per pair."""
    from flowprune.timing import time_callables

    chunks = [c.to(cascade.input_device()) for c in _chunked(x, batch_size)]
    saved = cascade.router
    heavy = cascade.heavy.eval()

    def routed(tau, r):
        def run():
            cascade.router = r
            for c in chunks:
                cascade.route(c, threshold=tau)
        return run

    def heavy_pass():
        for c in chunks:
            heavy(c)

    fns = {"heavy": heavy_pass, **{f"t{j}": routed(tau, r) for j, (tau, r) in enumerate(zip(thresholds, routers))}}
    try:
        t = time_callables(fns, device=chunks[0].device, rounds=rounds, warmup=1, min_round_s=0.0)
    finally:
        cascade.router = saved
        saved.reset()
    return [t.median[f"t{j}"] / t.median["heavy"] for j in range(len(thresholds))]


def sweep(cascade, val_outs: ExpertOutputs, test_outs: ExpertOutputs, test_x: torch.Tensor, costs: dict, *,
          usages=SWEEP_USAGES, measure: bool = True, batch_size: int = 256, rounds: int = 2, seed: int = 0) -> dict:
    """Threshold sweep: for each target usage, a threshold from the **val** scores, then the test
    usage, accuracy, C_mix/C_cascade and (``measure``) the measured cost of routing the test
    inputs relative to the heavy expert alone. The random-routing curve is computed beside it
    (accuracy: mean of 20 random subsets; measured cost: a random router at the same usage).
    """
    router = cascade.router
    with torch.no_grad():
        vs = router(val_outs.light_logits, val_outs.feats)
        ts = router(test_outs.light_logits, test_outs.feats)
    router.reset()
    rows, rnd_rows, taus, rtaus = [], [], [], []
    for u in usages:
        tau = threshold_for_budget(vs, u)
        tu, ta = routed_accuracy(ts, tau, test_outs)
        rows.append({"target_usage": u, "threshold": tau if math.isfinite(tau) else str(tau), "heavy_usage": tu,
                     "accuracy": ta, "C_mix": c_mix(tu, costs["c_l"]),
                     "C_cascade": c_cascade(tu, costs["c_l"], costs["c_rest"])})
        rb = _random_baseline(test_outs, u, seed=seed)
        rnd_rows.append({"heavy_usage": rb["usage"], "accuracy": rb["mean"], "accuracy_std": rb["std"],
                         "C_mix": c_mix(rb["usage"], costs["c_l"]),
                         "C_cascade": c_cascade(rb["usage"], costs["c_l"], costs["c_rest"])})
        taus.append(tau)
        rtaus.append(1.0 - u if 0 < u < 1 else (math.inf if u == 0 else -math.inf))
    if measure:
        n = len(usages)
        rel = _relative_time(cascade, test_x, taus + rtaus, [router] * n + [RandomRouter(seed)] * n,
                             batch_size, rounds)
        for i in range(n):
            rows[i]["measured_cost"] = rel[i]
            rnd_rows[i]["measured_cost"] = rel[n + i]
    return {"routed": rows, "random": rnd_rows, "batch_size": batch_size, "rounds": rounds,
            "note": "thresholds from val quantiles; numbers on test; measured_cost = routed time / heavy-only "
                    "time on the same real test batches, interleaved, median over rounds"}


def plot_pareto(sweep_res: dict, results: dict, path: str | os.PathLike) -> Path | None:
    """Accuracy vs measured cost (left) and vs C_cascade from MACs (right); routed and random curves."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "measured_cost", f"measured time / heavy-only time (batch {sweep_res['batch_size']})"),
                           (axes[1], "C_cascade", "C_cascade (MACs, relative to heavy)")):
        for name, rows, style in (("routed (" + results["router"] + ")", sweep_res["routed"], "o-"),
                                  ("random routing", sweep_res["random"], "s--")):
            pts = [(r[key], 100 * r["accuracy"]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=name)
        t = results["test"]
        ax.axhline(100 * t["heavy_accuracy"], color="gray", lw=0.8, ls=":", label="heavy only")
        ax.axhline(100 * t["light_accuracy"], color="gray", lw=0.8, ls="-.", label="light only")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy %")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results.get('data', '')}: routing Pareto curve")
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def _fit_held_out(cascade, val_outs: ExpertOutputs, fraction: float, seed: int) -> tuple[ExpertOutputs, dict | None]:
    """A router with ``fit_on == "held_out"`` is fitted on a seeded ``fraction`` of val; returns the rest
    (the calibration outputs) and the fit record (None when the router fits nothing here)."""
    router = cascade.router
    if router.fit_on != "held_out":
        return val_outs, None
    perm = torch.randperm(len(val_outs), generator=torch.Generator().manual_seed(seed))
    n_fit = int(math.floor(fraction * len(val_outs)))
    fit_outs, cal_outs = val_outs.subset(perm[:n_fit]), val_outs.subset(perm[n_fit:])
    info = router.fit(fit_outs) or {}
    router.to(cascade.input_device())
    return cal_outs, {"fit_samples": n_fit, "calibration_samples": len(cal_outs), **info}


def _evaluate(cascade, data, *, mode: str, target: float, tolerance: float, learned_fraction: float, out_dir,
              measure: bool, do_sweep: bool, diagnostic: bool, seed: int, rounds: int, latency_samples: int,
              diagnostic_steps: int, extra: dict, sweep_usages=SWEEP_USAGES, sweep_rounds: int = 1) -> RouteResult:
    from flowprune.report import write_results
    from flowprune.route.diagnostics import signal_compression
    from flowprune.route.io import save_cascade

    val_outs = collect_outputs(cascade, data.val)
    test_outs = collect_outputs(cascade, data.test)
    cal_outs, fit_info = _fit_held_out(cascade, val_outs, learned_fraction, seed)
    kw = {"heavy_budget": target} if mode == "heavy_budget" else {"max_drop": target}
    cal = calibrate(cascade, cal_outs, tolerance=tolerance, **kw)
    routed = _route_split(cascade, data.test)
    with torch.no_grad():
        test_scores = cascade.router(test_outs.light_logits, test_outs.feats)
    cascade.router.reset()
    light_acc = float(test_outs.light_correct.float().mean())
    heavy_acc = float(test_outs.heavy_correct.float().mean())
    rb = _random_baseline(test_outs, routed["heavy_usage"], seed=seed)
    costs = mac_costs(cascade)
    p = routed["heavy_usage"]
    costs.update({"heavy_usage": p, "C_mix": c_mix(p, costs["c_l"]), "C_cascade": c_cascade(p, costs["c_l"], costs["c_rest"])})
    test = {"accuracy": routed["accuracy"], "heavy_usage": p, "n": routed["n"], "light_accuracy": light_acc,
            "heavy_accuracy": heavy_acc, "random_accuracy_same_usage": rb["mean"], "random_accuracy_std": rb["std"],
            "router_auroc_light_wrong": auroc(test_scores, ~test_outs.light_correct),
            "usage_gap_vs_target": (p - target) if mode == "heavy_budget" else None,
            "accuracy_gap_vs_target": routed["accuracy"] - (heavy_acc - target) if mode == "max_drop" else None,
            "usage_gap_vs_calibration": p - cal.calib_heavy_usage,
            "accuracy_gap_vs_calibration": routed["accuracy"] - cal.calib_accuracy}
    results: dict = {"kind": cascade.kind, "router": cascade.router.name, "data": data.name,
                     "splits": data.sizes(), "calibration": cal.to_dict(), "test": test, "cost": costs,
                     "seed": seed, **extra}
    # flat headline keys the issue names
    results.update({"accuracy": test["accuracy"], "heavy_usage": p, "C_mix": costs["C_mix"],
                    "C_cascade": costs["C_cascade"], "threshold": cal.to_dict()["threshold"]})
    if fit_info:
        results[f"{cascade.router.name}_router"] = fit_info
    test_x = data.test.tensors[0]
    if do_sweep:
        results["sweep"] = sweep(cascade, val_outs if fit_info is None else cal_outs, test_outs, test_x, costs,
                                 usages=sweep_usages, measure=measure, rounds=sweep_rounds, seed=seed)
    if measure:
        sp = measure_speed(cascade, test_x, rounds=rounds, latency_samples=latency_samples)
        results["speed"] = sp
        results["overhead"] = profile_overhead(cascade, test_x[:256])
        results.update({"latency_ms_b1": {k: sp[k]["latency_ms_b1"] for k in ("heavy", "light", "routed")},
                        "throughput_b64": {k: sp[k]["throughput_b64"] for k in ("heavy", "light", "routed")},
                        "throughput_b256": {k: sp[k]["throughput_b256"] for k in ("heavy", "light", "routed")}})
        results.update(routed_speed_summary(sp, costs))
    if diagnostic:
        results["signal_compression"] = signal_compression(cascade.heavy, data, early_steps=diagnostic_steps, seed=seed)
    res = RouteResult(cascade=cascade, calibration=cal, results=results)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if do_sweep:
            pp = plot_pareto(results["sweep"], results, out / "pareto.png")
            results["pareto_plot"] = str(pp) if pp else None
        save_cascade(cascade, out / "cascade", metadata={"data": data.name, "calibration": cal.to_dict(),
                                                         "test_accuracy": test["accuracy"], "heavy_usage": p})
        results["saved_cascade"] = str(out / "cascade")
        write_results(out / "results.json", results)
    return res


@dataclass
class RouteConfig(ProcedureConfig):
    """The options of :func:`route_experts` (see its docstring); ``RouteConfig.resolve(config, overrides)``."""

    router: Any = "confidence"
    heavy_budget: float | None = None
    max_drop: float | None = None
    tolerance: float = 0.05
    router_kwargs: dict | None = None
    learned_fraction: float = 0.5
    learned_hidden: int = 32
    out_dir: Any = None
    measure: bool = True
    sweep: bool = True
    diagnostic: bool = True
    diagnostic_steps: int = 20
    rounds: int = 3
    latency_samples: int = 100
    sweep_usages: Any = SWEEP_USAGES
    sweep_rounds: int = 1
    seed: int = 0
    device: Any = None

    def target(self) -> tuple[str, float]:
        """``(mode, value)``: the calibration target (neither given: ``heavy_budget=0.5``)."""
        hb = 0.5 if self.heavy_budget is None and self.max_drop is None else self.heavy_budget
        return check_target(hb, self.max_drop)

    def validate(self) -> RouteConfig:
        _check_router_arg(self.router, self.router_kwargs)
        self.target()
        check_fraction("tolerance", self.tolerance, low_open=True, high_open=False)
        check_fraction("learned_fraction", self.learned_fraction, low_open=True, high_open=True)
        check_positive_int("learned_hidden", self.learned_hidden)
        check_positive_int("rounds", self.rounds)
        check_positive_int("latency_samples", self.latency_samples)
        return self


def route_experts(light: nn.Module, heavy: nn.Module, data, config: RouteConfig | dict | None = None,
                  **overrides) -> RouteResult:
    """Put ``light`` and ``heavy`` behind a calibrated router, measure it, and optionally save it.

    ``route_experts(light, heavy, data, config=None, **overrides)``: the options are the fields of
    :class:`RouteConfig`, given as a config, as keywords, or both (keywords win).

    The experts are copied (never changed). Exactly one of ``heavy_budget`` (fraction of inputs
    sent to the heavy expert) and ``max_drop`` (accuracy drop allowed versus the heavy expert on
    the val split) is the calibration target; neither means ``heavy_budget=0.5``.

    Args:
        light, heavy: trained models with the same input shape and classes.
        data: a :class:`flowprune.data.DataSplits`; val calibrates, test reports.
        router: a registered name (``flowprune.list_routers()``: ``confidence`` (default), ``entropy``,
            ``l1``, ``learned``, ``random`` and any ``@register_router``) or a :class:`Router` instance.
        tolerance: accepted standard error of the calibrated usage/accuracy (see calibrate.py).
        router_kwargs: the router's options (``{"direction": "low_is_hard"}`` for l1, ``{"seed": 1}``...).
        learned_fraction: share of val that fits a router with ``fit_on == "held_out"`` (learned); the
            rest calibrates. ``learned_hidden``: the learned router's hidden units (unless in router_kwargs).
        out_dir: writes ``results.json``, ``pareto.png`` and ``cascade/`` (load with ``load_cascade``).
        measure: time heavy/light/routed (batch 1, 64, 256) and the routing overhead.
        sweep: threshold sweep -> Pareto curve with the random-routing curve.
        diagnostic: the AGF signal-compression diagnostic (trains a fresh heavy copy ``diagnostic_steps`` steps).
        rounds: timing rounds of the speed measurement (medians); ``sweep_rounds`` those of the sweep.
        sweep_usages: the target heavy usages of the sweep (thresholds from val quantiles).
        device: where the cascade runs (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``; default: the
            heavy expert's device); the experts are copied there.

    Returns:
        :class:`RouteResult` (``.cascade`` = ``.model``, ``.calibration``, ``.results``, ``.summary()``,
        ``.to_dict()``).

    Raises:
        FlowpruneError: unknown router or router option, experts that do not match, a target outside
            [0, 1], empty or too small calibration split -- before any work.
    """
    cfg = RouteConfig.resolve(config, overrides)
    r = build_router(cfg.router, cfg.router_kwargs, seed=cfg.seed, hidden=cfg.learned_hidden)
    mode, target, _ = _validate_common(data, r, cfg.heavy_budget, cfg.max_drop, cfg.tolerance, cfg.learned_fraction)
    shape, nc = check_experts(light, heavy)
    if tuple(shape) != tuple(data.input_shape):
        raise FlowpruneError(f"the experts take inputs of shape {shape} but data set {data.name!r} has "
                             f"{tuple(data.input_shape)}")
    if nc < data.num_classes:
        raise FlowpruneError(f"the experts have {nc} classes but data set {data.name!r} has {data.num_classes}")
    from flowprune.device import resolve_device

    dev = resolve_device(cfg.device, heavy)
    cascade = Cascade(copy.deepcopy(light).eval(), copy.deepcopy(heavy).eval(), r, math.inf).to(dev)
    return _evaluate(cascade, data, mode=mode, target=target, tolerance=cfg.tolerance,
                     learned_fraction=cfg.learned_fraction, out_dir=cfg.out_dir, measure=cfg.measure,
                     do_sweep=cfg.sweep, diagnostic=cfg.diagnostic, seed=cfg.seed, rounds=cfg.rounds,
                     latency_samples=cfg.latency_samples, diagnostic_steps=cfg.diagnostic_steps, extra={},
                     sweep_usages=cfg.sweep_usages, sweep_rounds=cfg.sweep_rounds)


def route_early_exit(model: nn.Module, data, *, stage: str | None = None, router: str | Router = "confidence",
                     heavy_budget: float | None = None, max_drop: float | None = None, tolerance: float = 0.05,
                     router_kwargs: dict | None = None, head_epochs: int = 10, learned_fraction: float = 0.5,
                     learned_hidden: int = 32, out_dir: str | os.PathLike | None = None, measure: bool = True,
                     sweep: bool = True, diagnostic: bool = False, rounds: int = 3, latency_samples: int = 100,
                     seed: int = 0) -> RouteResult:
    """The early-exit variant of :func:`route_experts`: one network (copied) with an exit head after
    module ``stage`` (any name in ``model.named_modules()``; default
    :func:`~flowprune.route.cascade.default_exit_stage`: ``layer1`` when there is one, else the
    middle of the main top-level Sequential), attached by a hook, so flowprune, torchvision and timm
    models all work. The head is trained on ``data.train`` with the backbone frozen; escalated
    samples continue from the exit's activation."""
    from flowprune.route.cascade import build_early_exit

    r = build_router(router, router_kwargs, seed=seed, hidden=learned_hidden)
    mode, target, _ = _validate_common(data, r, heavy_budget, max_drop, tolerance, learned_fraction)
    cascade = build_early_exit(model, data, stage=stage, router=r, epochs=head_epochs, seed=seed)
    return _evaluate(cascade, data, mode=mode, target=target, tolerance=tolerance, learned_fraction=learned_fraction,
                     out_dir=out_dir, measure=measure, do_sweep=sweep,
                     diagnostic=diagnostic, seed=seed, rounds=rounds, latency_samples=latency_samples,
                     diagnostic_steps=20, extra={"exit_stage": cascade.stage})
