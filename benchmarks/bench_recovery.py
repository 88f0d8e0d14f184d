"""Benchmark (slow, not in CI): the recovered model, flowprune's whole pipeline against Torch-Pruning (issue 20).

    python -m benchmarks.bench_recovery --models cnn1d:mnist1d --seeds 0,1,2 --budget 5
    python -m benchmarks.bench_recovery --models resnet20:mnist5k,cnn1d:mnist1d,resnet20:fashion,resnet56:fashion \\
        --budget 30 --targets 2,4,8,16 --seeds 0,1,2              # the full protocol (long budget)
    python -m benchmarks.bench_recovery --report-only ...           # tables from the cache, no training

Protocol (BENCHMARKING.md lessons 1, 8, 9, 11): one dense model per seed trained with the recipe in
:data:`DENSE` (its accuracy is printed in the table); every method starts from the dense model of
its seed, is cut to ``--targets`` x fewer MACs and recovered with the SAME total budget of
``--budget`` epochs over the same training split (batch 128, SGD, weight decay 5e-4, augmentation,
same batch order per seed). Rows:

* ``fp-<recovery>[-iter]``: ``flowprune.prune`` with its default cut (AGF, global, unit, mean
  compensation), recovery ``finetune`` (plain: lr 0.01, cosine) or ``kd`` (distillation from the
  dense model, warm-up + cosine), one-shot (``steps=1``) or iterative (``steps="auto"``: one step
  per halving of the MACs, the budget shared by :func:`flowprune.recover.split_epochs`);
* ``tp-<importance>-<mode>``: Torch-Pruning 1.6.1's MetaPruner with every importance that applies
  (:data:`flowprune.procedures.torch_pruning.TP_METHODS` but random), uniform and global, each
  given plain fine-tuning. "best TP" = the configuration with the highest mean VALIDATION accuracy
  after recovery (over seeds, among those that reach the target within 3 %), never one-shot,
  never test; ``tp-best+kd`` = that configuration's cut given flowprune's ``kd`` recovery;
* ``random-<recovery>``: flowprune's plan with random scores.

Reported (test split): raw (right after the cut), BN (BatchNorm re-estimated on the calibration
batches, no weight update; for ``fp-*-iter`` and ``tp-*`` the one-shot numbers are those of the
first step / the cut), recovered accuracy; paired per-seed differences to best TP; wall seconds
and peak memory per method (CUDA peak on a GPU, else the process's peak RSS, which only grows);
teacher forward passes (samples). Every finished run is a JSON file under ``--cache``
(``runs/bench/recovery``): an interrupted run loses at most the run in flight. Writes
``docs/results/recovery.json`` and ``.md`` with the command in the header.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import resource
import shlex
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

# model:data -> (zoo model, data set, dense epochs, dense lr)
DENSE = {
    "resnet20:mnist5k": ("resnet20", "mnist5k", 15, 0.05),
    "cnn1d:mnist1d": ("cnn1d", "mnist1d", 30, 0.05),
    "resnet20:fashion": ("resnet20", "fashion", 15, 0.05),
    "resnet56:fashion": ("resnet56", "fashion", 15, 0.05),
    "resnet20:digits": ("resnet20", "digits", 10, 0.05),  # smoke runs only
}
TP_IMPORTANCES = ("tp-magnitude", "tp-l1", "tp-taylor", "tp-bn-scale", "tp-lamp", "tp-fpgm", "tp-hessian")
FP_VARIANTS = {"fp-finetune": ("finetune", 1), "fp-kd": ("kd", 1), "fp-finetune-iter": ("finetune", "auto"),
               "fp-kd-iter": ("kd", "auto")}
CALIB = (10, 128)  # batches x batch size
ROOT = Path("runs/bench/recovery")


def _peak_mem(dev: torch.device) -> dict:
    if dev.type == "cuda":
        return {"peak_mem_mb": torch.cuda.max_memory_allocated(dev) / 2**20, "peak_mem_kind": "cuda"}
    return {"peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_mem_kind": "rss"}


def _reset_mem(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def dense_model(key: str, seed: int, root: Path, dev: torch.device):
    """The dense model of ``key`` and ``seed`` (trained once, cached in flowprune.io format)."""
    from flowprune.api import train_model
    from flowprune.data import load_dataset, make_loader
    from flowprune.io import load
    from flowprune.measure import accuracy
    from flowprune.train import TrainConfig

    name, data_name, epochs, lr = DENSE[key]
    data = load_dataset(data_name, seed=0)
    d = root / "dense" / f"{name}_{data_name}_e{epochs}_s{seed}"
    if not (d / "model.json").exists():
        train_model(name, data, TrainConfig(epochs=epochs, lr=lr, seed=seed), out_dir=d, measure_speed=False,
                    progress=False, device=dev)
    model = load(d).to(dev).eval()
    return model, data, {"dense_acc": accuracy(model, make_loader(data.test, 512)),
                         "dense_val": accuracy(model, make_loader(data.val, 512)), "epochs": epochs, "lr": lr}


def _evaluate(model, data, rec: dict) -> None:
    from flowprune.data import make_loader
    from flowprune.measure import accuracy

    rec["acc_rec"] = accuracy(model, make_loader(data.test, 512))
    rec["val_rec"] = accuracy(model, make_loader(data.val, 512))


def run_fp(dense, data, target: float, seed: int, row: str, budget: int, dev, method: str = "agf") -> dict:
    from flowprune.pruning.structural import prune

    recovery, steps = FP_VARIANTS[row.replace("random", "fp")] if row.startswith("random") else FP_VARIANTS[row]
    t0 = time.perf_counter()
    res = prune(dense, data, method=method, target_macs=target, steps=steps, recovery=recovery,
                recovery_epochs=budget, seed=seed, calib_batches=CALIB[0], calib_batch_size=CALIB[1],
                device=dev, progress=False)
    h = res.history
    rec = {"acc_raw": h[0].get("acc_cut"), "acc_bn": h[0].get("acc_bn"), "steps": len(h),
           "achieved": res.reduction, "macs": res.macs, "params": res.params,
           "teacher_forwards": sum(x.get("teacher_forwards", 0) for x in h),
           "epochs_per_step": [x.get("recovery_epochs", 0) for x in h], "recovery": res.config["recovery"]}
    _evaluate(res.model, data, rec)
    rec["seconds"] = time.perf_counter() - t0
    return rec


def run_tp(dense, data, target: float, seed: int, row: str, budget: int, dev, calib, cache: dict) -> dict:
    from flowprune.data import make_loader
    from flowprune.measure import accuracy, count_macs_params
    from flowprune.procedures.torch_pruning import tp_prune_to_target
    from flowprune.recover import make_recipe, recover
    from flowprune.train import TrainConfig, reestimate_bn

    recovery = "kd" if row.endswith("+kd") else "finetune"
    base = row[:-3] if row.endswith("+kd") else row
    imp, mode = base.rsplit("-", 1)
    t0 = time.perf_counter()
    pruned, info = tp_prune_to_target(dense, imp, target, input_shape=tuple(data.input_shape), batches=calib,
                                      mode=mode, seed=seed, cache=cache)
    test = make_loader(data.test, 512)
    macs, params = count_macs_params(pruned, tuple(data.input_shape))
    dense_macs, _ = count_macs_params(dense, tuple(data.input_shape))
    rec = {"acc_raw": accuracy(pruned, test), "achieved": dense_macs / max(macs, 1), "macs": macs, "params": params,
           "within_tol": abs(dense_macs / max(macs, 1) / target - 1) <= 0.03, "tp_ratio": info.get("ratio"),
           "tp_trials": info.get("trials")}
    reestimate_bn(pruned, calib)
    rec["acc_bn"] = accuracy(pruned, test)
    rr = recover(pruned, data, budget, make_recipe(recovery), teacher=dense, seed=seed,
                 train_config=TrainConfig(lr=0.01, seed=seed), device=dev, progress=False)
    rec.update(teacher_forwards=rr["teacher_forwards"], recovery=rr["recovery"])
    _evaluate(pruned, data, rec)
    rec["seconds"] = time.perf_counter() - t0
    return rec


def _cached(path: Path, fn) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    rec = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    tmp.replace(path)
    return rec


def _one_run(dense, data, target: float, seed: int, row: str, budget: int, dev, calib, tp_cache: dict) -> dict:
    """One row x target x seed, with its peak memory."""
    _reset_mem(dev)
    if row.startswith(("fp-", "random-")):
        rec = run_fp(dense, data, target, seed, row, budget, dev, method="random" if row.startswith("random") else "agf")
    else:
        rec = run_tp(dense, data, target, seed, row, budget, dev, calib, tp_cache)
    extra = {"row": "tp-best+kd", "config": row[:-3]} if row.endswith("+kd") else {"row": row}
    return {**extra, "target": target, "seed": seed, **rec, **_peak_mem(dev)}


def tp_rows() -> list[str]:
    return [f"{imp}-{mode}" for imp in TP_IMPORTANCES for mode in ("uniform", "global")]


def run_key(key: str, seeds, targets, budget: int, root: Path, dev, log, skip=()) -> None:
    """For one model:data: the dense models, then target by target (all seeds, so that an interrupted
    run leaves whole targets) every fp, TP and random row, then best TP + kd."""
    cache_root = root / f"{key.replace(':', '_')}_b{budget}"
    cache_root.mkdir(parents=True, exist_ok=True)
    dense = {}
    for seed in seeds:
        model, data, dinfo = dense_model(key, seed, root, dev)
        (cache_root / f"dense_s{seed}.json").write_text(json.dumps(dinfo))
        calib = data.calibration_batches(CALIB[1], CALIB[0], seed=seed * 1000, split="train")
        dense[seed] = (model, data, calib, {})
        log(f"{key} seed {seed}: dense test {100 * dinfo['dense_acc']:.1f}")
    rows = [r for r in (*FP_VARIANTS, "random-finetune", "random-kd", *tp_rows())
            if not any(fnmatch.fnmatch(r, pat) for pat in skip)]
    for target in targets:
        for seed in seeds:
            model, data, calib, tp_cache = dense[seed]
            for row in rows:
                path = cache_root / f"s{seed}" / f"{row}_{target:g}x.json"
                rec = _cached(path, partial(_one_run, model, data, target, seed, row, budget, dev, calib, tp_cache))
                log(f"  {row:24s} {target:g}x s{seed}: raw {100 * (rec['acc_raw'] or 0):.1f} bn "
                    f"{100 * (rec['acc_bn'] or 0):.1f} rec {100 * rec['acc_rec']:.1f} ({rec['seconds']:.0f} s)")
        best = best_tp(load_runs(cache_root), target)  # by mean validation accuracy after recovery
        for seed in seeds if best is not None else ():
            model, data, calib, _ = dense[seed]
            path = cache_root / f"s{seed}" / f"tp-best+kd_{target:g}x.json"
            rec = _cached(path, partial(_one_run, model, data, target, seed, best + "+kd", budget, dev, calib, {}))
            log(f"  tp-best+kd ({best}) {target:g}x s{seed}: rec {100 * rec['acc_rec']:.1f}")


def load_runs(cache_root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(cache_root.glob("s*/*.json"))]


def best_tp(runs: list[dict], target: float) -> str | None:
    """The TP configuration with the highest mean validation accuracy after recovery at ``target``,
    among those within 3 % of the target on every seed (and run on as many seeds as the most)."""
    by: dict[str, list[dict]] = {}
    for r in runs:
        if r["target"] == target and r["row"].startswith("tp-") and not r["row"].startswith("tp-best"):
            by.setdefault(r["row"], []).append(r)
    if not by:
        return None
    n = max(len(v) for v in by.values())
    ok = {k: v for k, v in by.items() if len(v) == n and all(r.get("within_tol", True) for r in v)}
    ok = ok or {k: v for k, v in by.items() if len(v) == n}
    return max(ok, key=lambda k: statistics.fmean(r["val_rec"] for r in ok[k]))


def _ms(vals) -> tuple[float | None, float | None]:
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _pm(m, s) -> str:
    return "-" if m is None else f"{100 * m:.1f} ± {100 * s:.1f}"


def summarise_key(cache_root: Path, default_row: str, targets=None, seeds=None, skip=()) -> dict:
    """Rows, paired differences and goal checks for one model:data from the cached runs (of ``targets``
    and ``seeds`` when given, without the rows ``skip`` names)."""
    runs = [r for r in load_runs(cache_root) if (targets is None or r["target"] in targets)
            and (seeds is None or r["seed"] in seeds) and not any(fnmatch.fnmatch(r["row"], p) for p in skip)]
    dense = [json.loads(p.read_text()) for p in sorted(cache_root.glob("dense_s*.json"))]
    targets = sorted({r["target"] for r in runs})
    out = {"dense_acc": _ms([d["dense_acc"] for d in dense]), "dense_epochs": dense[0]["epochs"] if dense else None,
           "targets": {}}
    for t in targets:
        rt = [r for r in runs if r["target"] == t]
        best = best_tp(runs, t)
        rows = {}
        for row in sorted({r["row"] for r in rt}):
            rs = sorted((r for r in rt if r["row"] == row), key=lambda r: r["seed"])
            rows[row] = {k: _ms([r.get(k) for r in rs]) for k in ("acc_raw", "acc_bn", "acc_rec", "val_rec",
                                                                   "achieved", "seconds", "peak_mem_mb",
                                                                   "teacher_forwards")}
            rows[row]["seeds"] = [r["seed"] for r in rs]
            rows[row]["per_seed_rec"] = [r["acc_rec"] for r in rs]
            if row == "tp-best+kd":
                rows[row]["config"] = rs[0].get("config")
        out["targets"][f"{t:g}"] = {"best_tp": best, "rows": rows, "recipe_study": _recipe_study(rt),
                                    "paired": _paired(rt, best, default_row), "goals": _goals(rt, rows, best,
                                                                                               default_row)}
    return out


RECIPE_PAIRS = (("fp-kd", "fp-finetune"), ("fp-kd-iter", "fp-kd"), ("fp-finetune-iter", "fp-finetune"))


def _recipe_study(rt: list[dict]) -> dict:
    """Paired per-seed differences between flowprune's recovery variants (what picks the default)."""
    out = {}
    for a, b in RECIPE_PAIRS:
        ra, rb = _by_seed(rt, a, "acc_rec"), _by_seed(rt, b, "acc_rec")
        d = [ra[s] - rb[s] for s in sorted(ra) if s in rb]
        if d:
            out[f"{a} - {b}"] = {"mean": _ms(d)[0], "std": _ms(d)[1], "per_seed": d}
    return out


