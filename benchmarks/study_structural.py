"""Study: which structural pruning configuration keeps the most accuracy one-shot (issue 9, item 3).

    python -m benchmarks.study_structural --models cnn1d --seeds 0,1,2 --configs all
    python -m benchmarks.study_structural --models resnet20 --seeds 0 --configs agf-global,tp-best

Every configuration starts from the SAME dense model per seed (``benchmarks._dense``: trained to
convergence, seed = training seed = calibration seed), is cut to 2x/4x/8x/16x fewer MACs with no
weight training, BatchNorm statistics re-estimated on the calibration batches (10 x 128 from the
train split), and measured on the test split. Multi-step configurations re-score and re-estimate
BN between steps (still no weight update). Torch-Pruning configurations run through its own
``MetaPruner`` (``flowprune.compare.tp_prune_to_target``), uniform and global.

Every finished (model, seed, target, config) is appended to ``runs/bench/study/<model>.jsonl`` at
once (resume); the summary (mean ± std over seeds) goes to ``docs/results/study_structural.json``
and ``.md`` with ``--doc``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

# name -> (kind, settings). fp: flowprune.prune(...) with these keyword arguments; tp: (method, mode).
CONFIGS: dict[str, tuple[str, dict]] = {
    "agf-paper": ("fp", {"method": "agf-paper", "budget": "layer"}),
    "agf-layer": ("fp", {"method": "agf-paper", "budget": "layer"}),
    "agf-global": ("fp", {"method": "agf-paper", "budget": "global", "normalize": "unit"}),
    "agf-raw-global": ("fp", {"method": "agf-paper", "budget": "global", "score_options": {"feature": "raw"}}),
    "agf-global-s4": ("fp", {"method": "agf-paper", "budget": "global", "steps": 4}),
    "agf-global-s8": ("fp", {"method": "agf-paper", "budget": "global", "steps": 8}),
    "agf-layer-s8": ("fp", {"method": "agf-paper", "budget": "layer", "steps": 8}),
    "agf-macs": ("fp", {"method": "agf-paper", "budget": "macs"}),
    "agfc-macs": ("fp", {"method": "agf", "budget": "macs", "score_options": {"center": True}}),
    "agfc-macs-s8": ("fp", {"method": "agf", "budget": "macs", "steps": 8, "score_options": {"center": True}}),
    "taylor-macs-s8": ("fp", {"method": "taylor", "budget": "macs", "steps": 8}),
    "agf-macs-s8": ("fp", {"method": "agf-paper", "budget": "macs", "steps": 8}),
    "agfc-global": ("fp", {"method": "agf", "budget": "global", "score_options": {"center": True}}),
    "agfc-layer": ("fp", {"method": "agf", "budget": "layer", "score_options": {"center": True}}),
    "agfc-global-s8": ("fp", {"method": "agf", "budget": "global", "steps": 8, "score_options": {"center": True}}),
    "agfc-as-global": ("fp", {"method": "agf", "budget": "global",
                              "score_options": {"center": True, "abs_mode": "after_sum"}}),
    "agfc-raw-global": ("fp", {"method": "agf", "budget": "global",
                               "score_options": {"center": True, "feature": "raw"}}),
    "agfc-as-layer": ("fp", {"method": "agf", "budget": "layer",
                             "score_options": {"center": True, "abs_mode": "after_sum"}}),
    "agfc-as-global-s8": ("fp", {"method": "agf", "budget": "global", "steps": 8,
                                 "score_options": {"center": True, "abs_mode": "after_sum"}}),
    "agfc-as-layer-s8": ("fp", {"method": "agf", "budget": "layer", "steps": 8,
                                "score_options": {"center": True, "abs_mode": "after_sum"}}),
    "agfc-layer-s8": ("fp", {"method": "agf", "budget": "layer", "steps": 8, "score_options": {"center": True}}),
    "agfc-sq-layer": ("fp", {"method": "agf", "budget": "layer", "score_options": {"center": True, "abs_mode": "squared"}}),
    "agfc-sq-global": ("fp", {"method": "agf", "budget": "global", "score_options": {"center": True, "abs_mode": "squared"}}),
    "agfc-sq-block": ("fp", {"method": "agf", "budget": "global", "normalize": "block",
                             "score_options": {"center": True, "abs_mode": "squared"}}),
    "agfc-as-block": ("fp", {"method": "agf", "budget": "global", "normalize": "block",
                             "score_options": {"center": True, "abs_mode": "after_sum"}}),
    "agfc-sq-macs": ("fp", {"method": "agf", "budget": "macs", "score_options": {"center": True, "abs_mode": "squared"}}),
    "agf-sq-global": ("fp", {"method": "agf-paper", "budget": "global", "score_options": {"abs_mode": "squared"}}),
    "agfc-as-global-mc": ("fp", {"method": "agf", "budget": "global", "compensate": True,
                                 "score_options": {"center": True, "abs_mode": "after_sum"}}),
    "agfc-as-layer-mc": ("fp", {"method": "agf", "budget": "layer", "compensate": True,
                                "score_options": {"center": True, "abs_mode": "after_sum"}}),
    "agfc-sq-layer-mc": ("fp", {"method": "agf", "budget": "layer", "compensate": True,
                                "score_options": {"center": True, "abs_mode": "squared"}}),
    "agfc-sq-global-mc": ("fp", {"method": "agf", "budget": "global", "compensate": True,
                                 "score_options": {"center": True, "abs_mode": "squared"}}),
    "taylor-global-mc": ("fp", {"method": "taylor", "budget": "global", "compensate": True}),
    "l2-layer-mc": ("fp", {"method": "l2", "budget": "layer", "compensate": True}),
    "agfc-as-global-mc-auto": ("fp", {"method": "agf", "budget": "global", "compensate": True, "steps": "auto",
                                      "score_options": {"center": True, "abs_mode": "after_sum"}}),
    "agfc-sq-layer-mc-auto": ("fp", {"method": "agf", "budget": "layer", "compensate": True, "steps": "auto",
                                     "score_options": {"center": True, "abs_mode": "squared"}}),
    "taylor-layer": ("fp", {"method": "taylor", "budget": "layer"}),
    "taylor-global": ("fp", {"method": "taylor", "budget": "global"}),
    "taylor-global-s8": ("fp", {"method": "taylor", "budget": "global", "steps": 8}),
    "l2-global": ("fp", {"method": "l2", "budget": "global"}),
    "l2-layer": ("fp", {"method": "l2", "budget": "layer"}),
    "l2-global-s8": ("fp", {"method": "l2", "budget": "global", "steps": 8}),
    "random-layer": ("fp", {"method": "random", "budget": "layer"}),
    "tp-magnitude-uniform": ("tp", {"method": "tp-magnitude", "mode": "auto"}),
    "tp-magnitude-global": ("tp", {"method": "tp-magnitude", "mode": "global"}),
    "tp-taylor-uniform": ("tp", {"method": "tp-taylor", "mode": "auto"}),
    "tp-taylor-global": ("tp", {"method": "tp-taylor", "mode": "global"}),
    "tp-magnitude-uniform-s8": ("tp", {"method": "tp-magnitude", "mode": "auto", "steps": 8}),
    "tp-taylor-global-s8": ("tp", {"method": "tp-taylor", "mode": "global", "steps": 8}),
    "tp-taylor-uniform-s8": ("tp", {"method": "tp-taylor", "mode": "auto", "steps": 8}),
    "tp-bn-scale-uniform": ("tp", {"method": "tp-bn-scale", "mode": "auto"}),
    "tp-bn-scale-global": ("tp", {"method": "tp-bn-scale", "mode": "global"}),
}
GROUPS = {
    "tp-best": [k for k in CONFIGS if k.startswith("tp-")],
    "all": list(CONFIGS),
}
# Names: agf-* = the paper's plain reading (agf-paper); agfc = centred (center=True); -as = abs after the
# per-sample sum; -sq = squared; -layer/-global/-block/-macs = allocation; -sN = N steps with BN
# re-estimation and re-scoring in between (no training); -auto = steps="auto"; -mc = mean compensation.
# The library's default is agfc-as-global-mc.
CALIB_BATCHES, CALIB_BATCH_SIZE = 10, 128


def run_one(key: str, seed: int, target: float, config: str) -> dict:
    from benchmarks._dense import dense_model
    from flowprune.compare import tp_prune_to_target
    from flowprune.data import make_loader
    from flowprune.measure import accuracy, count_macs_params
    from flowprune.pruning.structural import prune
    from flowprune.train import reestimate_bn

    dense, data, info = dense_model(key, seed)
    kind, kw = CONFIGS[config]
    shape = tuple(data.input_shape)
    test = make_loader(data.test, 512)
    t0 = time.perf_counter()
    if kind == "fp":
        kw = dict(kw)
        method = kw.pop("method")
        res = prune(dense, data, method=method, target_macs=target, calib_batches=CALIB_BATCHES,
                    calib_batch_size=CALIB_BATCH_SIZE, seed=seed, measure=False, **kw)
        model, reduction = res.model, res.reduction
    else:
        # Torch-Pruning's MetaPruner, one-shot or along the same geometric schedule as flowprune's
        # multi-step configurations (fresh calibration batches, gradients and BN statistics per step)
        from flowprune.schedules import macs_schedule

        steps = kw.get("steps", 1)
        dm, _ = count_macs_params(dense, shape)
        model = dense
        for s, t_s in enumerate(macs_schedule(target, steps)):
            calib = data.calibration_batches(CALIB_BATCH_SIZE, CALIB_BATCHES, seed=seed * 1000 + s)
            cur, _ = count_macs_params(model, shape)
            model, _info = tp_prune_to_target(model, kw["method"], t_s * cur / dm, input_shape=shape,
                                              batches=calib, mode=kw["mode"], seed=seed)
            reestimate_bn(model, calib)
        m, _ = count_macs_params(model, shape)
        reduction = dm / m
    secs = time.perf_counter() - t0
    acc = accuracy(model, test)
    return {"model": key, "seed": seed, "target": target, "config": config, "acc_bn": acc,
            "reduction": reduction, "dense_acc": info["dense_acc"], "seconds": secs}


def summarise(rows: list[dict]) -> list[dict]:
    by: dict[tuple, list[dict]] = {}
    for r in rows:
        by.setdefault((r["model"], r["config"], r["target"]), []).append(r)
    out = []
    for (model, config, target), rs in sorted(by.items()):
        accs = [r["acc_bn"] for r in rs]
        out.append({"model": model, "config": config, "target": target, "n": len(rs),
                    "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "reduction": statistics.mean(r["reduction"] for r in rs),
                    "seconds": statistics.median(r["seconds"] for r in rs)})
    return out


def table(summary: list[dict], model: str) -> str:
    targets = sorted({s["target"] for s in summary if s["model"] == model})
    configs = sorted({s["config"] for s in summary if s["model"] == model})
    by = {(s["config"], s["target"]): s for s in summary if s["model"] == model}
    lines = ["| config | " + " | ".join(f"{t:g}x" for t in targets) + " |",
             "|---|" + "---|" * len(targets)]
    for c in configs:
        cells = []
        for t in targets:
            s = by.get((c, t))
            cells.append("-" if s is None else f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f} (n={s['n']})")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="cnn1d")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--targets", default="2,4,8,16")
    p.add_argument("--configs", default="all")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--doc", action="store_true", help="write docs/results/study_structural.{json,md}")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    configs: list[str] = []
    for c in args.configs.split(","):
        configs += GROUPS.get(c, [c])
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"unknown config {c!r}; choose from {', '.join(list(CONFIGS) + list(GROUPS))}")
    root = Path("runs/bench/study")
    root.mkdir(parents=True, exist_ok=True)
    all_rows = []
    for key in args.models.split(","):
        f = root / f"{key}.jsonl"
        rows = [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []
        done = {(r["seed"], r["target"], r["config"]) for r in rows}
        for seed in [int(s) for s in args.seeds.split(",")]:
            for target in [float(t) for t in args.targets.split(",")]:
                for c in configs:
                    if (seed, target, c) in done:
                        continue
                    r = run_one(key, seed, target, c)
                    rows.append(r)
                    with f.open("a") as fh:
                        fh.write(json.dumps(r) + "\n")
                    print(f"{key} s{seed} {target:g}x {c:24s} {100 * r['acc_bn']:6.2f}  "
                          f"({r['reduction']:.2f}x, {r['seconds']:.0f} s)", flush=True)
        all_rows += rows
    summary = summarise(all_rows)
    cmd = "python -m benchmarks.study_structural " + " ".join(argv if argv is not None else sys.argv[1:])
    text = [f"Command: `{cmd}`", ""]
    for key in args.models.split(","):
        text += [f"## {key}", "", table(summary, key), ""]
    print("\n".join(text))
    if args.doc:
        Path("docs/results").mkdir(parents=True, exist_ok=True)
        Path("docs/results/study_structural.json").write_text(json.dumps({"command": cmd, "summary": summary,
                                                                          "runs": all_rows}, indent=1))
        Path("docs/results/study_structural.md").write_text("# Study: one-shot structural pruning configurations\n\n"
                                                            + "\n".join(text) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
