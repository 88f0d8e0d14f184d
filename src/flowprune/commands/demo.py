"""``flowprune demo``: the whole flow on the embedded MNIST digits, in a few minutes on 2 cores.

train a dense ResNet-20 (heavy expert) -> AGF-prune it to ``--target-macs`` fewer MACs with
fine-tuning (light expert) -> put both behind a confidence router calibrated on the val split
-> print one summary table and write ``OUT/summary.json``. Every step writes its own directory
under ``OUT`` and a rerun resumes from what is already there.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from flowprune.commands._common import check_out_dir

NAME = "demo"
HELP = "train -> AGF prune -> route on the embedded MNIST digits and print a summary table"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--data", default="mnist5k")
    p.add_argument("--epochs", type=int, default=10, help="dense training epochs (default 10)")
    p.add_argument("--target-macs", default="8x", help="MACs reduction of the light expert (default 8x)")
    p.add_argument("--finetune-epochs", type=int, default=3, help="fine-tune epochs after pruning (default 3)")
    p.add_argument("--heavy-budget", type=float, default=0.5, help="share of inputs the router may escalate")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from flowprune.api import train_model
    from flowprune.data import load_dataset, make_loader
    from flowprune.io import load, save
    from flowprune.measure import accuracy, count_macs_params, speed_report
    from flowprune.pruning.structural import prune
    from flowprune.report import format_table, write_results
    from flowprune.route.api import route_experts
    from flowprune.train import TrainConfig

    out = check_out_dir(args.out)
    t_start = time.perf_counter()
    data = load_dataset(args.data, seed=args.seed)
    test = make_loader(data.test, 512)
    print(f"[1/3] data {data.name}: {data.sizes()}  ->  training dense {args.model} for {args.epochs} epochs")
    dense_dir = out / "dense"
    if (dense_dir / "results.json").exists() and (dense_dir / "model.json").exists():
        heavy = load(dense_dir)
        print(f"      found {dense_dir}, reusing it")
    else:
        res = train_model(args.model, data, TrainConfig(epochs=args.epochs, lr=0.05, seed=args.seed),
                          out_dir=dense_dir, measure_speed=False)
        heavy = res["model"]
    t_train = time.perf_counter() - t_start

    print(f"[2/3] AGF pruning to {args.target_macs} fewer MACs, {args.finetune_epochs} fine-tune epochs")
    light_dir = out / "light"
    t0 = time.perf_counter()
    if (light_dir / "model.json").exists():
        light = load(light_dir)
        print(f"      found {light_dir}, reusing it")
    else:
        pr = prune(heavy, data, method="agf", target_macs=args.target_macs, steps=2, finetune_epochs=1,
                   final_finetune_epochs=args.finetune_epochs, seed=args.seed,
                   checkpoint_dir=out / "prune_checkpoints")
        light = pr.model
        save(light, light_dir, metadata={"stage": "pruned", "method": "agf", **pr.to_dict()})
    t_prune = time.perf_counter() - t0

    print(f"[3/3] routing: confidence router calibrated on val for heavy budget {args.heavy_budget}")
    t0 = time.perf_counter()
    rr = route_experts(light, heavy, data, router="confidence", heavy_budget=args.heavy_budget,
                       out_dir=out / "routed", diagnostic=False, sweep=True, rounds=3, latency_samples=50)
    t_route = time.perf_counter() - t0
    r = rr.results
    t = r["test"]
    sp = r.get("speed", {})
    dense_macs, _ = count_macs_params(heavy, data.input_shape)
    light_macs, light_params = count_macs_params(light, data.input_shape)
    rows = []
    for name, model_acc, macs, params, speed_key in (
            ("heavy: dense " + args.model, accuracy(heavy, test), dense_macs, count_macs_params(heavy)[1], "heavy"),
            (f"light: AGF {args.target_macs}", accuracy(light, test), light_macs, light_params, "light")):
        s = sp.get(speed_key) or speed_report(heavy if speed_key == "heavy" else light, data.input_shape)
        rows.append({"model": name, "test acc %": 100 * model_acc, "MACs": macs, "params": params,
                     "rel. cost": macs / dense_macs, "heavy usage %": 100.0 if speed_key == "heavy" else 0.0,
                     "latency b1 ms": s.get("latency_ms_b1"), "throughput b256/s": s.get("throughput_b256")})
    routed_speed = sp.get("routed", {})
    rows.append({"model": "routed (confidence)", "test acc %": 100 * t["accuracy"], "MACs": None, "params": None,
                 "rel. cost": r["cost"]["C_cascade"], "heavy usage %": 100 * t["heavy_usage"],
                 "latency b1 ms": routed_speed.get("latency_ms_b1"),
                 "throughput b256/s": routed_speed.get("throughput_b256")})
    rows.append({"model": "random routing, same usage", "test acc %": 100 * t["random_accuracy_same_usage"],
                 "rel. cost": r["cost"]["C_cascade"], "heavy usage %": 100 * t["heavy_usage"]})
    total = time.perf_counter() - t_start
    table = format_table(rows, ["model", "test acc %", "MACs", "params", "rel. cost", "heavy usage %",
                                "latency b1 ms", "throughput b256/s"],
                         title=f"flowprune demo on {data.name} ({total:.0f} s: train {t_train:.0f}, "
                               f"prune {t_prune:.0f}, route {t_route:.0f})")
    print()
    print(table)
    print("\nrel. cost of the routed model is the real cascade cost C_cascade = c_l + p_h (MACs); "
          f"C_mix = {r['cost']['C_mix']:.3f}. Threshold {r['calibration']['threshold']}")
    write_results(Path(out) / "summary.json", {"rows": rows, "route": rr.summary(), "seconds": total})
    (Path(out) / "summary.md").write_text(table + "\n")
    print(f"\nwritten: {out}/dense, {out}/light, {out}/routed, {out}/summary.json")
    from flowprune.report import write_report

    print(f"report: {write_report(out)}  (open it in a browser: one self-contained page)")
    return 0