def _by_seed(rt: list[dict], row: str, key: str) -> dict[int, float]:
    return {r["seed"]: r[key] for r in rt if r["row"] == row and r.get(key) is not None}


def _paired(rt: list[dict], best: str | None, default_row: str) -> dict:
    """Per-seed differences (recovered and BN one-shot) of every row to best TP: mean and std."""
    if best is None:
        return {}
    out = {}
    for key in ("acc_rec", "acc_bn"):
        ref = _by_seed(rt, best, key)
        for row in sorted({r["row"] for r in rt}):
            mine = _by_seed(rt, row, key)
            d = [mine[s] - ref[s] for s in sorted(mine) if s in ref]
            if d:
                out.setdefault(key, {})[row] = {"mean": _ms(d)[0], "std": _ms(d)[1], "per_seed": d}
    return out


def _goals(rt, rows, best, default_row) -> dict:
    """Issue 20's goal at one target, each with its numbers."""
    g = {}
    if default_row not in rows:
        return g
    rnd = default_row.replace("fp-", "random-").replace("-iter", "")
    if rnd in rows and rows[rnd]["acc_rec"][0] is not None:
        dm, ds = rows[default_row]["acc_rec"]
        rm, rs = rows[rnd]["acc_rec"]
        g["above_random"] = {"met": dm - rm > max(ds, rs), "diff": dm - rm, "std": max(ds, rs)}
    if best is None:
        return g
    pr = _paired(rt, best, default_row)
    d = pr.get("acc_rec", {}).get(default_row)
    if d:
        g["ahead_of_best_tp_ft"] = {"met": d["mean"] > d["std"] and d["mean"] > 0, "diff": d["mean"], "std": d["std"]}
    d_kd = {s: v for s, v in _by_seed(rt, default_row, "acc_rec").items()}
    ref_kd = _by_seed(rt, "tp-best+kd", "acc_rec")
    dd = [d_kd[s] - ref_kd[s] for s in d_kd if s in ref_kd]
    if dd:
        m, s = _ms(dd)
        g["ahead_or_level_tp_cut_fp_recovery"] = {"met": m >= -s, "diff": m, "std": s}
    one = rows.get("fp-finetune")  # the default cut, one-shot, before any recovery
    tp_bn = [(k, r["acc_bn"]) for k, r in rows.items()
             if k.startswith("tp-") and k != "tp-best+kd" and r["acc_bn"][0] is not None]
    if one and tp_bn:  # against the best one-shot TP configuration (by mean, the strongest one-shot opponent)
        k, (m, s) = max(tp_bn, key=lambda kv: kv[1][0])
        g["one_shot_bn_ahead"] = {"met": one["acc_bn"][0] > m, "diff": one["acc_bn"][0] - m,
                                  "std": max(s, one["acc_bn"][1]), "vs": k}
    return g


