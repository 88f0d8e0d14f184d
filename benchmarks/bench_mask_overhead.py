"""Mask training overhead: a Hyperflows training step vs a dense training step, side by side.

    python -m benchmarks.bench_mask_overhead                    # LeNet-300-100 b128 + ResNet-20 b32, 1 thread
    python -m benchmarks.bench_mask_overhead --procs 4 --rounds 5 --malloc both --out runs/bench_mask_overhead

Every measurement runs in ``--procs`` fresh Python processes, one after the other; inside each,
the steps are timed in interleaved rounds (dense, fused, prev, legacy, dense, fused, ...) on the
same input batch; the step times of all processes are pooled and the medians compared.
``--malloc keep`` starts the processes with glibc told to keep freed memory
(``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TOP_PAD_``): with the default
settings a step that frees and re-allocates ~1 MB tensors can hand the top of the heap back to the
OS and page-fault it in again on the next step (hundreds of minor faults per step, which process
and which variant is hit depends on the heap layout). The setting applies to all variants alike;
``both`` measures the two settings. Minor page faults per step and the load average are recorded.

* **dense**: ``net(x)`` -> cross-entropy -> backward -> SGD (Nesterov, momentum 0.9, wd 5e-4).
* **fused** (what :func:`flowprune.pruning.hyperflows.hyperflows_prune` runs now): the weights go
  through :class:`flowprune.pruning.masks.LogitMask`, whose single autograd Function computes
  ``w * 1[m >= 0]`` (float mask by ``torch.ge(m, 0, out=buffer)``) and in the backward ``g * mask`` and
  ``s * w * g + P/N`` (the pressure gradient folded in with one ``addcmul``); the same SGD for
  the weights plus fused Adam for the logits, stepped as the trainer does
  (:func:`flowprune.pruning.hyperflows.adam_step`: the fused kernel without the optimizer's
  per-call Python); the keep mask is written into a buffer reused from step to step.
* **prev** (the fused Function as first committed for issue 10, kept here for the comparison): the
  same kernels, but the float keep mask and the pressure tensor are allocated anew every call,
  and the logits' Adam is stepped through ``optimizer.step()``.
* **legacy** (the implementation before issue 10, kept here for the comparison): bool mask
  ``(m >= 0).to(dtype)``, the pressure as a ``P * mean(m)`` term in the loss, for-loop Adam.

The same SGD implementation (torch's default) is used for the weights in all four, so the ratio
measures the masks only. The ratio of the fastest steps is printed too: on a loaded machine the
medians include waiting for memory bandwidth that other jobs take, which stretches all of them. Writes ``OUT/results.json`` and prints a table and the command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from flowprune.models import build_model
from flowprune.pruning.hyperflows import _fused_kw, adam_step
from flowprune.pruning.masks import (
    install_masks,
    mask_logits,
    masked_modules,
    set_pressure,
    weight_parameters,
)
from flowprune.report import format_table
from flowprune.timing import time_callables


class _LegacyST(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, m, scale):  # type: ignore[override]
        keep = (m >= 0).to(w.dtype)
        ctx.save_for_backward(w, keep)
        ctx.scale = scale
        return w * keep

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        w, keep = ctx.saved_tensors
        return g * keep, (ctx.scale * w) * g, None


class _LegacyMask(nn.Module):
    def __init__(self, logits: torch.Tensor, scale: float):
        super().__init__()
        self.logits = nn.Parameter(logits.detach().clone())
        self.scale = scale

    def forward(self, w):
        return _LegacyST.apply(w, self.logits, self.scale)


class _PrevST(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, m, scale, pressure):  # type: ignore[override]
        keep = m.detach().sign().add_(1).clamp_(max=1).to(w.dtype)
        ctx.save_for_backward(w, keep)
        ctx.scale, ctx.pressure = scale, pressure
        return w * keep

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        w, keep = ctx.saved_tensors
        gm = torch.addcmul(torch.tensor(ctx.pressure, dtype=g.dtype, device=g.device), w, g, value=ctx.scale)
        return g * keep, gm, None, None


class _PrevMask(nn.Module):
    def __init__(self, logits: torch.Tensor, scale: float):
        super().__init__()
        self.logits = nn.Parameter(logits.detach().clone())
        self.scale = scale
        self.pressure = 0.0

    def forward(self, w):
        return _PrevST.apply(w, self.logits, self.scale, self.pressure)


def _swap_masks(model: nn.Module, make) -> nn.Module:
    """``model`` masked with ``make(logits, scale)`` modules (same initial logits as install_masks)."""
    ref = install_masks(model)
    net = install_masks(model)
    for name, p in masked_modules(ref).items():
        mod = net.get_submodule(name) if name else net
        parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
        parametrize.register_parametrization(mod, "weight", make(p.logits, p.scale))
    return net


def legacy_masked(model: nn.Module) -> nn.Module:
    """``model`` with the pre-issue-10 mask parametrization (same initial logits as install_masks)."""
    return _swap_masks(model, _LegacyMask)


def _logits_of(net: nn.Module, kind) -> list[nn.Parameter]:
    return [m.logits for m in net.modules() if isinstance(m, kind)]


def _sgd(params):
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True)


def _step_fn(net, opts, x, y, extra=None):
    def step():
        loss = F.cross_entropy(net(x), y, label_smoothing=0.1)
        if extra is not None:
            loss = loss + extra()
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
    return step


class _TrainerAdam:
    """The logits' Adam stepped the way the Hyperflows trainer steps it (:func:`adam_step`)."""

    def __init__(self, opt):
        self.opt = opt

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        adam_step(self.opt)


