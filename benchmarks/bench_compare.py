"""Benchmark: AGF and the baseline scores against Torch-Pruning's own pruner, side by side (issue 3, item 6).

    python -m benchmarks.bench_compare                 # ResNet-20 / mnist5k and 1-D CNN / mnist1d
    python -m benchmarks.bench_compare --quick         # 1-D CNN only, 1 seed, 2 targets, 4 methods
    python -m benchmarks.bench_compare --epochs 5      # a longer fine-tune instead of the 1-epoch recovery

Every method starts from the same dense model (trained once and cached under
``runs/bench/dense_<model>_<data>_e<N>``), is cut one-shot to 2x/4x/8x/16x fewer MACs, and is
measured right after the cut, after BatchNorm re-estimation on the 10 calibration batches (no
weight update) and after the same fine-tune (default 1 epoch: the short recovery that keeps
MNIST-5k from saturating). Runs are kept under ``runs/bench/compare/`` so an interrupted
benchmark resumes. The tables, the goal check of issue 3 item 6 and the exact command are
printed as Markdown and written to ``docs/results/compare.md`` (``--doc``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time
from pathlib import Path

import torch

ALL_METHODS = "agf,l1,taylor,wanda,random,tp-magnitude,tp-taylor"
# (model, data, dense epochs, dense lr, extra kwargs)
CONFIGS = {
    "resnet20": ("resnet20", "mnist5k", 4, 0.05),
    "cnn1d": ("cnn1d", "mnist1d", 15, 0.05),
}


def dense_model(model: str, data, epochs: int, lr: float, root: Path):
    """The dense model, trained once and cached (flowprune.io format) under ``root``."""
    from flowprune.api import train_model
    from flowprune.io import load
    from flowprune.train import TrainConfig

    d = root / f"dense_{model}_{data.name}_e{epochs}"
    if (d / "model.json").exists():
        return load(d), False
    train_model(model, data, TrainConfig(epochs=epochs, lr=lr, seed=0), out_dir=d, measure_speed=False,
                progress=False)
    return load(d), True


def goal_check(summary: list[dict], label: str) -> list[str]:
    """Issue 3 item 6 goals, checked on one comparison's summary rows. Returns Markdown bullet lines."""
    by = {(r["method"], r["target"]): r for r in summary}
    targets = sorted({r["target"] for r in summary})
    tps = sorted({r["method"] for r in summary if r["method"].startswith("tp-")})
    out = []

    def best_tp(t, stage):
        rows = [by[(m, t)] for m in tps if (m, t) in by and by[(m, t)][stage] is not None]
        return max(rows, key=lambda r: r[stage]) if rows else None

    def fmt(r, stage):
        return f"{100 * r[stage]:.1f} ± {100 * r[stage + '_std']:.1f}"

    if ("agf", targets[0]) not in by or not tps:
        return [f"- {label}: goals need agf and a tp-* method; not checked"]
    for t in [t for t in targets if t in (2.0, 4.0, 8.0)]:
        a, b = by[("agf", t)], best_tp(t, "acc_bn")
        ok = a["acc_bn"] > b["acc_bn"] and a["d_acc_bn_gt_std"]
        out.append(f"- {label}, one-shot + BN, {t:g}x: AGF {fmt(a, 'acc_bn')} vs best TP ({b['method']}) "
                   f"{fmt(b, 'acc_bn')} -> beats by > 1 std: **{'met' if ok else 'not met'}**")
    for t in targets:
        a, b = by[("agf", t)], best_tp(t, "acc_ft")
        if a["acc_ft"] is None or b is None:
            continue
        if t in (2.0, 4.0):
            ok = a["acc_ft"] >= b["acc_ft"] or not a["d_acc_ft_gt_std"]
            want = "at least matches (not worse by > 1 std)"
        else:
            ok = a["acc_ft"] > b["acc_ft"] and a["d_acc_ft_gt_std"]
            want = "beats by > 1 std"
        out.append(f"- {label}, after fine-tune, {t:g}x: AGF {fmt(a, 'acc_ft')} vs best TP ({b['method']}) "
                   f"{fmt(b, 'acc_ft')} -> {want}: **{'met' if ok else 'not met'}**")
    t = 16.0
    if ("agf", t) in by and ("random", t) in by:
        for stage, name in (("acc_bn", "one-shot + BN"), ("acc_ft", "after fine-tune")):
            a, r = by[("agf", t)], by[("random", t)]
            if a[stage] is None:
                continue
            mags = [by[(m, t)] for m in ("l1", "tp-magnitude") if (m, t) in by]
            agf_ok = a[stage] >= r[stage]
            mag_below = all(m[stage] < r[stage] for m in mags)
            mags_txt = ", ".join(f"{m['method']} {fmt(m, stage)}" for m in mags)
            out.append(f"- {label}, 16x {name}: AGF {fmt(a, stage)} >= random {fmt(r, stage)}: "
                       f"**{'met' if agf_ok else 'not met'}**; magnitude below random ({mags_txt}): "
                       f"**{'yes' if mag_below else 'no'}**")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1-D CNN only, 1 seed, 2x/8x, 4 methods")
    p.add_argument("--models", default="cnn1d,resnet20", help="comma-separated: resnet20 (mnist5k), cnn1d (mnist1d)")
    p.add_argument("--methods", default=ALL_METHODS)
    p.add_argument("--targets", default="2x,4x,8x,16x")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1, help="fine-tune epochs after the cut (default 1: short recovery)")
    p.add_argument("--scratch-seeds", type=int, default=1, help="seeds of the train-from-scratch baseline (0 = skip)")
    p.add_argument("--resnet-seeds", type=int, default=None, help="seeds for ResNet-20 only (default --seeds)")
    p.add_argument("--resnet-epochs", type=int, default=None, help="fine-tune epochs for ResNet-20 (default --epochs)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the CPU is shared)")
    p.add_argument("--root", default="runs/bench", help="cache of dense models and finished runs")
    p.add_argument("--doc", default=None, help="also write the Markdown report here (e.g. docs/results/compare.md)")
    p.add_argument("--no-speed", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from flowprune.compare import compare
    from flowprune.data import load_dataset
    from flowprune.train import TrainConfig

    models = args.models.split(",")
    methods, targets, seeds = args.methods, args.targets.split(","), args.seeds
    if args.quick:
        models, methods, targets, seeds = ["cnn1d"], "agf,l1,random,tp-magnitude", ["2x", "8x"], 1
    command = "python -m benchmarks.bench_compare " + " ".join(argv if argv is not None else sys.argv[1:])
    root = Path(args.root)
    lines = ["# Benchmark: AGF vs baselines vs Torch-Pruning, one-shot and short recovery", "",
             f"Command: `{command.strip()}`  ", f"Date: {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC; "
             f"torch {torch.__version__}, {args.threads} thread(s), shared 2-core CPU.", ""]
    goals: list[str] = []
    t_all = time.perf_counter()
    for key in models:
        name, data_name, dense_epochs, lr = CONFIGS[key]
        data = load_dataset(data_name, seed=0)
        t0 = time.perf_counter()
        dense, trained = dense_model(name, data, dense_epochs, lr, root)
        n_seeds = args.resnet_seeds if (key == "resnet20" and args.resnet_seeds) else seeds
        ft = args.resnet_epochs if (key == "resnet20" and args.resnet_epochs is not None) else args.epochs
        if args.quick:
            ft = 1
        out = root / "compare" / f"{name}_{data_name}_ft{ft}_s{n_seeds}"
        res = compare(dense, data, methods, targets, n_seeds, finetune_epochs=ft, finetune_lr=0.01,
                      dense_config=TrainConfig(epochs=dense_epochs, lr=lr, seed=0),
                      scratch_seeds=args.scratch_seeds or None, scratch_epochs=None if args.scratch_seeds else 0,
                      measure_speed=not args.no_speed, speed_repeats=10, out_dir=out, progress=False)
        secs = time.perf_counter() - t0
        label = f"{name} / {data_name}"
        lines += [f"## {label} (dense {dense_epochs} epochs{', trained now' if trained else ', cached'}; "
                  f"{n_seeds} seed(s); fine-tune {ft} epoch(s); {secs:.0f} s)", "", res["table"], ""]
        goals += goal_check(res["summary"], label)
        print(f"[{label}] done in {secs:.0f} s", file=sys.stderr, flush=True)
    lines += ["## Goals (issue 3, item 6), checked on the numbers above", ""] + goals
    lines += ["", f"Total wall time: {time.perf_counter() - t_all:.0f} s."]
    text = "\n".join(lines)
    print(text)
    if args.doc:
        Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
        Path(args.doc).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
