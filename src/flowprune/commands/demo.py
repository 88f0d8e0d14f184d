"""``flowprune demo``: the whole flow on the embedded MNIST digits, in a few minutes on 2 cores.

train a dense ResNet-20 (heavy expert) -> AGF-prune it to ``--target-macs`` fewer MACs with
fine-tuning (light expert) -> put both behind a confidence router calibrated on the val split (by default to escalate 25 %
of inputs; ``--max-drop`` calibrates to an accuracy tolerance instead) -> print one summary table and write
``OUT/summary.json``. Latency and throughput of heavy, light and routed in the table come from
one interleaved harness call per batch size (:mod:`flowprune.timing`, via
:func:`flowprune.route.cost.measure_speed`); a physically impossible routed figure is refused. Every step writes its own directory
under ``OUT`` and a rerun resumes from what is already there.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from flowprune.commands._common import check_out_dir

NAME = "demo"
HEAVY_BUDGET = 0.25  # on val, routed accuracy is flat from ~11 % to ~49 % usage (docs/results/demo_calibration.md)
LIGHT_BUDGET = "global"  # measured: per-layer widths were no faster here and less accurate (docs/speed.md)
HELP = "train -> AGF prune -> route on the embedded MNIST digits and print a summary table"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--data", default="mnist5k")
    p.add_argument("--epochs", type=int, default=10, help="dense training epochs (default 10)")
    p.add_argument("--target-macs", default="8x", help="MACs reduction of the light expert (default 8x)")
    p.add_argument("--finetune-epochs", type=int, default=3, help="fine-tune epochs after pruning (default 3)")
    p.add_argument("--light-budget", choices=("layer", "global"), default=LIGHT_BUDGET,
                   help=f"how the light expert's widths are allocated (default {LIGHT_BUDGET}; docs/speed.md)")
    p.add_argument("--heavy-budget", type=float, default=None,
                   help=f"share of inputs the router escalates, calibrated on val (default {HEAVY_BUDGET})")
    p.add_argument("--max-drop", type=float, default=None,
                   help="calibrate instead to at most this accuracy drop vs the heavy expert on val (0: the "
                        "cheapest threshold that keeps the heavy val accuracy)")
    p.add_argument("--speed-rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from flowprune.data import load_dataset
    from flowprune.errors import FlowpruneError

    if args.heavy_budget is not None and args.max_drop is not None:
        raise FlowpruneError("give at most one of --heavy-budget and --max-drop")
    out = check_out_dir(args.out)
    t_start = time.perf_counter()
    data = load_dataset(args.data, seed=args.seed)
    heavy, t_train = _dense(args, data, out)
    light, t_prune = _light(args, data, heavy, out)
    kw = {"max_drop": args.max_drop} if args.max_drop is not None else {
        "heavy_budget": HEAVY_BUDGET if args.heavy_budget is None else args.heavy_budget}
    target = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in kw.items())
    print(f"[3/3] routing: confidence router calibrated on val for {target}")
    t0 = time.perf_counter()
    from flowprune.route.api import route_experts

    rr = route_experts(light, heavy, data, router="confidence", out_dir=out / "routed", diagnostic=False, sweep=True,
                       rounds=args.speed_rounds, latency_samples=50, **kw)
    t_route = time.perf_counter() - t0
    _summarise(args, out, data, heavy, light, rr, (time.perf_counter() - t_start, t_train, t_prune, t_route))
    return 0


def _dense(args, data, out: Path):
    from flowprune.api import train_model
    from flowprune.io import load
    from flowprune.train import TrainConfig

    t0 = time.perf_counter()
    print(f"[1/3] data {data.name}: {data.sizes()}  ->  training dense {args.model} for {args.epochs} epochs")
    dense_dir = out / "dense"
    if (dense_dir / "results.json").exists() and (dense_dir / "model.json").exists():
        print(f"      found {dense_dir}, reusing it")
        return load(dense_dir), time.perf_counter() - t0
    res = train_model(args.model, data, TrainConfig(epochs=args.epochs, lr=0.05, seed=args.seed),
                      out_dir=dense_dir, measure_speed=False)
    return res["model"], time.perf_counter() - t0


def _light(args, data, heavy, out: Path):
    from flowprune.io import load, save
    from flowprune.pruning.structural import prune

    print(f"[2/3] AGF pruning to {args.target_macs} fewer MACs ({args.light_budget} widths), "
          f"{args.finetune_epochs} fine-tune epochs")
    light_dir = out / "light"
    t0 = time.perf_counter()
    if (light_dir / "model.json").exists():
        light = load(light_dir)
        had = (light.flowprune_metadata.get("config") or {}).get("budget", "global")
        if had == args.light_budget:
            print(f"      found {light_dir}, reusing it")
            return light, time.perf_counter() - t0
        print(f"      {light_dir} has {had} widths: pruning again")
    pr = prune(heavy, data, method="agf", target_macs=args.target_macs, steps=2, finetune_epochs=1,
               final_finetune_epochs=args.finetune_epochs, seed=args.seed, budget=args.light_budget,
               checkpoint_dir=out / f"prune_checkpoints_{args.light_budget}")
    save(pr.model, light_dir, metadata={"stage": "pruned", "method": "agf", **pr.to_dict()})
    return pr.model, time.perf_counter() - t0


def _rows(args, data, heavy, light, rr) -> list[dict]:
    from flowprune.data import make_loader
    from flowprune.measure import accuracy, count_macs_params

    r, test = rr.results, make_loader(data.test, 512)
    t, sp = r["test"], r.get("speed") or {}
    dense_macs, dense_params = count_macs_params(heavy, data.input_shape)
    light_macs, light_params = count_macs_params(light, data.input_shape)

    def speed(who: str) -> dict:
        s = sp.get(who, {})
        thr, base = s.get("throughput_b256"), sp.get("heavy", {}).get("throughput_b256")
        return {"latency b1 ms": s.get("latency_ms_b1"), "throughput b256/s": thr,
                "x heavy b256": thr / base if thr and base else None}

    return [{"model": "heavy: dense " + args.model, "test acc %": 100 * accuracy(heavy, test), "MACs": dense_macs,
             "params": dense_params, "rel. cost": 1.0, "heavy usage %": 100.0, **speed("heavy")},
            {"model": f"light: AGF {args.target_macs}", "test acc %": 100 * accuracy(light, test), "MACs": light_macs,
             "params": light_params, "rel. cost": light_macs / dense_macs, "heavy usage %": 0.0, **speed("light")},
            {"model": "routed (confidence)", "test acc %": 100 * t["accuracy"], "MACs": None, "params": None,
             "rel. cost": r["cost"]["C_cascade"], "heavy usage %": 100 * t["heavy_usage"], **speed("routed")},
            {"model": "random routing, same usage", "test acc %": 100 * t["random_accuracy_same_usage"],
             "rel. cost": r["cost"]["C_cascade"], "heavy usage %": 100 * t["heavy_usage"]}]


def speed_lines(sp: dict) -> list[str]:
    """How the demo's speed figures were measured (one interleaved harness call per batch size)."""
    if not sp:
        return ["speed: not measured"]
    lines = []
    for b, t in sp["timing"].items():
        lb, la = t.get("load_before"), t.get("load_after")
        load = f"load {lb[0]:.2f} -> {la[0]:.2f}" if lb and la else "load unknown"
        lines.append(f"  {b}: heavy, light and routed timed together in one interleaved harness call "
                     f"({t['rounds']} rounds, rotated order, medians; {t['samples']} real test samples), "
                     f"{t['backend']} on {t['device']}, {t['threads']} thread(s), {load}")
    lines += [f"  refused: {m}" for m in sp.get("refused", [])]
    return ["speed (latency b1 and throughput b256 of each row come from the same measurement at that batch size):",
            *lines]


