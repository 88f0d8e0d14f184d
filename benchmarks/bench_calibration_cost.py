"""Benchmark: what AGF calibration costs, in time and peak memory, next to plain training (issue 3, item 6).

    python -m benchmarks.bench_calibration_cost           # ResNet-20 / 1x28x28 and 1-D CNN / 1x40
    python -m benchmarks.bench_calibration_cost --quick   # fewer repeats

Time: over the same T = 10 calibration batches of 64 samples, the median (over ``--repeats``
rounds, the three jobs interleaved inside every round) of

* ``train pass`` -- one plain training forward + backward per batch (train mode, mean
  cross-entropy, ``loss.backward()`` filling every weight gradient; no optimizer step);
* ``AGF``        -- ``flowprune.scores.get_score("agf")(model, units, batches)`` with its defaults
  (eval mode, feature gradients only, T = 10); the units are found once beforehand (graph
  analysis is a one-off per model and is reported separately);
* ``TP Taylor``  -- Torch-Pruning 1.6.1's ``GroupTaylorImportance`` as its users run it: forward +
  backward per batch accumulating weight gradients, then the importance of every pruning group
  of a ``DependencyGraph`` built beforehand.

Peak memory: every measurement runs in a FRESH subprocess: build the model and the batches,
warm the code path up on a 2-sample batch, then record the resident set size (``/proc/self/statm``)
and run the job once; the peak is ``ru_maxrss`` (``resource.getrusage``) after the job minus the
RSS before it (valid because the warm-up's own peak stays below the job's; the child checks
and reports it). Inputs are random tensors of the data set's shape (memory does not depend on
the values), so loading a data set does not raise the baseline. Compared: one training step
(forward + backward of one batch of 64) vs the whole AGF calibration over T = 10 batches of 64.
Medians over ``--mem-repeats`` subprocesses.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

CONFIGS = {"resnet20": ("resnet20", (1, 28, 28)), "cnn1d": ("cnn1d", (1, 40))}


def _setup(model_name: str, shape, batch: int, T: int, seed: int = 0):
    from flowprune.models import build_model

    torch.manual_seed(seed)
    model = build_model(model_name, shape, 10)
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g))
               for _ in range(T)]
    return model, batches


def train_pass(model: nn.Module, batches) -> None:
    model.train()
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
    model.zero_grad(set_to_none=True)


def tp_taylor(model: nn.Module, batches, dg, groups) -> dict:
    import torch_pruning as tp

    model.eval()
    for x, y in batches:
        nn.functional.cross_entropy(model(x), y).backward()
    imp = tp.importance.GroupTaylorImportance()
    out = {i: imp(g) for i, g in enumerate(groups)}
    model.zero_grad(set_to_none=True)
    return out


def _tp_groups(model: nn.Module, shape):
    import torch_pruning as tp

    fc = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, *shape))
    groups = list(dg.get_all_groups(ignored_layers=[fc], root_module_types=[nn.modules.conv._ConvNd, nn.Linear]))
    return dg, groups


def time_it(key: str, model_name: str, repeats: int, T: int, batch: int) -> dict:
    """Interleaved timing of the three jobs; medians in seconds."""
    import torch_pruning  # noqa: F401  (imports are not part of the one-off graph analysis time)

    from flowprune.scores import get_score
    from flowprune.units import find_units

    name, shape = CONFIGS[key]
    model, batches = _setup(name, shape, batch, T)
    t0 = time.perf_counter()
    units = find_units(model, torch.randn(1, *shape))
    find_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    dg, groups = _tp_groups(model, shape)
    dg_s = time.perf_counter() - t0
    agf = get_score("agf")
    jobs = {"train pass": lambda: train_pass(model, batches),
            "AGF": lambda: agf(model, units, batches),
            "TP Taylor": lambda: tp_taylor(model, batches, dg, groups)}
    for f in jobs.values():  # warm-up
        f()
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for r in range(repeats):
        order = list(jobs) if r % 2 == 0 else list(reversed(list(jobs)))
        for k in order:
            t = time.perf_counter()
            jobs[k]()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: statistics.median([a / b for a, b in zip(times[k], times["train pass"])]) for k in jobs}
    return {"model": key, "median_s": med, "ratio_vs_train": ratios, "find_units_s": find_s, "tp_graph_s": dg_s,
            "repeats": repeats, "T": T, "batch": batch}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(key: str, job: str, T: int, batch: int) -> dict:
    """Runs in a fresh process: peak RSS increase of one job (bytes)."""
    import gc

    from flowprune.scores import get_score
    from flowprune.units import find_units

    torch.set_num_threads(1)
    name, shape = CONFIGS[key]
    model, batches = _setup(name, shape, batch, T)
    units = find_units(model, torch.randn(1, *shape))
    agf = get_score("agf")
    small = [(x[:2], y[:2]) for x, y in batches[:1]]
    if job == "train step":
        train_pass(model, small)
        run = lambda: train_pass(model, batches[:1])  # noqa: E731
    else:
        agf(model, units, small)
        run = lambda: agf(model, units, batches)  # noqa: E731
    import threading

    gc.collect()
    before = _rss_bytes()
    max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = [before]
    done = threading.Event()

    def sample() -> None:  # RSS sampled every ~0.5 ms during the job: its own peak, whatever came before
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    run()
    done.set()
    th.join()
    max_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sampled = max(peak[0], _rss_bytes()) - before
    exact = max_after - before if max_after > max_before else None
    return {"job": job, "peak_increase": exact if exact is not None else sampled, "sampled_increase": sampled,
            "rss_before": before, "maxrss_before": max_before, "maxrss_after": max_after, "valid": True,
            "method": "ru_maxrss" if exact is not None else "sampled RSS"}


def memory(key: str, repeats: int, T: int, batch: int) -> dict:
    out: dict[str, list[int]] = {"train step": [], "AGF calibration": []}
    valid = True
    how: set[str] = set()
    for _ in range(repeats):
        for job in out:  # interleaved, one fresh process each
            cmd = [sys.executable, "-m", "benchmarks.bench_calibration_cost", "--memory-child", key, job,
                   "--T", str(T), "--batch", str(batch)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rec = json.loads(res.stdout.strip().splitlines()[-1])
            out[job].append(rec["peak_increase"])
            valid = valid and rec["valid"]
            how.add(rec["method"])
    med = {k: statistics.median(v) for k, v in out.items()}
    return {"model": key, "median_peak_increase_bytes": med, "ratio": med["AGF calibration"] / med["train step"],
            "valid": valid, "how": sorted(how), "samples": out}


def render_md(payload: dict) -> str:
    """The results page, from the JSON payload alone (registered in benchmarks/results_pages.py)."""
    trows, mrows = payload["time"], payload["memory"]
    command = payload["command"]
    lines = ["## Calibration cost (AGF vs a plain training pass vs Torch-Pruning Taylor)", "",
             f"Command: `{command.strip()}`  ",
             f"Date: {payload['date']} UTC; torch {payload['torch']}, "
             f"{payload['threads']} thread(s); T = {payload['T']} batches of {payload['batch']}; medians of "
             f"{payload['repeats']} interleaved "
             "rounds (ratios: median of per-round ratios).", "",
             "| model | train pass s | AGF s | AGF / train | TP Taylor s | TP Taylor / train | find_units s (once) |",
             "|---|---|---|---|---|---|---|"]
    for t in trows:
        md, r = t["median_s"], t["ratio_vs_train"]
        lines.append(f"| {t['model']} | {md['train pass']:.3f} | {md['AGF']:.3f} | {r['AGF']:.2f}x | "
                     f"{md['TP Taylor']:.3f} | {r['TP Taylor']:.2f}x | {t['find_units_s']:.2f} |")
    lines += ["", f"Peak memory increase (ru_maxrss after minus RSS before, fresh subprocess per measurement, "
              f"median of {payload['mem_repeats']}):", "",
              "| model | train step (1 batch) MiB | AGF calibration (T batches) MiB | AGF / train | peak from |",
              "|---|---|---|---|---|"]
    for m in mrows:
        md = m["median_peak_increase_bytes"]
        if m["valid"]:
            lines.append(f"| {m['model']} | {md['train step'] / 2**20:.1f} | {md['AGF calibration'] / 2**20:.1f} | "
                         f"{m['ratio']:.2f}x | {', '.join(m['how'])} |")
        else:
            lines.append(f"| {m['model']} | - | - | - | no: the job's peak stayed below the set-up's peak "
                         "(too small to see in RSS) |")
    lines += ["", "Goals: AGF calibration time <= 0.8x a plain training pass over the same batches: "
              + ", ".join(f"{t['model']} {t['ratio_vs_train']['AGF']:.2f}x "
                          f"(**{'met' if t['ratio_vs_train']['AGF'] <= 0.8 else 'not met'}**)" for t in trows)
              + "; peak memory <= 1.5x a training step: "
              + ", ".join(f"{m['model']} {m['ratio']:.2f}x (**{'met' if m['ratio'] <= 1.5 else 'not met'}**)"
                          if m["valid"] else f"{m['model']} not measurable" for m in mrows) + "."]
    return "\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", default="resnet20,cnn1d")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--mem-repeats", type=int, default=3)
    p.add_argument("--T", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--doc", default=None, help="write this results page (docs/results/calibration_cost.md) "
                   "and its JSON beside it")
    p.add_argument("--memory-only", action="store_true", help="skip the timing part")
    p.add_argument("--memory-child", nargs=2, metavar=("MODEL", "JOB"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child[0], args.memory_child[1], args.T, args.batch)))
        return 0
    if args.quick:
        args.repeats, args.mem_repeats = 3, 1
    command = "python -m benchmarks.bench_calibration_cost " + " ".join(argv if argv is not None else sys.argv[1:])
    trows, mrows = [], []
    for key in args.models.split(","):
        if not args.memory_only:
            trows.append(time_it(key, key, args.repeats, args.T, args.batch))
        m = memory(key, args.mem_repeats, args.T, args.batch)
        mrows.append(m)
    payload = {"command": command.strip(), "date": f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M}",
               "torch": torch.__version__, "threads": args.threads, "T": args.T, "batch": args.batch,
               "repeats": args.repeats, "mem_repeats": args.mem_repeats, "time": trows, "memory": mrows}
    print(render_md(payload))
    if args.doc:  # docs/results/<name>.json + .md through the one writer (benchmarks/results_pages.py)
        from benchmarks.results_pages import write_page

        doc = Path(args.doc)
        write_page(doc.stem, payload, doc.parent)
    Path("runs/bench").mkdir(parents=True, exist_ok=True)
    Path("runs/bench/calibration_cost.json").write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
