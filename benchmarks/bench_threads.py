"""Benchmark: torch's thread default vs flowprune's (idle cores) with one other busy process (issue 23).

    python -m benchmarks.bench_threads                 # writes docs/results/threads.json and threads.md
    python -m benchmarks.bench_threads --rounds 3 --steps 2 --settle 5   # what docs/results/threads.json holds
    python -m benchmarks.bench_threads --from-json     # threads.md again from threads.json

One busy process (a ``while True`` loop, ending with this process) runs beside the whole measurement. The
workload is a short fine-tune: ``--steps`` SGD steps (forward + backward + update) of a CIFAR-style
ResNet-20 on random 1x28x28 batches of 64. Two arms, interleaved in every round, in this process
(``torch.set_num_threads`` between them):

* ``torch default``: torch's own count, one thread per core (``--cores``, default: the CPUs);
* ``flowprune default``: what the ``flowprune`` command sets without ``--threads`` /
  ``FLOWPRUNE_THREADS`` / ``OMP_NUM_THREADS`` (:func:`flowprune.threads.choose`), read once
  after the busy process has run for ``--settle`` seconds, as the command reads it at its start.

Reported: the median seconds of each arm over ``--rounds`` rounds and their ratio, with the
1-minute load average before and after (the machine may be shared: compare the ratio only).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"
COMMAND = "python -m benchmarks.bench_threads"


def _workload(steps: int) -> float:
    from flowprune.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet20", (1, 28, 28), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return time.perf_counter() - t0


def measure(rounds: int, steps: int, cores: int, settle: float, command: str = COMMAND) -> dict:
    from flowprune import threads

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", threads.ENV_VAR)}
    # busy until this process ends (it checks its parent, so a killed benchmark leaves no spinner)
    busy = subprocess.Popen([sys.executable, "-c", "import os\np = os.getppid()\nwhile os.getppid() == p: pass"])
    try:
        time.sleep(settle)
        load_before = os.getloadavg()[0]
        torch.set_num_threads(cores)
        chosen, why = threads.choose(None, env)
        arms = {"torch default": cores, "flowprune default": chosen if chosen is not None else cores}
        times: dict[str, list[float]] = {a: [] for a in arms}
        _workload(1)  # warm-up
        for r in range(rounds):
            order = list(arms) if r % 2 == 0 else list(reversed(arms))
            for a in order:
                torch.set_num_threads(arms[a])
                times[a].append(_workload(steps))
        load_after = os.getloadavg()[0]
    finally:
        busy.kill()
        busy.wait()
    med = {a: statistics.median(v) for a, v in times.items()}
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "command": command,
            "rounds": rounds, "steps": steps, "cores": cores, "cpus": threads.usable_cpus(),
            "load_before": load_before, "load_after": load_after, "flowprune_choice_reason": why,
            "threads": arms, "seconds": times, "median_seconds": med,
            "slowdown_torch_default_vs_flowprune": med["torch default"] / med["flowprune default"],
            "torch": torch.__version__}


def render(res: dict) -> str:
    lines = [f"<!-- written by `{res['command']}` (with docs/results/threads.json) -->", "",
             "# CPU threads beside one busy process", "",
             f"ResNet-20, {res['steps']} SGD steps on 1x28x28 batches of 64, {res['rounds']} interleaved rounds, "
             f"one busy `while True` loop running beside; {res['cpus']} CPUs, 1-minute load average "
             f"{res['load_before']:.2f} before and {res['load_after']:.2f} after (a shared machine: read the ratio). "
             f"torch {res['torch']}, {res['date']}.", "",
             "| arm | threads | median s | runs s |", "|---|---|---|---|"]
    for a, n in res["threads"].items():
        runs = ", ".join(f"{t:.2f}" for t in res["seconds"][a])
        lines.append(f"| {a} | {n} | {res['median_seconds'][a]:.2f} | {runs} |")
    lines += ["", f"torch's default is {res['slowdown_torch_default_vs_flowprune']:.2f}x the time of flowprune's "
                  f"default here (flowprune chose {res['threads']['flowprune default']} thread(s): "
                  f"{res['flowprune_choice_reason']})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--cores", type=int, default=None, help="torch's default count (default: the usable CPUs)")
    ap.add_argument("--settle", type=float, default=20.0, help="seconds the busy process runs before the choice")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--from-json", action="store_true", help="only rewrite threads.md from OUT/threads.json")
    args = ap.parse_args(argv)
    from flowprune.threads import usable_cpus

    out = Path(args.out)
    if args.from_json:
        res = json.loads((out / "threads.json").read_text())
    else:
        argv = sys.argv[1:] if argv is None else argv
        res = measure(args.rounds, args.steps, args.cores or usable_cpus(), args.settle,
                      " ".join([COMMAND, *argv]))
        out.mkdir(parents=True, exist_ok=True)
        (out / "threads.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "threads.md").write_text(render(res))
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
