"""Benchmark: every structural score on an LSTM's hidden units, one-shot (issue 24, recurrent layers).

    python -m benchmarks.bench_recurrent --doc                 # lstm1d on mnist1d, 3 seeds, 1.33x, 2x, 4x
    python -m benchmarks.bench_recurrent --seeds 0 --ratios 0.5 --ft-epochs 0

Protocol: one dense ``lstm1d`` (``nn.LSTM``, 64 hidden units, the 40-step MNIST-1D signal read as a
sequence; AdamW, 40 epochs, ``benchmarks._dense``) per seed; every registered score cuts the same
dense model one-shot with ``flowprune.prune(..., ratio=r, budget="layer")`` (r = 0.5: 2x fewer hidden
units; 0.75: 4x), calibrated on the same 10 x 128 batches of the training split (calibration seed =
seed); test accuracy (1,000 samples) one-shot (no BatchNorm to re-estimate) and after ``--ft-epochs``
(default 2) epochs of fine-tuning (AdamW lr 2e-3, the same batch order for every score of a seed).
Mean ± std over seeds; a score is ahead of another only beyond the larger std, with the paired
per-seed differences beside. Writes ``docs/results/recurrent.{json,md}`` with ``--doc``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch

CMD = "python -m benchmarks.bench_recurrent --doc"
FT = {"lr": 2e-3, "optimizer": "adamw", "weight_decay": 0.01, "augment": False}


def run(seeds: list[int], ratios: list[float], scores: list[str], ft_epochs: int) -> dict:
    from benchmarks._dense import dense_model
    from flowprune.data import make_loader
    from flowprune.measure import accuracy, count_macs_params
    from flowprune.pruning.structural import prune
    from flowprune.train import TrainConfig, fit

    rows, dense = [], []
    for seed in seeds:
        model, data, info = dense_model("lstm1d", seed)
        macs0, params0 = count_macs_params(model)
        dense.append({"seed": seed, "acc": info["dense_acc"], "macs": macs0, "params": params0,
                      "hidden": model.rnn.hidden_size})
        print(f"seed {seed}: dense {100 * info['dense_acc']:.2f}%", flush=True)
        batches = data.calibration_batches(128, 10, seed=seed)
        test = make_loader(data.test, 512)
        for ratio in ratios:
            for score in scores:
                t0 = time.perf_counter()
                res = prune(model, batches, method=score, ratio=ratio, budget="layer", seed=seed, measure=False)
                secs = time.perf_counter() - t0
                macs, params = count_macs_params(res.model)
                acc = accuracy(res.model.eval(), test)
                acc_ft = None
                if ft_epochs:
                    fit(res.model, data, TrainConfig(epochs=ft_epochs, seed=seed, **FT), progress=False)
                    acc_ft = accuracy(res.model.eval(), test)
                rows.append({"seed": seed, "ratio": ratio, "score": score, "acc": acc, "acc_ft": acc_ft,
                             "hidden": res.model.rnn.hidden_size, "macs": macs, "params": params, "seconds": secs})
                print(f"  {ratio:g} {score:12s} {100 * acc:6.2f}% -> {100 * (acc_ft or 0):6.2f}%  "
                      f"hidden {res.model.rnn.hidden_size}", flush=True)
    return {"dense": dense, "rows": rows}


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for ratio in sorted({r["ratio"] for r in rows}):
        for score in sorted({r["score"] for r in rows}):
            mine = [r for r in rows if r["ratio"] == ratio and r["score"] == score]
            if not mine:
                continue
            rec = {"ratio": ratio, "score": score, "n": len(mine), "hidden": mine[0]["hidden"],
                   "macs": mine[0]["macs"], "params": mine[0]["params"]}
            for key in ("acc", "acc_ft"):
                vals = [r[key] for r in mine if r[key] is not None]
                rec[key] = statistics.mean(vals) if vals else None
                rec[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            out.append(rec)
    return out


def markdown(payload: dict) -> str:
    dense = payload["dense"]
    accs = [d["acc"] for d in dense]
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    lines = [f"# Recurrent hidden units: one-shot scores on lstm1d / MNIST-1D ({len(dense)} seeds)", "",
             f"Command: `{CMD}` (written {payload['date']}, torch {payload['torch']}, "
             f"Torch-Pruning {payload['torch_pruning']}, load average at start {payload['load']}).", "",
             f"Dense: `lstm1d` (nn.LSTM, {dense[0]['hidden']} hidden units, {dense[0]['params']} params, "
             f"{dense[0]['macs']} MACs), test accuracy {100 * statistics.mean(accs):.1f} ± {100 * std:.1f} %. "
             "One-shot cut of the LSTM's hidden units (all four gates of a unit together) by "
             "`flowprune.prune(model, batches, method=SCORE, ratio=R, budget=\"layer\")`, 10 x 128 calibration "
             f"samples; test accuracy mean ± std over seeds, one-shot and after {payload['ft_epochs']} epochs of "
             f"fine-tuning (AdamW lr {FT['lr']:g}). Chance is 10 %.", "",
             "| cut | hidden | params | MACs | score | one-shot acc % | fine-tuned acc % |",
             "|---|---|---|---|---|---|---|"]
    for r in payload["summary"]:
        lines.append(f"| {1 / (1 - r['ratio']):.2g}x | {r['hidden']} | {r['params']} | {r['macs']} | {r['score']} | "
                     f"{_pm(r, 'acc')} | {_pm(r, 'acc_ft')} |")
    lines += ["", "## Goal check (AGF vs L1)", ""]
    by = {(r["ratio"], r["score"]): r for r in payload["summary"]}
    for ratio in sorted({r["ratio"] for r in payload["summary"]}):
        a, b = by.get((ratio, "agf")), by.get((ratio, "l1"))
        if a is None or b is None:
            continue
        for key, label in (("acc", "one-shot"), ("acc_ft", "fine-tuned")):
            if a[key] is None or b[key] is None:
                continue
            gap = a[key] - b[key]
            ahead = gap > max(a[key + "_std"], b[key + "_std"])
            seeds = sorted({r["seed"] for r in payload["rows"]})
            pair = {(r["seed"], r["score"]): r[key] for r in payload["rows"] if r["ratio"] == ratio}
            diffs = [100 * (pair[(s, "agf")] - pair[(s, "l1")]) for s in seeds
                     if pair.get((s, "agf")) is not None and pair.get((s, "l1")) is not None]
            lines.append(f"- {1 / (1 - ratio):.2g}x hidden units, {label}: AGF {_pm(a, key)} vs L1 {_pm(b, key)} "
                         f"(difference {100 * gap:+.1f} points; per seed {', '.join(f'{d:+.1f}' for d in diffs)}) "
                         f"-> AGF ahead by more than one std: **{'met' if ahead else 'not met'}**")
    return "\n".join(lines) + "\n"


def _pm(r: dict, key: str) -> str:
    return "-" if r.get(key) is None else f"{100 * r[key]:.1f} ± {100 * r[key + '_std']:.1f}"


def main(argv: list[str] | None = None) -> int:
    import os

    import torch_pruning as tp

    from flowprune.scores import list_scores

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--ft-epochs", type=int, default=2)
    p.add_argument("--scores", nargs="+", default=None, help="default: every registered score")
    p.add_argument("--doc", action="store_true", help="write docs/results/recurrent.{md,json}")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    res = run(a.seeds, a.ratios, a.scores or list_scores(), a.ft_epochs)
    payload = {"command": CMD, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "torch": torch.__version__, "torch_pruning": getattr(tp, "__version__", "?"), "load": f"{load:.1f}",
               "ft_epochs": a.ft_epochs,
               **res, "summary": summarise(res["rows"])}
    text = markdown(payload)
    print(text)
    if a.doc:
        Path("docs/results/recurrent.md").write_text(text)
        Path("docs/results/recurrent.json").write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
