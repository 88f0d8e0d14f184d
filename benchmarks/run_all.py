"""Every benchmark behind one command: ``make bench`` (smoke runs) or ``--full`` (the published runs).

    python -m benchmarks.run_all            # the --quick smoke run of every benchmark that has one
    python -m benchmarks.run_all --full     # the commands whose results are in docs/results/ (hours)
    python -m benchmarks.run_all --list     # print the commands only
    python -m benchmarks.run_all --only compare,idap

Benchmarks run one after another (never two at once: they time things on a shared CPU), each
in its own process; the table at the end gives each one's command, exit status and wall time,
and the run stops with exit status 1 when any failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

# name -> (full command: the one behind docs/results, smoke command or None)
BENCHMARKS: dict[str, tuple[str, str | None]] = {
    "compare": ("benchmarks.bench_compare --models cnn1d,resnet20 --doc",
                "benchmarks.bench_compare --models cnn1d --seeds 1 --targets 2x --ft-targets '' "
                "--methods agf,tp-magnitude-uniform --root runs/bench/quick_compare"),
    "study_structural": ("benchmarks.study_structural --models cnn1d,resnet20 --seeds 0 --doc", None),
    "calibration_cost": ("benchmarks.bench_calibration_cost --quick --doc docs/results/calibration_cost.md",
                         "benchmarks.bench_calibration_cost --quick --models cnn1d --repeats 2 --mem-repeats 1"),
    "coverage": ("benchmarks.bench_coverage --suite both", "benchmarks.bench_coverage --suite tv --models "
                 "resnet18,mobilenet_v3_small --inprocess --out runs/bench/quick_coverage"),
    "export": ("benchmarks.bench_export", "benchmarks.bench_export --quick"),
    "hyperflows": ("benchmarks.bench_hyperflows", "benchmarks.bench_hyperflows --quick"),
    "mask_overhead": ("benchmarks.bench_mask_overhead --rounds 7", "benchmarks.bench_mask_overhead --rounds 1 --procs 1"),
    "sparse": ("benchmarks.bench_sparse", None),
    "idap": ("benchmarks.bench_idap --models resnet56 --seeds 0 1 2", "benchmarks.bench_idap --quick"),
    "route": ("benchmarks.bench_route", "benchmarks.bench_route --quick"),
}


def _commands(full: bool, only: list[str]) -> list[tuple[str, str]]:
    unknown = [n for n in only if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}")
    out = []
    for name, (full_cmd, quick_cmd) in BENCHMARKS.items():
        if only and name not in only:
            continue
        cmd = full_cmd if full else quick_cmd
        if cmd is not None:
            out.append((name, cmd))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the published runs (hours), not the smoke runs")
    ap.add_argument("--list", action="store_true", help="print the commands and stop")
    ap.add_argument("--only", default="", help="comma-separated benchmark names")
    args = ap.parse_args(argv)
    cmds = _commands(args.full, [n for n in args.only.split(",") if n])
    if args.list:
        for name, cmd in cmds:
            print(f"{name}: python -m {cmd}")
        return 0
    rows = []
    for name, cmd in cmds:
        print(f"\n=== {name}: python -m {cmd}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(f"{sys.executable} -m {cmd}", shell=True)
        rows.append((name, cmd, rc, time.perf_counter() - t0))
    print(f"\n`python -m benchmarks.run_all{' --full' if args.full else ''}`\n")
    print("| benchmark | command | exit | seconds |\n|---|---|---|---|")
    for name, cmd, rc, sec in rows:
        print(f"| {name} | `python -m {cmd}` | {rc} | {sec:.0f} |")
    return 1 if any(rc != 0 for _, _, rc, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
