"""Benchmark: flowprune's default structural pruning against Torch-Pruning, under a fair protocol (issue 9).

    python -m benchmarks.bench_compare                              # resnet20/mnist5k and cnn1d/mnist1d
    python -m benchmarks.bench_compare --models cnn1d --ft-epochs 1 # one model, shorter recovery

The protocol (BENCHMARKING.md lessons 1, 2, 8, 9):

* one dense model **per seed**, trained to convergence by ``benchmarks._dense`` (seed = dense
  training seed = calibration seed), so the spread covers both; the dense accuracies are printed;
* every method starts from the same dense model of its seed, is cut one-shot to 2x/4x/8x/16x fewer
  MACs, its BatchNorm statistics re-estimated on the same 10 x 128 calibration batches (no weight
  update), and measured on the test split (``acc_bn``);
* Torch-Pruning runs through its own ``MetaPruner`` with every importance that applies (magnitude
  L2/L1, Taylor, BN scale, LAMP, FPGM, Hessian), uniform and global; one-shot, its best
  configuration is the best by mean accuracy; after fine-tuning, by mean VALIDATION accuracy;
* fine-tuning: the same budget (``--ft-epochs``, SGD lr 0.01, cosine, same batch order per seed)
  for flowprune's default, EVERY Torch-Pruning configuration and random, at ``--ft-targets``
  (the whole pipeline against Torch-Pruning with each recovery: ``benchmarks/bench_recovery.py``);
* a method counts as ahead only beyond one std (the larger of the two).

Finished runs are kept under ``runs/bench/compare/`` (resume). The tables, the goal check and the
command go to ``docs/results/compare.md`` and ``docs/results/compare.json`` (``--doc``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path

import torch

FLOWPRUNE = ["agf", "agf-paper", "taylor", "l2", "random"]
# every Torch-Pruning importance that applies, uniform and global (issue 20: the anchor at its strongest)
TP = [f"{m}-{mode}" for m in ("tp-magnitude", "tp-l1", "tp-taylor", "tp-bn-scale", "tp-lamp", "tp-fpgm", "tp-hessian")
      for mode in ("uniform", "global")]
# a reduced list for a quick look (--reduced MODEL); the published protocol runs every configuration
REDUCED = ["agf", "agf-paper", "random", *TP]


def best_tp(summary: list[dict], target: float, stage: str) -> dict | None:
    """The best tp-* row at ``target``: after fine-tuning by VALIDATION accuracy (``val_ft``), one-shot by
    ``stage``."""
    rows = [r for r in summary if r["method"].startswith("tp-") and r["target"] == target and r[stage] is not None]
    key = "val_ft" if stage == "acc_ft" and all(r.get("val_ft") is not None for r in rows) else stage
    return max(rows, key=lambda r: r[key]) if rows else None


def _fmt(r: dict | None, stage: str) -> str:
    return "-" if r is None or r.get(stage) is None else f"{100 * r[stage]:.1f} ± {100 * r[stage + '_std']:.1f}"


def _ahead(a: dict, b: dict, stage: str) -> bool:
    return a[stage] - b[stage] > max(a[stage + "_std"], b[stage + "_std"])


def goal_check(bn_summary: list[dict], ft_summary: list[dict], label: str) -> list[str]:
    """Issue 9's goals on one model. Returns Markdown bullets, each marked met / not met."""
    out = []
    by = {(r["method"], r["target"]): r for r in bn_summary}
    for t in sorted({r["target"] for r in bn_summary}):
        a, b = by.get(("agf", t)), best_tp(bn_summary, t, "acc_bn")
        if a is None or b is None:
            continue
        ok = _ahead(a, b, "acc_bn")
        out.append(f"- {label}, one-shot + BN, {t:g}x: flowprune default {_fmt(a, 'acc_bn')} vs best Torch-Pruning "
                   f"({b['method']}) {_fmt(b, 'acc_bn')} -> ahead by more than one std: **{'met' if ok else 'not met'}**; "
                   f"std no larger: **{'met' if a['acc_bn_std'] <= b['acc_bn_std'] else 'not met'}**")
    fby = {(r["method"], r["target"]): r for r in ft_summary}
    for t in sorted({r["target"] for r in ft_summary}):
        a, b = fby.get(("agf", t)), best_tp(ft_summary, t, "acc_ft")
        if a is None or b is None or a.get("acc_ft") is None:
            continue
        level = not _ahead(b, a, "acc_ft")
        out.append(f"- {label}, after fine-tune, {t:g}x: flowprune default {_fmt(a, 'acc_ft')} vs best Torch-Pruning "
                   f"({b['method']}) {_fmt(b, 'acc_ft')} -> at least level (not behind by more than one std): "
                   f"**{'met' if level else 'not met'}**")
        r = fby.get(("random", t))
        if t >= 16 and r is not None and r.get("acc_ft") is not None:
            out.append(f"- {label}, after fine-tune, {t:g}x: flowprune default {_fmt(a, 'acc_ft')} vs random "
                       f"{_fmt(r, 'acc_ft')} -> above random by more than one std: "
                       f"**{'met' if _ahead(a, r, 'acc_ft') else 'not met'}**")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet20,cnn1d", help="comma-separated keys of benchmarks._dense.DENSE")
    p.add_argument("--targets", default="2x,4x,8x,16x")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--ft-epochs", type=int, default=5, help="fine-tune epochs after the cut (same for every method)")
    p.add_argument("--ft-targets", default="4x,16x", help="targets that are fine-tuned (empty: none)")
    p.add_argument("--methods", default=",".join(FLOWPRUNE + TP), help="methods cut one-shot")
    p.add_argument("--reduced", default="",
                   help="models that run only the reduced method list (CPU time): " + ",".join(REDUCED))
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the CPU is shared)")
    p.add_argument("--root", default="runs/bench/compare")
    p.add_argument("--doc", action="store_true", help="write docs/results/compare.{md,json}")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from benchmarks._dense import DENSE, dense_model
    from flowprune.compare import compare
    from flowprune.train import TrainConfig

    command = "python -m benchmarks.bench_compare " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# flowprune's default vs Torch-Pruning, fair protocol (issue 9)", "",
             f"Command: `{command.strip()}`  ",
             f"Date: {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, "
             f"{args.threads} thread(s), shared 2-core CPU. Accuracy in % on the test split, mean ± std over "
             f"{args.seeds} seeds (one dense model per seed).", ""]
    goals, payload = [], {"command": command.strip(), "models": {}}
    t_all = time.perf_counter()
    for key in args.models.split(","):
        name, data_name, epochs, lr = DENSE[key]
        seeds = list(range(args.seeds))
        t0 = time.perf_counter()
        denses, infos = [], []
        for s in seeds:
            m, data, info = dense_model(key, s)
            denses.append(m)
            infos.append(info)
        dense_cfg = TrainConfig(epochs=epochs, lr=lr)
        common = dict(calib_batches=10, calib_batch_size=128, dense_config=dense_cfg, scratch_epochs=0,
                      measure_speed=False, progress=False)
        methods = ",".join(REDUCED) if key in args.reduced.split(",") else args.methods
        bn = compare(denses, data, methods, args.targets.split(","), seeds, finetune_epochs=0,
                     out_dir=Path(args.root) / f"{key}_bn", **common)
        ft_targets = [t for t in args.ft_targets.split(",") if t]
        ft = {"summary": [], "table": ""}
        if ft_targets and args.ft_epochs > 0:
            # every Torch-Pruning configuration is fine-tuned; the best is picked after recovery on validation
            tps = [m for m in methods.split(",") if m.startswith("tp-")]
            ft = compare(denses, data, ["agf", *tps, "random"], ft_targets, seeds,
                         finetune_epochs=args.ft_epochs, finetune_lr=0.01,
                         out_dir=Path(args.root) / f"{key}_ft{args.ft_epochs}", **common)
        secs = time.perf_counter() - t0
        label = f"{name} / {data_name}"
        accs = ", ".join(f"{100 * i['dense_acc']:.1f}" for i in infos)
        lines += [f"## {label}", "", f"Dense: {epochs} epochs, test accuracy per seed {accs} %. Wall time {secs:.0f} s.",
                  "", "### One-shot + BatchNorm re-estimation (no weight update)", "", bn["table"], ""]
        if ft["table"]:
            lines += [f"### After {args.ft_epochs} fine-tune epochs (same budget for every method)", "", ft["table"], ""]
        g = goal_check(bn["summary"], ft["summary"], label)
        goals += g
        payload["models"][key] = {"dense_acc": [i["dense_acc"] for i in infos], "one_shot_bn": bn["summary"],
                                  "finetuned": ft["summary"], "goals": g, "seconds": secs}
        print(f"[{label}] done in {secs:.0f} s", file=sys.stderr, flush=True)
    lines += ["## Goals (issue 9), checked on the numbers above", ""] + goals
    lines += ["", f"Total wall time: {time.perf_counter() - t_all:.0f} s."]
    text = "\n".join(lines)
    print(text)
    if args.doc:
        Path("docs/results").mkdir(parents=True, exist_ok=True)
        Path("docs/results/compare.md").write_text(text + "\n")
        Path("docs/results/compare.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