def _split_opts(net, logits, fused: bool):
    ids = {id(p) for p in logits}
    adam = torch.optim.Adam(logits, lr=1e-3, **(_fused_kw() if fused else {"foreach": False}))
    return [_sgd([p for p in net.parameters() if id(p) not in ids]), adam]


def make_steps(name: str, batch: int, shape=(1, 28, 28)):
    torch.manual_seed(0)
    dense = build_model(name, shape, 10)
    fused = install_masks(dense)
    prev = _swap_masks(dense, _PrevMask)
    legacy = legacy_masked(dense)
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    n = sum(p.numel() for p in mask_logits(fused))
    pressure = 2.0 ** 1.5
    set_pressure(fused, pressure / n)
    for m in prev.modules():
        if isinstance(m, _PrevMask):
            m.pressure = pressure / n
    leg_logits = _logits_of(legacy, _LegacyMask)
    steps = {
        "dense": _step_fn(dense, [_sgd(dense.parameters())], x, y),
        "fused": _step_fn(fused, [_sgd(weight_parameters(fused)),
                                  _TrainerAdam(torch.optim.Adam(mask_logits(fused), lr=1e-3, **_fused_kw()))], x, y),
        "prev": _step_fn(prev, _split_opts(prev, _logits_of(prev, _PrevMask), True), x, y),
        "legacy": _step_fn(legacy, _split_opts(legacy, leg_logits, False), x, y,
                           extra=lambda: pressure * sum(p.sum() for p in leg_logits) / n),
    }
    params = sum(p.numel() * p.element_size() for p in dense.parameters())
    logit_bytes = sum(p.numel() * p.element_size() for p in mask_logits(fused))
    return steps, params, logit_bytes


