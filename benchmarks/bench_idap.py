"""IDAP++ benchmark: MACs reduction within a 1-point budget, stage 1 / stage 2 / both orders, latency.

    python -m benchmarks.bench_idap                 # ResNet-56 and the ViT on mnist5k, seed 0
    python -m benchmarks.bench_idap --quick         # ResNet-20 on digits, 3 steps (smoke test)
    python -m benchmarks.bench_idap --seeds 0 1 2   # the issue's 3 seeds (about 3x the time)

For every model and seed: train the dense model once (cached under ``runs/bench/``), then

* ``s1``   stage 1 alone (filters), from the dense model;
* ``s2``   stage 2 alone (layers), from the dense model;
* ``s1+2`` stage 2 run on the ``s1`` result, the budget still measured against the dense model
  (identical to ``idap(stages=(1, 2))`` with the same seed, without redoing stage 1);
* ``s2+1`` stage 1 run on the ``s2`` result, likewise.

Every run checkpoints under ``runs/bench/idap/`` and resumes. Latency at batch 1 is measured for
all five models interleaved in rounds in one process (medians; ratios to the dense model). The
Markdown table is printed and written to ``runs/bench/idap/table.md`` (``--no-write`` to skip);
``docs/results/idap.md`` holds the measured table with the goals list.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from flowprune import io
from flowprune.data import load_dataset, make_loader
from flowprune.measure import accuracy, count_macs_params, latency
from flowprune.models import build_model
from flowprune.pruning.idap import idap
from flowprune.report import format_table, write_results
from flowprune.train import TrainConfig, fit

ROOT = Path("runs/bench")

DENSE = {
    # lr 0.05 did not learn in one epoch (BasicBlock CIFAR ResNet, no zero-init of the last BN); lr 0.02,
    # 6 epochs: 96.8% val / 95.8% test on mnist5k seed 0 (14 min, 1 thread; docs/results/idap.md)
    "resnet56": TrainConfig(epochs=6, lr=0.02, batch_size=128, augment=True),
    "resnet20": TrainConfig(epochs=4, lr=0.05, batch_size=64, augment=False),
    "vit": TrainConfig(epochs=12, lr=2e-3, optimizer="adamw", weight_decay=0.05, batch_size=128, augment=True),
}


def dense_model(name: str, data, seed: int) -> torch.nn.Module:
    d = ROOT / f"{data.name}_{name}_s{seed}"
    if (d / "model.json").exists():
        return io.load(d)
    shared = ROOT / f"{data.name}_{name}"  # a dense model cached by `flowprune train --out runs/bench/...`
    if (shared / "results.json").exists() and (shared / "model.json").exists():
        info = json.loads((shared / "results.json").read_text())
        if info.get("seed") == seed and info.get("data") == data.name:
            return io.load(shared)
    cfg = DENSE[name]
    cfg = TrainConfig(**{**cfg.__dict__, "seed": seed})
    torch.manual_seed(seed)
    m = build_model(name, data.input_shape, data.num_classes)
    t0 = time.perf_counter()
    fit(m, data, cfg, checkpoint_dir=d / "train", progress=False)
    io.save(m, d, metadata={"stage": "dense", "seed": seed, "train_seconds": time.perf_counter() - t0})
    return io.load(d)


def run_config(tag: str, model, data, seed: int, out: Path, opts: dict, **kw):
    f = out / f"{tag}.json"
    res = idap(model, data, checkpoint_dir=out / tag, seed=seed, **opts, **kw)
    io.save(res.model, out / f"{tag}_model")
    write_results(f, res.to_dict())
    return res


def _stage1_counts(steps: list[dict]) -> str:
    """``accepted/retries`` over the stage-1 history entries (a retry = a try with ``retry > 0``)."""
    s1 = [s for s in steps if s.get("stage") == 1]
    return f"{sum(bool(s['accepted']) for s in s1)}/{sum(s.get('retry', 0) > 0 for s in s1)}"


def bench_model(name: str, dataset: str, seed: int, opts: dict, rounds: int) -> list[dict]:
    data = load_dataset(dataset, seed=seed)
    dense = dense_model(name, data, seed).eval()
    out = ROOT / "idap" / f"{dataset}_{name}_s{seed}"
    t0 = time.perf_counter()
    r1 = run_config("s1", dense, data, seed, out, opts, stages=(1,))
    t1 = time.perf_counter()
    r2 = run_config("s2", dense, data, seed, out, opts, stages=(2,))
    t2 = time.perf_counter()
    r12 = run_config("s1+2", r1.model, data, seed, out, opts, stages=(2,), reference=dense)
    t3 = time.perf_counter()
    r21 = run_config("s2+1", r2.model, data, seed, out, opts, stages=(1,), reference=dense)
    t4 = time.perf_counter()
    secs = {"s1": t1 - t0, "s2": t2 - t1, "s1+2": t3 - t2, "s2+1": t4 - t3}
    models = {"dense": dense, "s1": r1.model, "s2": r2.model, "s1+2": r12.model, "s2+1": r21.model}
    lat: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):  # interleaved rounds: the shared machine's load hits every model alike
        for k, m in models.items():
            lat[k].append(latency(m, data.input_shape, batch_size=1, warmup=5, repeats=20))
    # per-round ratios to the dense model, then the median over rounds (robust to load changes)
    lat_med = {k: statistics.median(v) for k, v in lat.items()}
    ratio = {k: statistics.median(a / b for a, b in zip(lat[k], lat["dense"])) for k in lat}
    test = make_loader(data.test, 512)
    dmacs, dparams = count_macs_params(dense, data.input_shape)
    dacc = accuracy(dense, test)
    rows = []
    removed = {"s1": [], "s2": r2.removed_blocks, "s1+2": r12.removed_blocks, "s2+1": r2.removed_blocks}
    for tag, res in (("s1", r1), ("s2", r2), ("s1+2", r12), ("s2+1", r21)):
        m = models[tag]
        macs, params = count_macs_params(m, data.input_shape)
        rows.append({"model": name, "seed": seed, "config": tag, "dense test %": 100 * dacc,
                     "test %": 100 * accuracy(m, test), "val drop pts": 100 * res.final["drop"],
                     "MACs x": dmacs / macs, "params x": dparams / params, "blocks removed": len(removed[tag]),
                     "s1 steps ok/retried": _stage1_counts(res.steps),
                     "MACs share removed": 1 - macs / dmacs, "latency gain": 1 - ratio[tag],
                     "b1 speedup": 1 / ratio[tag], "b1 ms": 1e3 * lat_med[tag], "minutes": secs[tag] / 60,
                     "stop": res.stop_reason[:60]})
    write_results(out / "summary.json", {"rows": rows, "latency_s": lat, "dense_b1_ms": 1e3 * lat_med["dense"],
                                         "seconds": secs})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="ResNet-20 on digits, short schedule (smoke test)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--models", nargs="+", default=["resnet56", "vit"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dense-only", action="store_true", help="only train (and cache) the dense models")
    p.add_argument("--no-write", action="store_true", help="do not write docs/results/idap.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cmd = "python -m benchmarks.bench_idap " + " ".join(sys.argv[1:] if argv is None else argv)
    opts = dict(max_drop=0.01, max_retries=2, recover_epochs=2, recover_batches=10, stage2_recover_batches=5, calib_batches=4,
                calib_batch_size=64)
    models, dataset, rounds = args.models, "mnist5k", 7
    if args.quick:
        models, dataset, rounds = ["resnet20"], "digits", 3
        opts.update(max_drop=0.02, max_steps=3, recover_batches=5, stage2_recover_batches=3)
    if args.dense_only:
        for s in args.seeds:
            for n in models:
                dense_model(n, load_dataset(dataset, seed=s), s)
        return 0
    t0 = time.perf_counter()
    rows = []
    for s in args.seeds:
        for n in models:
            rows += bench_model(n, dataset, s, opts, rounds)
    cols = ["model", "seed", "config", "dense test %", "test %", "val drop pts", "MACs x", "params x",
            "blocks removed", "s1 steps ok/retried", "MACs share removed", "latency gain", "b1 speedup", "b1 ms", "minutes", "stop"]
    table = format_table(rows, cols, title=f"`{cmd}`  ({dataset}, budget {100 * opts['max_drop']:.0f} point(s) "
                                           f"val accuracy, torch threads {args.threads})")
    print(table)
    wall = (time.perf_counter() - t0) / 60
    print(f"\nwall time {wall:.1f} min; settings {json.dumps(opts)}")
    if not args.no_write and not args.quick:
        raw = ROOT / "idap" / "table.md"
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.write_text(f"Command: `{cmd}`  \nDate: {_dt.date.today()}  \nWall time: {wall:.1f} min  \n"
                       f"Settings: `{json.dumps(opts)}`\n\n{table}\n")
        print(f"wrote {raw} (copy it into docs/results/idap.md with the goals list)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
