"""What moves the demo's routed throughput (issue 21): light-expert widths and the router's calibration.

    python -m benchmarks.bench_demo_speed --dense runs/demo/dense            # idle run
    python -m benchmarks.bench_demo_speed --dense runs/demo/dense --busy     # and with one busy core beside it

The heavy expert is the demo's dense ResNet-20 on mnist5k (``--dense``: a saved model, e.g.
``flowprune demo``'s ``OUT/dense``). Light experts are made exactly as the demo makes them (AGF to
``--target-macs`` fewer MACs, 2 steps, 1 fine-tune epoch between, ``--finetune-epochs`` after),
once with global widths (the library default) and once with per-layer widths (cached under
``--cache``). Then:

1. heavy and both light experts are timed **together** (one interleaved harness call,
   :func:`flowprune.timing.time_models`) at batch 256 on real test images: the light experts'
   measured speed-up over the heavy one, next to their MACs reduction;
2. each light expert is routed with the confidence router calibrated on val two ways: a 50 %
   heavy budget (the demo's old default) and ``max_drop=0`` (the cheapest threshold that keeps the
   heavy expert's val accuracy, the demo's new default); heavy, light and routed are timed together
   per batch size by :func:`flowprune.route.cost.measure_speed` (physically impossible routed
   figures are refused).

With ``--busy`` every measurement is repeated with a process spinning on one core beside it.
Writes ``OUT/demo_speed.json`` and ``OUT/demo_speed.md`` (default ``docs/results``; the table, with
this command in its header).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import torch

from flowprune.data import load_dataset
from flowprune.io import load, save
from flowprune.measure import accuracy, count_macs_params
from flowprune.pruning.structural import prune
from flowprune.report import format_table, write_results
from flowprune.route.api import route_experts
from flowprune.timing import time_models

BUDGETS = ("global", "layer")
CALIBRATIONS = {"budget 0.5": {"heavy_budget": 0.5}, "max_drop 0": {"max_drop": 0.0},
                "budget 0.25": {"heavy_budget": 0.25}}


def _spin(stop) -> None:  # one busy core: a pure-Python loop, no threads
    x = 0
    while not stop.is_set():
        x = (x * 1103515245 + 12345) % 2147483648


def light_expert(heavy, data, budget: str, args, out: Path):
    d = out / f"light_{budget}"
    if (d / "model.json").exists():
        return load(d)
    pr = prune(heavy, data, method="agf", target_macs=args.target_macs, steps=2, finetune_epochs=1,
               final_finetune_epochs=args.finetune_epochs, seed=args.seed, budget=budget, progress=False)
    save(pr.model, d, metadata={"stage": "pruned", "method": "agf", **pr.to_dict()})
    return load(d)


def measure(heavy, lights: dict, data, args) -> dict:
    x = data.test.tensors[0][:256]
    t = time_models({"heavy": heavy, **{f"light_{k}": m for k, m in lights.items()}}, x, rounds=args.rounds,
                    min_round_s=0.05)
    res = {"experts_b256": t.to_dict(), "routes": {}}
    for budget, light in lights.items():
        for cal in args.calibrations.split(","):
            kw = CALIBRATIONS[cal]
            rr = route_experts(light, heavy, data, router="confidence", sweep=False, diagnostic=False,
                               rounds=args.rounds, latency_samples=50, seed=args.seed, **kw)
            r = rr.results
            res["routes"][f"{budget} / {cal}"] = {
                "test": r["test"], "cost": r["cost"], "speed": r["speed"], "overhead": r["overhead"],
                "speedup_b1": r["speedup_b1"], "speedup_b64": r["speedup_b64"], "speedup_b256": r["speedup_b256"]}
    return res


CAL_GRID = ({"max_drop": 0.0}, {"max_drop": 0.002}, {"max_drop": 0.004}, {"max_drop": 0.01},
            {"heavy_budget": 0.2}, {"heavy_budget": 0.25}, {"heavy_budget": 0.3}, {"heavy_budget": 0.5})


def calibration_rows(heavy, lights: dict, data) -> list[dict]:
    """No timing: each calibration's heavy usage and accuracy on val (where it is decided) and on test."""
    import math

    from flowprune.route.calibrate import calibrate, collect_outputs, routed_accuracy
    from flowprune.route.cascade import Cascade
    from flowprune.route.routers import get_router

    rows = []
    for budget, light in lights.items():
        c = Cascade(light, heavy, get_router("confidence"), math.inf)
        val, test = collect_outputs(c, data.val), collect_outputs(c, data.test)
        with torch.no_grad():
            st = c.router(test.light_logits, None)
        for kw in CAL_GRID:
            cal = calibrate(c, val, tolerance=0.05, **kw)
            u, a = routed_accuracy(st, cal.threshold, test)
            rows.append({"light widths": budget, "calibration": ", ".join(f"{k} {v}" for k, v in kw.items()),
                         "val heavy acc %": 100 * float(val.heavy_correct.float().mean()),
                         "val usage %": 100 * cal.calib_heavy_usage, "val routed acc %": 100 * cal.calib_accuracy,
                         "test heavy acc %": 100 * float(test.heavy_correct.float().mean()),
                         "test usage %": 100 * u, "test routed acc %": 100 * a})
    return rows


