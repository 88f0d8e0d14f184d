"""IDAP++ benchmark (issue 11): MACs cut within a 1-point budget that holds on the test split.

    python -m benchmarks.bench_idap --models resnet56 --seeds 0     # one seed (resumable)
    python -m benchmarks.bench_idap --models resnet56 --seeds 0 1 2 --report   # tables over seeds
    python -m benchmarks.bench_idap --quick                          # ResNet-20 on digits (smoke test)

For every model and seed: train the dense model once (cached under ``runs/bench/``), then

* ``s1``   stage 1 alone (filters), from the dense model;
* ``s2``   stage 2 alone (layers), from the dense model;
* ``s1+2`` stage 2 run on the ``s1`` result, the budget still measured against the dense model
  (identical to ``idap(stages=(1, 2))`` with the same seed, without redoing stage 1);
* ``s2+1`` stage 1 run on the ``s2`` result, likewise;
* ``agf``  flowprune's default pipeline (``flowprune.prune``: AGF, one shot, BN re-estimation,
  compensation) to the MACs reduction of the best IDAP model of that seed, fine-tuned with as many
  recovery batches (same optimiser, AdamW 1e-3, batch 64) as that IDAP model's recoveries used.

The budget: 1 point of validation accuracy; the recovery's early stop sees one half of the
validation split, the accept/reject decisions the other half (``val_split="split"``); the test
split is only reported (next to every decision in ``runs/bench/idap/<run>/<config>.json``).
Every run checkpoints under ``runs/bench/idap/`` and resumes; each writes its wall time. Batch-1
latency and batch-256 throughput of all models are measured interleaved in rounds in one process
(medians of per-round ratios to the dense model). ``--report`` pools the seeds' ``summary.json``
files into ``runs/bench/idap/<model>_report.json`` and ``.md``: per-seed rows, mean +- std per
configuration, the budget check on test (how often the test drop exceeds the budget, per run and
per accepted decision) and the order comparison.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from flowprune import io
from flowprune.data import load_dataset, make_loader
from flowprune.measure import accuracy, count_macs_params
from flowprune.models import build_model
from flowprune.pruning.idap import idap
from flowprune.report import format_table, write_results
from flowprune.timing import time_models
from flowprune.train import TrainConfig, fit, reestimate_bn

ROOT = Path("runs/bench")
CONFIGS = ("s1", "s2", "s1+2", "s2+1")

DENSE = {
    # 6 epochs at batch 128 (164 SGD steps) plateaued at 96.8% val; batch 32 gives 4x the steps for the same compute
    "resnet56": TrainConfig(epochs=8, lr=0.015, batch_size=32, augment=True),
    "resnet20": TrainConfig(epochs=4, lr=0.05, batch_size=64, augment=False),
    "vit": TrainConfig(epochs=12, lr=2e-3, optimizer="adamw", weight_decay=0.05, batch_size=128, augment=True),
}
# the issue-11 settings: a 1-point budget, recovery capped at 3 epochs x 16 batches of 64, 2 retries
# (2 epochs x 8 batches and 1 retry stopped stage 1 at 1.2x on ResNet-56: runs/bench/idap/*_cheap)
# confidence_z=0: the 3-seed tables of docs/results/idap.md ran without the bound (its default became 1
# afterwards, from the _z1 runs); --set confidence_z=1.0 gives the bounded runs
OPTS = dict(max_drop=0.01, confidence_z=0.0, val_split="split", max_retries=2, recover_epochs=3, recover_batches=16,
            stage2_recover_batches=8, calib_batches=4, calib_batch_size=64)


def dense_model(name: str, data, seed: int) -> torch.nn.Module:
    """The dense model of ``name`` on ``data`` for ``seed``, trained once (resumable) and cached."""
    d = ROOT / f"{data.name}_{name}_s{seed}"
    if (d / "model.json").exists():
        return io.load(d)
    cfg = TrainConfig(**{**DENSE[name].__dict__, "seed": seed})
    torch.manual_seed(seed)
    m = build_model(name, data.input_shape, data.num_classes)
    t0 = time.perf_counter()

    def log_epoch(epoch: int, _m, hist: dict) -> bool:
        print(f"dense {name} seed {seed} epoch {epoch}/{cfg.epochs}: {json.dumps(hist['epochs'][-1])} "
              f"({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
        return False

    fit(m, data, cfg, checkpoint_dir=d / "train", progress=False, on_epoch_end=log_epoch)
    io.save(m, d, metadata={"stage": "dense", "seed": seed, "train_seconds": time.perf_counter() - t0,
                            "train_config": cfg.__dict__})
    return io.load(d)


def run_config(tag: str, model, data, seed: int, out: Path, opts: dict, **kw):
    """One IDAP run, checkpointed under ``out/tag``; its results (with wall time) in ``out/tag.json``."""
    f = out / f"{tag}.json"
    res = idap(model, data, checkpoint_dir=out / tag, seed=seed, progress=False, **opts, **kw)
    io.save(res.model, out / f"{tag}_model")
    write_results(f, res.to_dict())
    print(f"{out.name} {tag}: MACs {res.final['macs_reduction']:.2f}x, val drop {100 * res.final['drop']:.2f}, "
          f"test {100 * res.final['test_accuracy']:.2f}% ({res.seconds / 60:.1f} min): {res.stop_reason[:90]}",
          flush=True)
    return res


def recovery_batches(res, opts: dict) -> int:
    """Training batches IDAP's recoveries used (stage-1 epochs x batches, stage-2 recoveries x batches)."""
    n = 0
    for s in res.steps:
        if s.get("stage") == 1:
            n += s.get("recovery_epochs", 0) * opts["recover_batches"]
        elif s.get("stage") == 2 and s.get("recovered"):
            n += opts["stage2_recover_batches"]
    return n


