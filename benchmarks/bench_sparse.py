"""Dense vs CSR execution per layer type: where does the sparse path start to pay?

    python -m benchmarks.bench_sparse                      # all layers, batches 1 and 256, 1 thread
    python -m benchmarks.bench_sparse --layers linear,conv1x1 --batches 1 --reps 9 --out runs/bench_sparse

For each layer (shapes taken from the models flowprune ships), each batch size and each
sparsity, the layer's weight is magnitude-pruned (global |w| threshold on a random init) and the
dense layer (``F.linear`` / oneDNN convolution) and its CSR form
(:func:`flowprune.sparse.sparse_layer`: ``torch.sparse.mm`` on MKL, convolutions through im2col,
1x1 / size-1 kernels without it) are called in interleaved rounds on the same input. Medians of
``--reps`` (batch <= 16) or ``--reps-large`` calls in each of ``--passes`` sweeps over all points
(run one after the other, pooled); speed-up = dense time / sparse time. The crossover is the lowest measured
sparsity from which the sparse form is faster at that and every higher measured sparsity
("never" when it is not faster at the highest one). The outputs are checked equal (``allclose``)
before timing. Writes ``OUT/results.json`` and prints a table with the command and load average.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from flowprune.report import format_table
from flowprune.sparse import sparse_layer
from flowprune.timing import time_callables

LAYERS = {
    # name: (what, factory, input shape without the batch)
    "linear": ("Linear 784->300 (LeNet-300-100 fc1)", lambda: nn.Linear(784, 300), (784,)),
    "conv3x3": ("Conv2d 3x3 64->64, 7x7 map (ResNet-20 stage 3, 28x28 input)",
                lambda: nn.Conv2d(64, 64, 3, padding=1, bias=False), (64, 7, 7)),
    "conv3x3_14": ("Conv2d 3x3 32->32, 14x14 map (ResNet-20 stage 2, 28x28 input)",
                   lambda: nn.Conv2d(32, 32, 3, padding=1, bias=False), (32, 14, 14)),
    "conv1x1": ("Conv2d 1x1 64->64, 14x14 map", lambda: nn.Conv2d(64, 64, 1, bias=False), (64, 14, 14)),
    "conv1d": ("Conv1d k3 s2 64->128, length 20 (cnn1d stage 3, mnist1d)",
               lambda: nn.Conv1d(64, 128, 3, stride=2, padding=1, bias=False), (64, 20)),
}
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


def pruned_layer(name: str, sparsity: float, seed: int = 0) -> nn.Module:
    """The layer with its ``sparsity`` smallest-magnitude weights set to exactly zero."""
    torch.manual_seed(seed)
    layer = LAYERS[name][1]().eval()
    w = layer.weight.detach()
    k = int(round(sparsity * w.numel()))
    if k:
        thr = w.abs().flatten().kthvalue(k).values
        with torch.no_grad():
            layer.weight.mul_((w.abs() > thr).float())
    return layer


def time_pair(dense: nn.Module, sparse: nn.Module, x: torch.Tensor, reps: int) -> tuple[list[float], list[float]]:
    """Seconds per call of each in ``reps`` interleaved rounds (flowprune.timing), after two warm-up calls each."""
    with torch.no_grad():
        t = time_callables({"dense": lambda: dense(x), "sparse": lambda: sparse(x)}, rounds=reps, warmup=2,
                           min_round_s=0.0)
    return t.samples["dense"], t.samples["sparse"]


def crossover(points: list[tuple[float, float]]) -> str:
    """Lowest sparsity from which speed-up > 1 holds at it and every higher one; ``never`` otherwise."""
    best = None
    for s, speed in sorted(points, reverse=True):
        if speed <= 1.0:
            break
        best = s
    return "never" if best is None else f"{best:g}"


def measure(name: str, batch: int, sparsities, reps: int, reps_large: int) -> dict:
    """``{sparsity: (dense seconds, sparse seconds, nnz)}`` for one pass over the sparsities."""
    shape = LAYERS[name][2]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *shape, generator=g)
    out = {}
    for s in sparsities:
        dense = pruned_layer(name, s)
        sparse = sparse_layer(dense)
        with torch.no_grad():
            if not torch.allclose(sparse(x), dense(x), atol=1e-4, rtol=1e-4):
                raise AssertionError(f"{name} at sparsity {s}: sparse output differs from dense")
        td, ts = time_pair(dense, sparse, x, reps if batch <= 16 else reps_large)
        out[s] = (td, ts, int(sparse.nnz))
    return out


def pooled_points(name: str, batch: int, passes: list[dict]) -> list[dict]:
    """Medians over the calls of every pass, per sparsity."""
    rows = []
    for s in passes[0]:
        td = [t for p in passes for t in p[s][0]]
        ts = [t for p in passes for t in p[s][1]]
        md, msp = statistics.median(td), statistics.median(ts)
        rows.append({"layer": name, "batch": batch, "sparsity": s, "dense_ms": 1e3 * md, "sparse_ms": 1e3 * msp,
                     "speedup": md / msp, "calls_each": len(td), "nnz": passes[0][s][2],
                     "speedup_per_pass": [statistics.median(p[s][0]) / statistics.median(p[s][1]) for p in passes]})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default=",".join(LAYERS), help=f"comma-separated, from {', '.join(LAYERS)}")
    ap.add_argument("--batches", default="1,256")
    ap.add_argument("--sparsities", default=",".join(f"{s:g}" for s in SPARSITIES))
    ap.add_argument("--reps", type=int, default=51, help="timed calls of each form per point at batch <= 16")
    ap.add_argument("--reps-large", type=int, default=15, help="timed calls of each form per point at batch > 16")
    ap.add_argument("--passes", type=int, default=3, help="sweeps over all points, one after the other (pooled)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/bench_sparse")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers = [s for s in args.layers.split(",") if s]
    for n in layers:
        if n not in LAYERS:
            ap.error(f"unknown layer {n!r}; choose from {', '.join(LAYERS)}")
    batches = [int(b) for b in args.batches.split(",")]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    cmd = "python -m benchmarks.bench_sparse" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = [os.getloadavg()[0]]
    t0 = time.perf_counter()
    points: list[dict] = []
    summary: list[dict] = []
    raw: dict = {}
    for i in range(args.passes):  # whole sweeps one after the other, so load spikes hit one pass, not one point
        for n in layers:
            for b in batches:
                raw.setdefault((n, b), []).append(measure(n, b, sparsities, args.reps, args.reps_large))
        load.append(os.getloadavg()[0])
        print(f"[pass {i + 1}/{args.passes}] done", file=sys.stderr, flush=True)
    for n in layers:
        row = {"layer": n, "shape": LAYERS[n][0]}
        for b in batches:
            pts = pooled_points(n, b, raw[(n, b)])
            points += pts
            row[f"crossover b{b}"] = crossover([(p["sparsity"], p["speedup"]) for p in pts])
            best = max(pts, key=lambda p: p["speedup"])
            row[f"best speed-up b{b}"] = f"{best['speedup']:.2f} @ {best['sparsity']:g}"
        summary.append(row)
    seconds = time.perf_counter() - t0
    print(f"`{cmd}` (started {started}, {args.threads} thread(s), torch {torch.__version__}, load average "
          f"{min(load):.1f}-{max(load):.1f}, {seconds:.0f} s)\n")
    print(format_table(summary, title="Sparsity from which the CSR path beats dense, per layer type"))
    detail = [{"layer": p["layer"], "batch": p["batch"], "sparsity": p["sparsity"], "dense ms": f"{p['dense_ms']:.3f}",
               "sparse ms": f"{p['sparse_ms']:.3f}", "speed-up": f"{p['speedup']:.2f}",
               "per pass": " / ".join(f"{v:.2f}" for v in p["speedup_per_pass"])} for p in points]
    print()
    print(format_table(detail, title="All points (medians, interleaved)"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        {"command": cmd, "started": started, "threads": args.threads, "torch": torch.__version__,
         "load_avg_1min": load, "seconds": seconds, "layers": {n: LAYERS[n][0] for n in layers},
         "summary": summary, "points": points}, indent=1))
    print(f"\nsaved {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
