"""Benchmark: decoupled routing (AGF-pruned light expert + full heavy expert), docs/methods.md §2.

    python -m benchmarks.bench_route            # full run (mnist5k/resnet20, mnist1d/cnn1d)
    python -m benchmarks.bench_route --quick    # tiny smoke run (fewer epochs, no speed)

For each setup: train the heavy expert (cached under runs/bench/), prune it with AGF to
``--target-macs`` fewer MACs with a short final fine-tune (cached), then route with every router at
a 50% heavy-usage budget and with the confidence router at ``max_drop=0`` (routed accuracy >= heavy
accuracy on val), measure latency/throughput/overhead, sweep the threshold (Pareto curve with the
random-routing curve), run the AGF signal-compression diagnostic and an early-exit variant.
Prints Markdown tables headed by the command and writes them to docs/results/route.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

from flowprune.data import load_dataset
from flowprune.io import load, save
from flowprune.measure import accuracy, count_macs_params
from flowprune.models import build_model
from flowprune.report import format_table
from flowprune.route import route_early_exit, route_experts
from flowprune.train import TrainConfig, fit

SETUPS = {
    "mnist5k": {"model": "resnet20", "epochs": 6, "lr": 0.05, "target": 8.0, "ft": 4},
    "mnist1d": {"model": "cnn1d", "epochs": 15, "lr": 0.05, "target": 8.0, "ft": 8},
}
ROUTER_LIST = ("confidence", "entropy", "l1", "learned", "random")
SWEEP = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)


def heavy_expert(name: str, cfg: dict, data, runs: Path, quick: bool):
    d = runs / f"{name}_{cfg['model']}{'_quick' if quick else ''}"
    if (d / "model.safetensors").exists() and (d / "model.json").exists():
        return load(d)
    torch.manual_seed(0)
    m = build_model(cfg["model"], data.input_shape, data.num_classes)
    fit(m, data, TrainConfig(epochs=1 if quick else cfg["epochs"], lr=cfg["lr"]), checkpoint_dir=d, progress=False)
    save(m, d, metadata={"stage": "dense", "data": name})
    return m.eval()


def light_expert(name: str, cfg: dict, heavy, data, runs: Path, quick: bool, target: float, ft: int):
    """AGF-pruned light expert (cached); falls back to a Torch-Pruning magnitude stand-in if the
    AGF pruner cannot be imported. Returns (model, how it was made)."""
    tag = f"{name}_{cfg['model']}_agf{target:g}x_ft{ft}{'_quick' if quick else ''}"
    d = runs / tag
    if (d / "model.safetensors").exists():
        m = load(d)
        return m, m.flowprune_metadata.get("light_method", "agf")
    try:
        from flowprune.pruning.structural import prune
    except ImportError:
        prune = None
    if prune is not None:
        # oneDNN's conv backward aborts ("double free or corruption") on some pruned ResNet-20 widths with
        # torch 2.14.1 on this CPU; the fine-tune runs with oneDNN off (forward/inference is unaffected).
        with torch.backends.mkldnn.flags(enabled=False):
            res = prune(heavy, data, method="agf", target_macs=target, final_finetune_epochs=ft,
                        checkpoint_dir=runs / (tag + "_ckpt"), progress=False)
        m, how = res.model, f"agf (flowprune.pruning.structural.prune, target {target:g}x, {ft} ft epochs)"
    else:  # pragma: no cover - stand-in while the AGF pruner is missing
        import copy

        import torch_pruning as tp

        m = copy.deepcopy(heavy)
        ex = torch.randn(1, *data.input_shape)
        p = tp.pruner.MagnitudePruner(m, ex, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=1 - target ** -0.5, ignored_layers=[m.fc])
        p.step()
        fit(m, data, TrainConfig(epochs=ft, lr=0.01), progress=False)
        how = f"stand-in: torch-pruning L1 magnitude, uniform ratio {1 - target ** -0.5:.2f}, {ft} ft epochs"
    save(m, d, metadata={"light_method": how, "data": name})
    return m.eval(), how


def pct(v):
    return None if v is None else 100 * v


def run_setup(name: str, cfg: dict, args, runs: Path) -> dict:
    data = load_dataset(name, seed=0)
    t0 = time.perf_counter()
    heavy = heavy_expert(name, cfg, data, runs, args.quick)
    light, how = light_expert(name, cfg, heavy, data, runs, args.quick, args.target_macs or cfg["target"],
                              0 if args.quick else cfg["ft"])
    prep_s = time.perf_counter() - t0
    from flowprune.data import make_loader

    test = make_loader(data.test, 512)
    hm, _ = count_macs_params(heavy)
    lm, _ = count_macs_params(light)
    experts = {"heavy": {"model": cfg["model"], "acc": accuracy(heavy, test), "macs": hm},
               "light": {"model": how, "acc": accuracy(light, test), "macs": lm, "reduction": hm / lm}}
    out = runs / "route" / name
    results: dict = {"experts": experts, "prep_seconds": prep_s, "routers": {}}
    measure = not args.quick
    for r in ROUTER_LIST:
        t = time.perf_counter()
        res = route_experts(light, heavy, data, router=r, heavy_budget=0.5, out_dir=out / f"{r}_b50",
                            measure=measure and r == "confidence", sweep=r == "confidence",
                            diagnostic=r == "confidence" and not args.quick, sweep_usages=SWEEP, rounds=3)
        results["routers"][f"{r}@0.5"] = res.results
        print(f"  {name} {r}@0.5: {time.perf_counter() - t:.1f}s", file=sys.stderr)
    res = route_experts(light, heavy, data, router="confidence", max_drop=0.0, out_dir=out / "confidence_drop0",
                        measure=measure, sweep=False, diagnostic=False, rounds=3)
    results["routers"]["confidence@drop0"] = res.results
    ee = route_early_exit(heavy, data, router="confidence", max_drop=0.0, out_dir=out / "early_exit_drop0",
                          measure=False, sweep=False, head_epochs=3 if args.quick else 10)
    results["early_exit"] = ee.results
    return results


def tables(name: str, res: dict) -> str:
    ex = res["experts"]
    parts = [f"### {name}",
             format_table([{"expert": "heavy", "model": ex["heavy"]["model"], "test acc %": pct(ex["heavy"]["acc"]),
                            "MACs": ex["heavy"]["macs"], "MACs reduction": 1.0},
                           {"expert": "light", "model": ex["light"]["model"], "test acc %": pct(ex["light"]["acc"]),
                            "MACs": ex["light"]["macs"], "MACs reduction": ex["light"]["reduction"]}],
                          title="Experts")]
    rows = []
    for key, r in list(res["routers"].items()) + [("early-exit confidence@drop0", res["early_exit"])]:
        t, c = r["test"], r["cost"]
        rows.append({"router@target": key, "calib usage %": pct(r["calibration"]["calib_heavy_usage"]),
                     "test usage %": pct(t["heavy_usage"]), "routed acc %": pct(t["accuracy"]),
                     "heavy acc %": pct(t["heavy_accuracy"]), "light acc %": pct(t["light_accuracy"]),
                     "random same usage %": pct(t["random_accuracy_same_usage"]),
                     "AUROC(light wrong)": t["router_auroc_light_wrong"], "c_l": c["c_l"], "C_mix": c["C_mix"],
                     "C_cascade": c["C_cascade"]})
    parts.append(format_table(rows, title="Routers (threshold calibrated on val, numbers on test)", digits=3))
    srows = []
    for key in ("confidence@0.5", "confidence@drop0"):
        sp = res["routers"][key].get("speed")
        if not sp:
            continue
        for who in ("heavy", "light", "routed"):
            thr = sp[who]["throughput_b256"]
            srows.append({"run": key, "model": who, "latency b1 ms (mean over samples)": sp[who]["latency_ms_b1"],
                          "samples/s b64": sp[who]["throughput_b64"], "samples/s b256": thr,
                          "speedup b256 vs heavy": None if thr is None else thr / sp["heavy"]["throughput_b256"]})
    if srows:
        parts.append(format_table(srows, title="Measured speed (real test batches, 1 thread; heavy, light and routed "
                                               "timed together by flowprune.timing, medians of interleaved rounds; "
                                               "None = refused as physically impossible)"))
    orow = []
    for key in ("confidence@0.5", "confidence@drop0"):
        o = res["routers"][key].get("overhead")
        if o:
            orow.append({"run": key, "light ms": 1e3 * o["light_plain"], "router ms": 1e3 * o["router"],
                         "gather ms": 1e3 * o["gather"], "scatter ms": 1e3 * o["scatter"],
                         "heavy sub-batch ms": 1e3 * o["heavy_sub"], "overhead % of light": 100 * o["overhead_frac"]})
    if orow:
        parts.append(format_table(orow, title="Routing overhead at batch 256", digits=3))
    sw = res["routers"]["confidence@0.5"].get("sweep")
    if sw:
        rows = []
        for a, b in zip(sw["routed"], sw["random"]):
            rows.append({"target usage": a["target_usage"], "usage %": pct(a["heavy_usage"]),
                         "routed acc %": pct(a["accuracy"]), "random acc %": pct(b["accuracy"]),
                         "C_cascade": a["C_cascade"], "measured cost": a.get("measured_cost"),
                         "random measured cost": b.get("measured_cost")})
        parts.append(format_table(rows, title="Threshold sweep, confidence router (measured cost = routed time / "
                                  "heavy-only time, batch 256)", digits=3))
    sc = res["routers"]["confidence@0.5"].get("signal_compression")
    if sc:
        parts.append(format_table([{"checkpoint": f"early ({sc['early_steps']} SGD steps)",
                                    "p99/p1": sc["early"]["p99_p1"], "max/min": sc["early"]["max_min"]},
                                   {"checkpoint": "converged (heavy expert)", "p99/p1": sc["converged"]["p99_p1"],
                                    "max/min": sc["converged"]["max_min"]}],
                                  title=f"AGF per-sample signal dynamic range ({sc['num_samples']} val samples)"))
    l1 = res["routers"]["l1@0.5"]["calibration"]["extra"].get("l1")
    if l1:
        parts.append(f"l1 router direction chosen on val: **{l1['direction']}** (AUROC of +norm for light mistakes "
                     f"{l1['auroc_high_is_hard']:.3f}; mean feature norm correct {l1['mean_norm_correct']:.3f}, "
                     f"wrong {l1['mean_norm_wrong']:.3f})")
    return "\n\n".join(parts)


def goals(name: str, res: dict) -> list[str]:
    out = []
    d0 = res["routers"]["confidence@drop0"]
    t = d0["test"]
    ok = t["accuracy"] >= t["heavy_accuracy"] and t["heavy_usage"] <= 0.55
    out.append(f"{name}: routed acc >= heavy with <= 55% heavy usage (confidence, max_drop=0): "
               f"{'met' if ok else 'NOT met'} -- routed {100 * t['accuracy']:.1f}% vs heavy "
               f"{100 * t['heavy_accuracy']:.1f}% at {100 * t['heavy_usage']:.1f}% heavy usage")
    b = res["routers"]["confidence@0.5"]["test"]
    gap = b["accuracy"] - b["random_accuracy_same_usage"]
    out.append(f"{name}: above random routing at the same usage (budget 0.5): "
               f"{'met' if gap > 2 * max(b['random_accuracy_std'], 0.002) else 'NOT met'} -- "
               f"{100 * b['accuracy']:.1f}% vs random {100 * b['random_accuracy_same_usage']:.1f}% "
               f"(std {100 * b['random_accuracy_std']:.2f}) at {100 * b['heavy_usage']:.1f}%")
    for key in ("confidence@drop0", "confidence@0.5"):
        sp = res["routers"][key].get("speed")
        if sp and sp["routed_speedup_b256"] is not None:
            s = sp["routed_speedup_b256"]
            out.append(f"{name}: routed throughput b256 >= 1.3x heavy ({key}): {'met' if s >= 1.3 else 'NOT met'} "
                       f"-- {s:.2f}x at {100 * sp['routed']['heavy_usage']:.1f}% heavy usage")
        o = res["routers"][key].get("overhead")
        if o:
            out.append(f"{name}: routing overhead < 5% of light time at b256 ({key}): "
                       f"{'met' if o['overhead_frac'] < 0.05 else 'NOT met'} -- {100 * o['overhead_frac']:.2f}%")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run: 1 epoch heavy, no fine-tune, no timing")
    p.add_argument("--data", nargs="*", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument("--target-macs", type=float, default=None, help="override the MACs reduction of the light expert")
    p.add_argument("--runs", default="runs/bench", help="cache directory for trained/pruned models")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--md", default=None, help="write the Markdown here (default docs/results/route.md; not in --quick)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cmd = "python -m benchmarks.bench_route " + " ".join(argv if argv is not None else sys.argv[1:])
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    all_res, md, goal_lines = {}, [f"`{cmd.strip()}`", f"date: {datetime.date.today().isoformat()}, torch "
                                   f"{torch.__version__}, {args.threads} thread(s)"], []
    for name in args.data:
        res = run_setup(name, SETUPS[name], args, runs)
        all_res[name] = res
        md.append(tables(name, res))
        goal_lines += goals(name, res)
        print(tables(name, res), flush=True)
    wall = time.perf_counter() - t0
    md.append("### Goals\n\n" + "\n".join(f"- {g}" for g in goal_lines) + f"\n\nwall time: {wall:.0f} s")
    print("\n### Goals\n" + "\n".join(f"- {g}" for g in goal_lines) + f"\nwall time: {wall:.0f} s")
    (runs / "route").mkdir(parents=True, exist_ok=True)
    (runs / "route" / "bench_results.json").write_text(json.dumps(all_res, indent=1, default=str))
    if not args.quick:
        path = Path(args.md or "docs/results/route.md")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("## Measured (benchmark output)\n\n" + "\n\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