def agf_baseline(dense, data, seed: int, target: float, batches: int, out: Path, opts: dict):
    """flowprune.prune (AGF default pipeline) to ``target`` x fewer MACs, then ``batches`` of fine-tuning."""
    from flowprune import prune

    d = out / "agf_model"
    if (d / "model.json").exists() and (out / "agf.json").exists():
        return io.load(d), json.loads((out / "agf.json").read_text())
    t0 = time.perf_counter()
    res = prune(dense, data, target_macs=target, seed=seed, progress=False)
    m = res.model
    calib = data.calibration_batches(opts["calib_batch_size"], opts["calib_batches"], seed=seed, split="train")
    per_epoch = math.ceil(len(data.train) / opts["calib_batch_size"])
    epochs = max(1, math.ceil(batches / per_epoch))
    if batches > 0:
        ft = TrainConfig(epochs=epochs, lr=1e-3, optimizer="adamw", weight_decay=0.0,
                         batch_size=opts["calib_batch_size"], augment=False, schedule="constant", seed=seed)
        fit(m, data, ft, max_batches_per_epoch=math.ceil(batches / epochs), val_data=calib[:1], progress=False)
        reestimate_bn(m, calib)
    info = {"target_macs": target, "finetune_batches": batches, "seconds": time.perf_counter() - t0,
            "val_accuracy": accuracy(m, make_loader(data.val, 256))}
    io.save(m, d)
    write_results(out / "agf.json", info)
    return io.load(d), info


def speed(models: dict, shape, rounds: int) -> dict:
    """Batch-1 latency and batch-256 throughput: every model timed together (flowprune.timing), medians."""
    out = {k: {} for k in models}
    for b in (1, 256):
        t = time_models(models, torch.randn(b, *shape), rounds=rounds, warmup=2, min_round_s=0.05)
        for k in models:
            if b == 1:
                out[k].update(b1_ms=1e3 * t.median[k], b1_speedup=t.speedup("dense", k))
            else:
                out[k].update(b256_per_s=256 / t.median[k], b256_speedup=t.speedup("dense", k))
    return out