GOAL_TEXT = {"ahead_of_best_tp_ft": "ahead of best TP (plain FT) by > 1 paired std",
             "ahead_or_level_tp_cut_fp_recovery": "ahead of / level with TP's cut + flowprune recovery",
             "one_shot_bn_ahead": "one-shot + BN ahead of the best one-shot TP configuration (means)",
             "above_random": "above random (same recovery) by > 1 std"}


def _headline(key: str, s: dict, default_row: str) -> list[str]:
    """One compact table per model: the rows the issue names, recovered accuracy and paired differences."""
    ts = list(s["targets"])
    lines = ["| recovered accuracy % (paired Δ vs best TP) | " + " | ".join(f"{t}x" for t in ts) + " |",
             "|---" * (len(ts) + 1) + "|"]

    def cell(t, row):
        st = s["targets"][t]
        r = st["rows"].get(row)
        if r is None:
            return "-"
        p = st["paired"].get("acc_rec", {}).get(row)
        extra = f" ({100 * p['mean']:+.1f} ± {100 * p['std']:.1f})" if p is not None and row != st["best_tp"] else ""
        return _pm(*r["acc_rec"]) + extra

    names = [(default_row, f"flowprune default pipeline (`{default_row}`)"),
             ("fp-finetune", "flowprune cut + plain fine-tune"), ("fp-kd", "flowprune cut + kd, one-shot"),
             ("fp-kd-iter", "flowprune cut + kd, iterative"), ("BEST", "best TP (plain FT)"),
             ("tp-best+kd", "best TP cut + flowprune kd recovery"), ("random-kd", "random cut + kd"),
             ("random-finetune", "random cut + plain fine-tune")]
    seen = set()
    for row, label in names:
        if row in seen:
            continue
        seen.add(row)
        cells = [cell(t, s["targets"][t]["best_tp"] if row == "BEST" else row) for t in ts]
        if any(c != "-" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if any(s["targets"][t]["best_tp"] for t in ts):
        lines.append("| best TP configuration (validation, after recovery) | "
                     + " | ".join(f"`{s['targets'][t]['best_tp']}`" for t in ts) + " |")
    bn = ["| one-shot + BN %: flowprune cut / best-one-shot TP | "]
    for t in ts:
        rows = s["targets"][t]["rows"]
        tp_bn = max((r["acc_bn"] for k, r in rows.items() if k.startswith("tp-") and k != "tp-best+kd"
                     and r["acc_bn"][0] is not None), key=lambda v: v[0], default=(None, None))
        fp = rows.get("fp-finetune", {}).get("acc_bn", (None, None))
        bn.append(f"{_pm(*fp)} / {_pm(*tp_bn)} | ")
    lines.append("".join(bn).rstrip())
    return lines


def render(results: dict, command: str) -> str:
    lines = ["# Recovery benchmark (issue 20)", "", f"Command: `{command}`", "",
             f"Scope: {results['scope']}", "",
             f"Default pipeline row: `{results['default_row']}` ({results['default_text']}). Accuracy on the test "
             "split, mean ± std over seeds; paired Δ = per-seed difference to the best Torch-Pruning configuration "
             "(chosen by mean validation accuracy after the same plain fine-tuning), mean ± std. "
             f"Budget: {results['budget']} epochs of recovery over the training split for every row (iterative rows "
             "share it over their steps). Calibration: "
             f"{results['calibration']['batches']} x {results['calibration']['batch_size']}. Device: "
             f"{results['device']}, {results['torch_threads']} torch thread(s); seconds are wall time on a shared "
             "machine (compare only within a table). Peak memory: the process's peak RSS on the CPU (it only grows "
             "within a process: read it as an upper bound), CUDA peak on a GPU. Teacher forward: samples passed "
             "through the dense teacher during recovery (extra compute beyond the epoch budget).", ""]
    for key, s in results["keys"].items():
        dm, dsd = s["dense_acc"]
        lines += [f"## {key}, budget {results['budget']} epochs", "",
                  f"Dense: {_pm(dm, dsd)} % test ({s['dense_epochs']} epochs, one model per seed).", ""]
        lines += _headline(key, s, results["default_row"]) + [""]
        pairs = sorted({p for st in s["targets"].values() for p in st["recipe_study"]})
        if pairs:
            lines += ["Recovery variants of flowprune's cut, paired per seed (recovered accuracy, points):", "",
                      "| difference | " + " | ".join(f"{t}x" for t in s["targets"]) + " |",
                      "|---" * (len(s["targets"]) + 1) + "|"]
            for p in pairs:
                cells = []
                for st in s["targets"].values():
                    v = st["recipe_study"].get(p)
                    cells.append("-" if v is None else f"{100 * v['mean']:+.1f} ± {100 * v['std']:.1f}")
                lines.append(f"| {p} | " + " | ".join(cells) + " |")
            lines.append("")
        for t, st in s["targets"].items():
            n = len(st["rows"].get(results["default_row"], {}).get("seeds", []))
            lines.append(f"Goals at {t}x ({n} seed(s)):")
            for g, v in st["goals"].items():
                lines.append(f"- {GOAL_TEXT[g]}: **{'met' if v['met'] else 'not met'}** "
                             f"({100 * v['diff']:+.1f} vs std {100 * v['std']:.1f} points)")
            lines.append("")
        for t, st in s["targets"].items():
            lines += [f"### {key}, {t}x fewer MACs: every row", "",
                      "| row | achieved | raw % | BN % | recovered % | Δ rec vs best TP (paired) | seconds | "
                      "peak MB | teacher fwd |", "|---|---|---|---|---|---|---|---|---|"]
            pr = st["paired"].get("acc_rec", {})
            order = sorted(st["rows"], key=lambda r: (not r.startswith("fp-"), not r.startswith("tp-best"),
                                                     r.startswith("tp-"), r))
            for row in order:
                r = st["rows"][row]
                p = pr.get(row)
                ptxt = "-" if p is None else f"{100 * p['mean']:+.1f} ± {100 * p['std']:.1f}"
                name = row + (f" ({r['config']})" if r.get("config") else "") + (" **default**" if
                                                                                 row == results["default_row"] else "")
                name += " **best TP**" if row == st["best_tp"] else ""
                iter_row = row.endswith("-iter")  # raw/BN of an iterative row are its first step's, not one-shot
                raw = "(step 1)" if iter_row else _pm(*r["acc_raw"])
                bn = "(step 1)" if iter_row else _pm(*r["acc_bn"])
                lines.append(f"| {name} | {r['achieved'][0]:.2f}x | {raw} | {bn} | "
                             f"{_pm(*r['acc_rec'])} | {ptxt} | {r['seconds'][0]:.0f} | {r['peak_mem_mb'][0]:.0f} | "
                             f"{r['teacher_forwards'][0]:.0f} |")
            lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="cnn1d:mnist1d,resnet20:mnist5k")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--targets", default="2,4,8,16")
    ap.add_argument("--budget", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--root", default=str(ROOT))
    ap.add_argument("--out", default="docs/results/recovery")
    ap.add_argument("--scope", default="as run")
    ap.add_argument("--skip", default="", help="rows to leave out, comma-separated shell patterns (e.g. "
                    "fp-finetune-iter,tp-*)")
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    keys = [k.strip() for k in a.models.split(",") if k.strip()]
    for k in keys:
        if k not in DENSE:
            raise SystemExit(f"unknown model:data {k!r}; allowed: {', '.join(DENSE)}")
    seeds = [int(s) for s in a.seeds.split(",")]
    targets = [float(t) for t in a.targets.split(",")]
    root, dev = Path(a.root), torch.device(a.device)

    def log(msg: str) -> None:
        print(msg, flush=True)

    skip = [r for r in a.skip.split(",") if r]
    if not a.report_only:
        for k in keys:
            run_key(k, seeds, targets, a.budget, root, dev, log, skip=skip)
    from flowprune.recover import DEFAULT_RECOVERY

    default_row = f"fp-{DEFAULT_RECOVERY}" + ("-iter" if DEFAULT_STEPS == "auto" else "")
    results = {"command": "python -m benchmarks.bench_recovery " + shlex.join(sys.argv[1:] if argv is None else argv),
               "budget": a.budget, "scope": a.scope, "default_row": default_row,
               "default_text": f"flowprune.prune default cut, recovery={DEFAULT_RECOVERY!r}, steps={DEFAULT_STEPS!r}",
               "calibration": {"batches": CALIB[0], "batch_size": CALIB[1]}, "torch_threads": torch.get_num_threads(),
               "device": str(dev), "keys": {}}
    for k in keys:
        cr = root / f"{k.replace(':', '_')}_b{a.budget}"
        if cr.exists():
            results["keys"][k] = summarise_key(cr, default_row, targets, seeds, skip)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from flowprune.report import write_results

    write_results(out.with_suffix(".json"), results)
    out.with_suffix(".md").write_text(render(results, results["command"]) + "\n")
    print(f"wrote {out}.json and {out}.md")
    return 0


DEFAULT_STEPS = 1  # the default pipeline's schedule of cuts (prune's ``steps``) the report labels


if __name__ == "__main__":
    sys.exit(main())