def _summarise(args, out: Path, data, heavy, light, rr, seconds: tuple) -> None:
    from flowprune.report import format_table, write_report, write_results

    r = rr.results
    rows = _rows(args, data, heavy, light, rr)
    total, t_train, t_prune, t_route = seconds
    table = format_table(rows, ["model", "test acc %", "MACs", "params", "rel. cost", "heavy usage %",
                                "latency b1 ms", "throughput b256/s", "x heavy b256"],
                         title=f"flowprune demo on {data.name} ({total:.0f} s: train {t_train:.0f}, "
                               f"prune {t_prune:.0f}, route {t_route:.0f})")
    heavy_row, routed_row = rows[0], rows[2]
    x = routed_row["x heavy b256"]
    goal = {"routed_x_heavy_b256": x, "routed_minus_heavy_acc_points": routed_row["test acc %"] - heavy_row["test acc %"],
            "met": bool(x is not None and x >= 2.0 and routed_row["test acc %"] >= heavy_row["test acc %"])}
    lines = speed_lines(r.get("speed") or {})
    print()
    print(table)
    print("\nrel. cost of the routed model is the real cascade cost C_cascade = c_l + p_h (MACs); "
          f"C_mix = {r['cost']['C_mix']:.3f}. Threshold {r['calibration']['threshold']}")
    print("\n".join(lines))
    write_results(Path(out) / "summary.json", {"rows": rows, "route": rr.summary(), "seconds": total,
                                              "speed": lines, "goal_2x_heavy_at_heavy_accuracy": goal})
    (Path(out) / "summary.md").write_text(table + "\n\n" + "\n".join(lines) + "\n")
    print(f"\nwritten: {out}/dense, {out}/light, {out}/routed, {out}/summary.json")
    print(f"report: {write_report(out)}  (open it in a browser: one self-contained page)")