def measure_raw(name: str, batch: int, rounds: int, per_round: int) -> dict:
    """One process: the steps timed together (flowprune.timing: interleaved rotated rounds of
    ``per_round`` calls each, seconds per call per round) and minor page faults per step."""
    steps, pbytes, lbytes = make_steps(name, batch)
    faults: dict[str, int] = {k: 0 for k in steps}
    calls: dict[str, int] = {k: 0 for k in steps}

    def counted(k, f):
        def run():
            a = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            f()
            faults[k] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - a
            calls[k] += 1
        return run

    fns = {k: counted(k, f) for k, f in steps.items()}
    for k in steps:  # warm-up
        for _ in range(3):
            fns[k]()
    faults.update({k: 0 for k in steps})
    calls.update({k: 0 for k in steps})
    times = {k: [] for k in steps}
    for _ in range(per_round):  # per_round passes of `rounds` rounds: rounds * per_round samples per step
        t = time_callables(fns, rounds=rounds, warmup=0, min_round_s=0.0)
        for k in steps:
            times[k] += t.samples[k]
    return {"times": times, "faults": {k: faults[k] * len(times[k]) // max(calls[k], 1) for k in steps},
            "params_bytes": pbytes, "logit_bytes": lbytes}


MALLOC_KEEP = {"MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
               "MALLOC_TOP_PAD_": str(64 << 20)}


def run_procs(name: str, batch: int, rounds: int, per_round: int, procs: int, threads: int, malloc: str) -> dict:
    """``procs`` fresh processes one after the other; step times pooled, medians and ratios."""
    env = {**os.environ, **(MALLOC_KEEP if malloc == "keep" else {})}
    times: dict[str, list[float]] = {}
    faults: dict[str, int] = {}
    load = [os.getloadavg()[0]]
    for _ in range(procs):
        arg = json.dumps({"name": name, "batch": batch, "rounds": rounds, "per_round": per_round, "threads": threads})
        out = subprocess.run([sys.executable, "-m", "benchmarks.bench_mask_overhead", "--child", arg], env=env,
                             capture_output=True, text=True, check=True).stdout
        raw = json.loads(out.strip().splitlines()[-1])
        for k, v in raw["times"].items():
            times.setdefault(k, []).extend(v)
            faults[k] = faults.get(k, 0) + raw["faults"][k]
        load.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    r = {"model": name, "batch": batch, "malloc": malloc, "procs": procs, "steps_each": len(times["dense"]),
         "load_avg_1min": load, "params_mb": raw["params_bytes"] / 1e6,
         "logits_over_params": raw["logit_bytes"] / raw["params_bytes"]}
    for k in times:
        r[f"{k}_ms"] = 1e3 * med[k]
        r[f"{k}_faults_per_step"] = faults[k] / len(times[k])
        if k != "dense":
            r[f"{k}_overhead"] = med[k] / med["dense"]
            r[f"{k}_overhead_best"] = best[k] / best["dense"]
    r["spread_dense_ms"] = [1e3 * min(times["dense"]), 1e3 * max(times["dense"])]
    r["spread_fused_ms"] = [1e3 * min(times["fused"]), 1e3 * max(times["fused"])]
    return r


def _median_us(f, reps: int = 300) -> float:
    return 1e6 * time_callables({"f": f}, rounds=reps, warmup=20, min_round_s=0.0).median["f"]


def micro() -> dict:
    """The pieces of the mask step on LeNet-300-100's first layer (300x784), medians in microseconds."""
    from flowprune.pruning.masks import LogitMask

    g = torch.Generator().manual_seed(0)
    m, w = torch.randn(300, 784, generator=g), torch.randn(300, 784, generator=g)
    buf, bbuf = torch.empty_like(m), torch.empty(m.shape, dtype=torch.bool)
    out = {"keep_ge_out_float_us": _median_us(lambda: torch.ge(m, 0, out=buf)),
           "keep_sign_add_clamp_us": _median_us(lambda: torch.sign(m, out=buf).add_(1).clamp_(max=1)),
           "keep_ge_bool_us": _median_us(lambda: torch.ge(m, 0, out=bbuf)),
           "w_times_keep_us": _median_us(lambda: torch.mul(w, buf))}
    shapes = [(300, 784), (100, 300), (10, 100)]
    ps = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    opt = torch.optim.Adam(ps, lr=1e-3, **_fused_kw())
    opt.step()
    out["adam_optimizer_step_us"] = _median_us(opt.step)
    out["adam_step_direct_us"] = _median_us(lambda: adam_step(opt))
    out["adam_zero_grad_us"] = _median_us(lambda: opt.zero_grad(set_to_none=True))
    lm = LogitMask((4, 4))
    wt = torch.randn(4, 4, requires_grad=True)
    mt = lm.logits.detach()
    out["tiny_masked_fwd_bwd_us"] = _median_us(lambda: lm(wt).sum().backward(), 1000)
    out["tiny_plain_fwd_bwd_us"] = _median_us(lambda: (wt * mt).sum().backward(), 1000)
    out["python_per_masked_layer_us"] = out["tiny_masked_fwd_bwd_us"] - out["tiny_plain_fwd_bwd_us"]
    return out


def _row(r: dict) -> dict:
    return {"model": r["model"], "batch": r["batch"], "malloc": r["malloc"], "steps each": r["steps_each"],
            "dense ms": f"{r['dense_ms']:.2f}", "fused ms": f"{r['fused_ms']:.2f}",
            "fused / dense": f"{r['fused_overhead']:.2f}", "prev / dense": f"{r['prev_overhead']:.2f}",
            "legacy / dense": f"{r['legacy_overhead']:.2f}",
            "fused / dense, fastest": f"{r['fused_overhead_best']:.2f}",
            "faults/step dense / fused / prev": (f"{r['dense_faults_per_step']:.0f} / {r['fused_faults_per_step']:.0f}"
                                                 f" / {r['prev_faults_per_step']:.0f}"),
            "load avg": "-".join(f"{v:.1f}" for v in (min(r["load_avg_1min"]), max(r["load_avg_1min"]))),
            "goal <= 1.3x": "met" if r["fused_overhead"] <= 1.3 else "not met"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--procs", type=int, default=3, help="fresh processes per measurement (pooled)")
    ap.add_argument("--malloc", choices=("default", "keep", "both"), default="both")
    ap.add_argument("--models", default="lenet300:128,resnet20:32", help="name:batch pairs, comma-separated")
    ap.add_argument("--out", default="runs/bench_mask_overhead")
    ap.add_argument("--micro", action="store_true", help="also time the pieces of the mask step (first layer)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        c = json.loads(args.child)
        torch.set_num_threads(c["threads"])
        print(json.dumps(measure_raw(c["name"], c["batch"], c["rounds"], c["per_round"])))
        return 0
    cmd = "python -m benchmarks.bench_mask_overhead" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows, raw = [], []
    mallocs = ("default", "keep") if args.malloc == "both" else (args.malloc,)
    for item in [m for m in args.models.split(",") if m]:
        name, batch = item.split(":")
        per_round = 10 if name == "lenet300" else 3
        for malloc in mallocs:
            r = run_procs(name, int(batch), args.rounds, per_round, args.procs, args.threads, malloc)
            raw.append(r)
            rows.append(_row(r))
            print(f"[{name} malloc={malloc}] done", file=sys.stderr, flush=True)
    extra = {}
    torch.set_num_threads(args.threads)  # the pieces are timed in this process
    if args.micro:
        extra["micro"] = micro()
        print("pieces (us, medians): " + ", ".join(f"{k} {v:.1f}" for k, v in extra["micro"].items()))
    title = (f"Mask training overhead, median step time, {args.procs} fresh processes x {args.rounds} interleaved "
             f"rounds ({args.threads} thread(s), torch {torch.__version__}, started {started})")
    print(f"`{cmd}`\n")
    print(format_table(rows, title=title))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"command": cmd, "started": started, "threads": args.threads,
                                                  "rows": raw, **extra}, indent=1))
    print(f"\nsaved {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