def bench_model(name: str, dataset: str, seed: int, opts: dict, rounds: int, tag: str = "",
                configs: tuple[str, ...] = CONFIGS, with_agf: bool = True) -> dict:
    """Run ``configs`` (and the runs they start from) for one seed; time all models; write summary.json."""
    data = load_dataset(dataset, seed=seed)
    dense = dense_model(name, data, seed).eval()
    out = ROOT / "idap" / f"{dataset}_{name}_s{seed}{tag}"
    want = set(configs) | {"s1" for c in configs if c == "s1+2"} | {"s2" for c in configs if c == "s2+1"}
    res = {}
    if "s1" in want:
        res["s1"] = run_config("s1", dense, data, seed, out, opts, stages=(1,))
    if "s2" in want:
        res["s2"] = run_config("s2", dense, data, seed, out, opts, stages=(2,))
    if "s1+2" in want:
        res["s1+2"] = run_config("s1+2", res["s1"].model, data, seed, out, opts, stages=(2,), reference=dense)
    if "s2+1" in want:
        res["s2+1"] = run_config("s2+1", res["s2"].model, data, seed, out, opts, stages=(1,), reference=dense)
    both = [k for k in ("s1+2", "s2+1") if k in res] or list(res)
    best = max(both, key=lambda k: res[k].final["macs_reduction"])
    first = {"s1+2": "s1", "s2+1": "s2"}
    spent = recovery_batches(res[best], opts) + (recovery_batches(res[first[best]], opts) if best in first else 0)
    models = {"dense": dense, **{k: r.model for k, r in res.items()}}
    agf_info = {}
    if with_agf:
        models["agf"], agf_info = agf_baseline(dense, data, seed, res[best].final["macs_reduction"], spent, out, opts)
    sp = speed(models, data.input_shape, rounds)
    test = make_loader(data.test, 512)
    dmacs, dparams = count_macs_params(dense, data.input_shape)
    accs = {k: accuracy(m, test) for k, m in models.items()}  # one test pass per model
    dacc = accs["dense"]
    rows = []
    for tag, m in models.items():
        macs, params = count_macs_params(m, data.input_shape)
        r = res.get(tag)
        steps = r.steps if r is not None else []
        prev = res.get(first.get(tag, ""))
        secs = (r.seconds + (prev.seconds if prev is not None else 0.0) if r is not None
                else agf_info["seconds"] if tag == "agf" else 0.0)
        removed = (r.removed_blocks + (prev.removed_blocks if prev is not None else [])) if r is not None else []
        rows.append({"model": name, "seed": seed, "config": tag, "dense test %": 100 * dacc,
                     "test %": 100 * accs[tag], "test drop pts": 100 * (dacc - accs[tag]),
                     "val drop pts": 100 * r.final["drop"] if r is not None else None,
                     "MACs x": dmacs / macs, "params x": dparams / params, "blocks removed": len(removed),
                     "decisions": sum(s.get("stage") in (1, 2) for s in steps),
                     "b1 speedup": sp[tag]["b1_speedup"], "b256 speedup": sp[tag]["b256_speedup"],
                     "b1 ms": sp[tag]["b1_ms"], "b256 img/s": sp[tag]["b256_per_s"], "minutes": secs / 60,
                     "stop": r.stop_reason[:80] if r is not None else ("" if tag == "dense" else
                             f"agf to {agf_info['target_macs']:.2f}x + {agf_info['finetune_batches']} batches")})
    summary = {"rows": rows, "speed": sp, "opts": opts, "agf": agf_info,
               "agf_matches": [k for k, r in res.items() if agf_info and abs(r.final["macs_reduction"] - agf_info["target_macs"]) < 1e-9],
               "decisions": {k: r.steps for k, r in res.items()}, "date": str(_dt.date.today())}
    write_results(out / "summary.json", summary)
    return summary


