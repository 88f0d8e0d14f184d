"""Speed per MACs cut on models people deploy: flowprune's latency target vs its MACs target vs Torch-Pruning.

    python -m benchmarks.bench_speed                                   # CPU, 1 thread: resnet18/resnet50/mobilenet_v2, 2x/4x
    python -m benchmarks.bench_speed --device cuda --quick --out docs/results/speed_gpu_quick  # GPU, < 4 min
    python -m benchmarks.bench_speed --device cuda                     # GPU, every model, 2x/3x/4x
    python -m benchmarks.bench_speed --models resnet50,vit_b_16 --targets 3 --batches 16

torchvision models at 224x224 with random weights (speed does not need trained weights), 1000
classes. Per model and target T (a speed-up for the latency target, a MACs reduction otherwise):

* ``fp-speed-bB``: ``flowprune.prune(model, batches, "l1", target_speedup=T, batch_size=B)``: the
  per-layer latency tables of :mod:`flowprune.latency` measured on this device at batch B (built once
  per model and batch, cached) and the latency knapsack of :mod:`flowprune.plan_latency`;
* ``fp-macs``: flowprune's default (``target_macs=T``, one global ranking of unit-normalised l1
  scores); ``fp-macs-rM``: the same with kept widths rounded to ``M`` (the multiple the latency
  model's probe picked at batch 16, or 8 where it picked less: the question of docs/speed.md
  "the default's widths"); ``fp-layer``: ``budget="layer"`` (uniform per-layer widths);
* ``tp-uniform`` / ``tp-global``: Torch-Pruning 1.6's ``MetaPruner`` with
  ``GroupMagnitudeImportance(p=2)``, its pruning ratio bisected to T x fewer MACs
  (:func:`flowprune.procedures.torch_pruning.tp_prune_to_target`).

Every pruned model of one model is timed with the dense model in ONE interleaved measurement per
batch size (:func:`flowprune.timing.time_models`: warm-up, ``--rounds`` rotated rounds, medians),
eager PyTorch. Each cell: measured speed-up (dense median / pruned median), MACs reduction, and
their ratio ("speed per MAC": 1.0 = time fell as fast as MACs). Goal lines: ``fp-speed`` within 10%
of T at its own batch; ``fp-macs`` speed per MAC >= 0.9 at batch 16 and >= 0.7 at batch 1.

Writes ``docs/results/speed.json`` after every model (a run killed at a time limit keeps what
finished) and ``docs/results/speed.md`` from it (the command in the header). ``--out PREFIX``
writes ``PREFIX.json`` / ``PREFIX.md`` elsewhere. Progress goes to stderr. Works with torch 2.11 /
torchvision 0.26 and later. Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ALL_MODELS = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "convnext_tiny", "efficientnet_b0",
              "vit_b_16")
CPU_DEFAULT_MODELS = ("resnet18", "resnet50", "mobilenet_v2")
QUICK_MODELS = ("resnet50", "mobilenet_v2")
QUICK_VARIANTS = ("fp-speed", "fp-macs", "fp-macs-round", "tp-uniform")
VARIANTS = ("fp-speed", "fp-macs", "fp-macs-round", "fp-layer", "tp-uniform", "tp-global")
SHAPE = (3, 224, 224)
T0 = time.time()


def log(msg: str) -> None:
    print(f"[bench_speed {time.time() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--quick", action="store_true", help="resnet50 + mobilenet_v2 at 3x, batch 1 and 16, fp-speed / "
                   "fp-macs / fp-macs-round / tp-uniform, 3 rounds, short Torch-Pruning searches (GPU: under 4 minutes)")
    p.add_argument("--models", default=None, help=f"comma-separated, from {','.join(ALL_MODELS)}")
    p.add_argument("--targets", default=None, help="comma-separated speed-up / MACs factors (default 2,3,4; CPU 2,4)")
    p.add_argument("--batches", default="1,16", help="batch sizes (default 1,16)")
    p.add_argument("--variants", default=None, help=f"comma-separated, from {','.join(VARIANTS)} (default all; "
                   f"--quick: {','.join(QUICK_VARIANTS)})")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; --quick 3)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p.add_argument("--cache", default=None, help="latency table cache directory (default: flowprune's)")
    p.add_argument("--out", default="docs/results/speed", help="results prefix (PREFIX.json, PREFIX.md)")
    p.add_argument("--merge", action="store_true", help="keep the models already in PREFIX.json (measured by an "
                   "earlier command, listed in the header) and add these")
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    a.models = (a.models.split(",") if a.models else
                list(QUICK_MODELS if a.quick else (ALL_MODELS if cuda else CPU_DEFAULT_MODELS)))
    a.targets = [float(t) for t in (a.targets or ("3" if a.quick else ("2,3,4" if cuda else "2,4"))).split(",")]
    a.batches = [int(b) for b in a.batches.split(",")]
    a.variants = a.variants.split(",") if a.variants else list(QUICK_VARIANTS if a.quick else VARIANTS)
    a.rounds = a.rounds or (3 if a.quick else 5)
    bad = [m for m in a.models if m not in ALL_MODELS] + [v for v in a.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown model/variant {bad}")
    return a


def _calib(n: int = 2, bs: int = 4):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(bs, *SHAPE, generator=g), torch.randint(0, 1000, (bs,), generator=g)) for _ in range(n)]


def _macs(m) -> int:
    from flowprune.measure import count_macs_params

    return count_macs_params(m, SHAPE)[0]


def build_variants(name: str, dense, args, dev, results_model: dict) -> dict:
    """name -> (pruned model, info) for every target and variant (latency models built once per batch)."""
    from flowprune.latency import DeviceTimer, build_latency_model
    from flowprune.procedures.torch_pruning import tp_prune_to_target
    from flowprune.pruning.structural import prune
    from flowprune.units import find_units

    calib = [(x.to(dev), y.to(dev)) for x, y in _calib()]
    x1 = torch.randn(1, *SHAPE, device=dev)
    out, lms = {}, {}
    if "fp-speed" in args.variants or "fp-macs-round" in args.variants:
        units = find_units(dense, x1)
        for b in args.batches:
            t = time.time()
            lms[b] = build_latency_model(dense, units, x1, batch_size=b, device=dev, cache=args.cache,
                                         timer=DeviceTimer(dev, b, model_rounds=args.rounds))
            log(f"{name}: latency tables at batch {b}: {time.time() - t:.1f}s, multiple {lms[b].multiple}, "
                f"predicted reach {lms[b].max_speedup():.1f}x")
            results_model.setdefault("latency_models", {})[str(b)] = lms[b].summary()
    probe_b = max(args.batches)
    rmult = max(8, lms[probe_b].multiple) if lms else 8
    results_model["round_to_tested"] = rmult
    for T in args.targets:
        for v in args.variants:
            t = time.time()
            try:
                if v == "fp-speed":
                    for b in args.batches:
                        r = prune(dense, calib, "l1", target_speedup=T, batch_size=b, latency_model=lms[b],
                                  calib_batches=len(calib), device=dev)
                        out[(f"fp-speed-b{b}", T)] = (r.model, {"latency": r.latency, "widths_sample":
                                                               sorted(set(r.widths.values()))[:12]})
                elif v.startswith("fp-"):
                    kw = {"round_to": rmult} if v == "fp-macs-round" else ({"budget": "layer"} if v == "fp-layer" else {})
                    r = prune(dense, calib, "l1", target_macs=T, device=dev, **kw)
                    key = f"fp-macs-r{rmult}" if v == "fp-macs-round" else v
                    out[(key, T)] = (r.model, {"widths_sample": sorted(set(r.widths.values()))[:12]})
                else:
                    mode = v.split("-")[1]
                    m, info = tp_prune_to_target(dense, "tp-magnitude", T, input_shape=SHAPE, mode=mode,
                                                 tol=0.05 if args.quick else 0.03, max_trials=6 if args.quick else 12)
                    out[(v, T)] = (m, {"tp": info})
            except Exception as e:  # noqa: BLE001 -- a failing variant is recorded, the rest go on
                log(f"{name} {v} {T}x FAILED: {type(e).__name__}: {e}")
                results_model.setdefault("failed", []).append(f"{v} {T}x: {type(e).__name__}: {str(e)[:300]}")
                continue
            log(f"{name}: {v} at {T:g}x built in {time.time() - t:.1f}s")
    return out


def time_cells(name: str, dense, variants: dict, args, dev, results: dict) -> None:
    from flowprune.timing import time_models

    results_model = results["models"][name]
    dense_macs = _macs(dense)
    cells = results_model.setdefault("cells", [])
    macs = {k: _macs(m) for k, (m, _) in variants.items()}
    for b in args.batches:
        models = {"dense": dense, **{f"{k[0]}@{k[1]:g}x": m for k, (m, _) in variants.items()}}
        t = time.time()
        tm = time_models(models, torch.randn(b, *SHAPE), device=dev, rounds=args.rounds, warmup=1,
                         min_round_s=0.05 if dev.type == "cpu" else 0.02)
        log(f"{name}: timed {len(models)} models at batch {b} in {time.time() - t:.1f}s ({tm.describe()})")
        results_model.setdefault("timings", {})[str(b)] = {"describe": tm.describe(), "median": tm.median,
                                                           "q25": tm.q25, "q75": tm.q75, "notes": tm.notes}
        for (v, T), (_, info) in variants.items():
            k = f"{v}@{T:g}x"
            sp = tm.speedup("dense", k)
            red = dense_macs / max(macs[(v, T)], 1)
            cells.append({"model": name, "variant": v, "target": T, "batch": b, "speedup": sp,
                          "speedup_q": list(tm.speedup_range("dense", k)), "macs_reduction": red,
                          "speed_per_mac": sp / red, "info": info})
        results["load_after"] = [round(v, 2) for v in os.getloadavg()]
        results["seconds"] = time.time() - T0
        write(results, args.out)  # after every batch size: a run killed at a time limit keeps what finished


def write(results: dict, prefix: str) -> None:
    from flowprune.report import write_results

    write_results(Path(prefix + ".json"), results)
    Path(prefix + ".md").write_text(markdown(results))


def _goal(c: dict) -> str:
    v, b = c["variant"], c["batch"]
    if v.startswith("fp-speed-b"):
        own = int(v.split("-b")[1]) == b
        ok = abs(c["speedup"] / c["target"] - 1) <= 0.10
        return ("met" if ok else "NOT met") + " (own batch)" if own else ("within 10%" if ok else "off >10%")
    if v == "fp-macs":
        need = 0.9 if b >= 16 else 0.7
        return f"{'met' if c['speed_per_mac'] >= need else 'NOT met'} (>= {need})"
    return ""


def markdown(results: dict) -> str:
    from flowprune.report import format_table

    head = [f"# Speed per MACs cut: latency target vs MACs target vs Torch-Pruning ({results['device_name']})", "",
            f"Command: `{results['command']}`", "",
            *([results["note"], ""] if results.get("note") else []),
            f"torch {results['torch']}, torchvision {results['torchvision']}, Torch-Pruning {results['torch_pruning']}, "
            f"{results['threads']} thread(s), eager; load before {results['load_before']}, after "
            f"{results.get('load_after')}; {results.get('seconds', 0):.0f}s.", "",
            "Each cell: measured speed-up over the dense model (one interleaved measurement of every model of "
            "that network at that batch, medians), the MACs reduction, and speed-up / MACs reduction. "
            "`fp-speed-bB` targets a *speed-up* of T at batch B; every other variant targets T x fewer MACs. "
            "Goal: fp-speed within 10% of T at its own batch; fp-macs speed/MAC >= 0.9 at batch 16, >= 0.7 at "
            "batch 1.", ""]
    rows = []
    for name, r in results["models"].items():
        for c in r.get("cells", []):
            rows.append({"model": name, "variant": c["variant"], "T": f"{c['target']:g}x", "batch": c["batch"],
                         "speed-up": c["speedup"], "MACs x": c["macs_reduction"], "speed/MAC": c["speed_per_mac"],
                         "goal": _goal(c)})
        for f in r.get("failed", []):
            rows.append({"model": name, "variant": "FAILED", "goal": f[:120]})
    body = [format_table(rows, ["model", "variant", "T", "batch", "speed-up", "MACs x", "speed/MAC", "goal"])]
    probes = [f"- {n}: width multiple probed at batch {b}: {lm['multiple']} "
              f"(time per MAC vs best: {lm['probe'].get('per_mac_vs_best')})"
              for n, r in results["models"].items() for b, lm in r.get("latency_models", {}).items()]
    return "\n".join(head + body + ["", "Width multiples chosen by the probe:", ""] + probes) + "\n"


def main(argv=None) -> int:
    import torch_pruning as tp
    import torchvision

    from flowprune.device import resolve_device
    from flowprune.latency import device_name
    from flowprune.models import build_model

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    results = {"command": "python -m benchmarks.bench_speed " + " ".join(sys.argv[1:] if argv is None else argv),
               "device": str(dev), "device_name": device_name(dev), "torch": torch.__version__,
               "torchvision": torchvision.__version__, "torch_pruning": getattr(tp, "__version__", "?"),
               "threads": torch.get_num_threads(), "platform": platform.platform(),
               "load_before": [round(v, 2) for v in os.getloadavg()], "models": {}}
    old = Path(args.out + ".json")
    if args.merge and old.exists():
        prev = json.loads(old.read_text())
        results["command"] = prev["command"] + "` then `" + results["command"]
        results["models"] = {k: v for k, v in prev["models"].items() if k not in args.models}
        results["load_before"] = [prev["load_before"], results["load_before"]]
    for name in args.models:
        log(f"{name}: building (random weights, {SHAPE})")
        torch.manual_seed(0)
        dense = build_model(f"tv:{name}", SHAPE, 1000).eval().to(dev)
        rm = results["models"].setdefault(name, {"dense_macs": _macs(dense)})
        variants = build_variants(name, dense, args, dev, rm)
        time_cells(name, dense, variants, args, dev, results)
        log(f"{name}: done, results written to {args.out}.json/.md")
        del variants, dense
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print(Path(args.out + ".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