def rows_of(res: dict, lights: dict, heavy, data, cond: str) -> tuple[list[dict], list[dict]]:
    t = res["experts_b256"]
    hm = count_macs_params(heavy, data.input_shape)[0]
    erows = [{"load": cond, "light widths": k, "widths": " ".join(str(w) for w in (getattr(m, "flowprune_metadata", {}).get("widths") or {}).values()),
              "MACs x": hm / count_macs_params(m, data.input_shape)[0],
              "measured x heavy b256": t["median"]["heavy"] / t["median"][f"light_{k}"]} for k, m in lights.items()]
    rrows = []
    for key, r in res["routes"].items():
        te, sp = r["test"], r["speed"]
        rrows.append({"load": cond, "light / calibration": key, "heavy acc %": 100 * te["heavy_accuracy"],
                      "routed acc %": 100 * te["accuracy"], "heavy usage %": 100 * te["heavy_usage"],
                      "C_cascade": r["cost"]["C_cascade"],
                      "light x heavy b256": sp["light"]["throughput_b256"] / sp["heavy"]["throughput_b256"],
                      "routed x heavy b64": r["speedup_b64"], "routed x heavy b256": r["speedup_b256"],
                      "routed x heavy b1": r["speedup_b1"],
                      "goal met": bool(r["speedup_b256"] is not None and r["speedup_b256"] >= 2.0
                                       and te["accuracy"] >= te["heavy_accuracy"])})
    return erows, rrows


def markdown(results: dict) -> str:
    """OUT/NAME.md from the results payload: the calibration table (``--calibration-only``) or the
    expert and routed tables."""
    if "calibration_rows" in results:
        n = results["split_sizes"]
        return (f"Produced by `{results['command']}` (no timing; confidence router, thresholds decided on the "
                f"{n['val']}-sample val split, checked on the {n['test']}-sample test split)\n\n"
                + format_table(results["calibration_rows"], title="Heavy usage and accuracy of each calibration")
                + "\n")
    return "\n\n".join([f"Produced by `{results['command']}` ({results['threads']} thread(s); test accuracy: "
                         + ", ".join(f"{k} {100 * v:.1f} %" for k, v in results["accuracy"].items()) + ")",
                         format_table(results["expert_rows"], title="Light experts vs heavy, timed together at batch 256"),
                         format_table(results["route_rows"],
                                      title="Routed (confidence router), heavy/light/routed timed together")]) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dense", required=True, help="the demo's dense model directory (OUT/dense)")
    ap.add_argument("--data", default="mnist5k")
    ap.add_argument("--target-macs", default="8x")
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--busy", action="store_true", help="also measure with one busy core beside it")
    ap.add_argument("--budgets", default=",".join(BUDGETS), help="light-expert width allocations (global,layer)")
    ap.add_argument("--calibrations", default=",".join(CALIBRATIONS),
                    help=f"router calibrations, comma-separated from: {', '.join(CALIBRATIONS)}")
    ap.add_argument("--name", default="demo_speed", help="results file stem (OUT/NAME.json, OUT/NAME.md)")
    ap.add_argument("--calibration-only", action="store_true",
                    help="no timing: each calibration's heavy usage and accuracy on val and test")
    ap.add_argument("--cache", default="runs/bench/demo_speed", help="where the light experts are kept")
    ap.add_argument("--out", default="docs/results", help="writes demo_speed.json and demo_speed.md here")
    args = ap.parse_args(argv)
    out, cache = Path(args.out), Path(args.cache)
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    data = load_dataset(args.data, seed=args.seed)
    heavy = load(args.dense).eval()
    lights = {b: light_expert(heavy, data, b, args, cache).eval() for b in args.budgets.split(",")}
    acc = {"heavy": accuracy(heavy, [(data.test.tensors[0], data.test.tensors[1])]),
           **{f"light_{b}": accuracy(m, [(data.test.tensors[0], data.test.tensors[1])]) for b, m in lights.items()}}
    results = {"command": "python -m benchmarks.bench_demo_speed " + " ".join(argv or sys.argv[1:]),
               "threads": torch.get_num_threads(), "accuracy": acc, "runs": {}}
    if args.calibration_only:
        results["split_sizes"] = {"val": len(data.val), "test": len(data.test)}
        results["calibration_rows"] = calibration_rows(heavy, lights, data)
        write_results(out / f"{args.name}.json", results)
        md = markdown(results)
        (out / f"{args.name}.md").write_text(md)
        print(md)
        return 0
    conds = ["idle"] + (["one busy core"] if args.busy else [])
    for cond in conds:
        stop, proc = None, None
        if cond != "idle":
            stop = mp.Event()
            proc = mp.Process(target=_spin, args=(stop,), daemon=True)
            proc.start()
        t0 = time.perf_counter()
        try:
            results["runs"][cond] = measure(heavy, lights, data, args)
        finally:
            if proc is not None:
                stop.set()
                proc.join(5)
        results["runs"][cond]["seconds"] = time.perf_counter() - t0
        results["runs"][cond]["loadavg_at_end"] = os.getloadavg()
    erows, rrows = [], []
    for cond in conds:
        e, r = rows_of(results["runs"][cond], lights, heavy, data, cond)
        erows += e
        rrows += r
    results["expert_rows"], results["route_rows"] = erows, rrows
    write_results(out / f"{args.name}.json", results)
    md = markdown(results)
    (out / f"{args.name}.md").write_text(md)
    print(md)
    print(json.dumps({k: results["runs"][k]["loadavg_at_end"] for k in conds}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