COLS = ["model", "seed", "config", "dense test %", "test %", "test drop pts", "val drop pts", "MACs x", "params x",
        "blocks removed", "decisions", "b1 speedup", "b256 speedup", "b1 ms", "b256 img/s", "minutes", "stop"]


def _ms(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def report(name: str, dataset: str, seeds: list[int], budget_pts: float, tag: str = "") -> str:
    """Pool the seeds' summaries: per-seed rows, mean ± std per config, the budget check on test."""
    sums = {}
    for s in seeds:
        f = ROOT / "idap" / f"{dataset}_{name}_s{s}{tag}" / "summary.json"
        if f.exists():
            sums[s] = json.loads(f.read_text())
    rows = [r for s in sums.values() for r in s["rows"]]
    agg = []
    for conf in ("dense", *CONFIGS, "agf"):
        rr = [r for r in rows if r["config"] == conf]
        if not rr:
            continue
        agg.append({"config": conf, "seeds": len(rr), **{k: _ms([r[k] for r in rr]) for k in
                    ("test %", "test drop pts", "val drop pts", "MACs x", "params x", "blocks removed",
                     "b1 speedup", "b256 speedup", "minutes")},
                    "test drop > budget": f"{sum(r['test drop pts'] > budget_pts + 1e-9 for r in rr)}/{len(rr)}"})
    dec = [d for s in sums.values() for steps in s["decisions"].values() for d in steps
           if d.get("accepted") and d.get("stage") in (1, 2) and d.get("test_drop") is not None]
    over = sum(100 * d["test_drop"] > budget_pts + 1e-9 for d in dec)
    runs = [r for r in rows if r["config"] in CONFIGS]
    n_over = sum(r["test drop pts"] > budget_pts + 1e-9 for r in runs)
    text = (f"Seeds found: {sorted(sums)} of {seeds}\n\n" + format_table(rows, COLS, title="per seed") + "\n\n"
            + format_table(agg, title="mean ± std over seeds") + "\n\n"
            f"Budget check on test: {n_over}/{len(runs)} IDAP runs end with a test drop above {budget_pts:g} pt; "
            f"{over}/{len(dec)} accepted decisions had a test drop above it.\n")
    write_results(ROOT / "idap" / f"{dataset}_{name}{tag}_report.json",
                  {"rows": rows, "mean_std": agg, "runs_over_budget": [n_over, len(runs)],
                   "decisions_over_budget": [over, len(dec)], "seeds": sorted(sums)})
    (ROOT / "idap" / f"{dataset}_{name}{tag}_report.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="ResNet-20 on digits, short schedule (smoke test)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--models", nargs="+", default=["resnet56"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--dense-only", action="store_true", help="only train (and cache) the dense models")
    p.add_argument("--report", action="store_true", help="only pool the finished seeds into the report")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS,
                   help="which IDAP runs (s1+2 also runs s1, s2+1 also runs s2; finished ones resume at once)")
    p.add_argument("--no-agf", action="store_true", help="skip the AGF baseline")
    p.add_argument("--tag", default="", help="suffix of the output folders (a variant of the settings)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="override an idap option (recover_batches=6)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    opts = {**OPTS, **{k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)}}
    models, dataset = args.models, "mnist5k"
    if args.quick:
        models, dataset = ["resnet20"], "digits"
        opts.update(max_drop=0.05, max_steps=2, recover_batches=3, stage2_recover_batches=2)
    for n in models:
        if args.report:
            print(report(n, dataset, args.seeds, 100 * opts["max_drop"], args.tag))
            continue
        for s in args.seeds:
            if args.dense_only:
                dense_model(n, load_dataset(dataset, seed=s), s)
            else:
                summ = bench_model(n, dataset, s, opts, args.rounds, args.tag, tuple(args.configs),
                                   not args.no_agf)
                print(format_table(summ["rows"], COLS, title=f"{n} seed {s}"), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
