"""Mask training overhead: a Hyperflows training step vs a dense training step, side by side.

    python -m benchmarks.bench_mask_overhead                    # LeNet-300-100 b128 + ResNet-20 b32, 1 thread
    python -m benchmarks.bench_mask_overhead --rounds 5 --out runs/bench_mask_overhead

Three steps are timed in interleaved rounds (dense, fused, legacy, dense, fused, ...) on the same
input batch, and the medians are compared:

* **dense**: ``net(x)`` -> cross-entropy -> backward -> SGD (Nesterov, momentum 0.9, wd 5e-4).
* **fused** (what :func:`flowprune.pruning.hyperflows.hyperflows_prune` runs now): the weights go
  through :class:`flowprune.pruning.masks.LogitMask`, whose single autograd Function computes
  ``w * 1[m >= 0]`` (float mask by ``sign``) and in the backward ``g * mask`` and
  ``s * w * g + P/N`` (the pressure gradient folded in with one ``addcmul``); the same SGD for
  the weights plus fused Adam for the logits.
* **legacy** (the implementation before issue 10, kept here for the comparison): bool mask
  ``(m >= 0).to(dtype)``, the pressure as a ``P * mean(m)`` term in the loss, for-loop Adam.

The same SGD implementation (torch's default) is used for the weights in all three, so the ratio
measures the masks only. The ratio of the fastest steps is printed too: on a loaded machine the
medians include waiting for memory bandwidth that other jobs take, which stretches all three. Writes ``OUT/results.json`` and prints a table and the command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from flowprune.models import build_model
from flowprune.pruning.hyperflows import _fused_kw
from flowprune.pruning.masks import (
    install_masks,
    mask_logits,
    masked_modules,
    set_pressure,
    weight_parameters,
)
from flowprune.report import format_table


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


def legacy_masked(model: nn.Module) -> nn.Module:
    """``model`` with the pre-issue-10 mask parametrization (same initial logits as install_masks)."""
    ref = install_masks(model)
    net = install_masks(model)
    for name, p in masked_modules(ref).items():
        mod = net.get_submodule(name) if name else net
        parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
        parametrize.register_parametrization(mod, "weight", _LegacyMask(p.logits, p.scale))
    return net


def _legacy_logits(net: nn.Module) -> list[nn.Parameter]:
    return [p.logits for m in net.modules() if isinstance(m, _LegacyMask) for p in [m]]


def _sgd(params):
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True)


def make_steps(name: str, batch: int, shape=(1, 28, 28)):
    torch.manual_seed(0)
    dense = build_model(name, shape, 10)
    fused = install_masks(dense)
    legacy = legacy_masked(dense)
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    n = sum(p.numel() for p in mask_logits(fused))
    pressure = 2.0 ** 1.5
    set_pressure(fused, pressure / n)
    o_d = [_sgd(dense.parameters())]
    o_f = [_sgd(weight_parameters(fused)), torch.optim.Adam(mask_logits(fused), lr=1e-3, **_fused_kw())]
    leg_logits = _legacy_logits(legacy)
    ids = {id(p) for p in leg_logits}
    o_l = [_sgd([p for p in legacy.parameters() if id(p) not in ids]),
           torch.optim.Adam(leg_logits, lr=1e-3, foreach=False)]

    def step_dense():
        loss = F.cross_entropy(dense(x), y, label_smoothing=0.1)
        o_d[0].zero_grad(set_to_none=True)
        loss.backward()
        o_d[0].step()

    def step_fused():
        loss = F.cross_entropy(fused(x), y, label_smoothing=0.1)
        for o in o_f:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in o_f:
            o.step()

    def step_legacy():
        loss = F.cross_entropy(legacy(x), y, label_smoothing=0.1)
        loss = loss + pressure * sum(p.sum() for p in leg_logits) / n
        for o in o_l:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in o_l:
            o.step()

    params = sum(p.numel() * p.element_size() for p in dense.parameters())
    logit_bytes = sum(p.numel() * p.element_size() for p in mask_logits(fused))
    return {"dense": step_dense, "fused": step_fused, "legacy": step_legacy}, params, logit_bytes


def measure(name: str, batch: int, rounds: int, per_round: int) -> dict:
    steps, pbytes, lbytes = make_steps(name, batch)
    for f in steps.values():  # warm-up
        for _ in range(2):
            f()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for k, f in steps.items():
            for _ in range(per_round):
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "batch": batch, "steps_each": len(times["dense"]),
            "dense_ms": 1e3 * med["dense"], "fused_ms": 1e3 * med["fused"], "legacy_ms": 1e3 * med["legacy"],
            "fused_overhead": med["fused"] / med["dense"], "legacy_overhead": med["legacy"] / med["dense"],
            "fused_overhead_best": min(times["fused"]) / min(times["dense"]),
            "legacy_overhead_best": min(times["legacy"]) / min(times["dense"]),
            "params_mb": pbytes / 1e6, "logits_over_params": lbytes / pbytes,
            "spread_dense_ms": [1e3 * min(times["dense"]), 1e3 * max(times["dense"])],
            "spread_fused_ms": [1e3 * min(times["fused"]), 1e3 * max(times["fused"])]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--models", default="lenet300:128,resnet20:32", help="name:batch pairs, comma-separated")
    ap.add_argument("--out", default="runs/bench_mask_overhead")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cmd = "python -m benchmarks.bench_mask_overhead" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    rows, raw = [], []
    for item in args.models.split(","):
        name, batch = item.split(":")
        per_round = 10 if name == "lenet300" else 3
        r = measure(name, int(batch), args.rounds, per_round)
        raw.append(r)
        rows.append({"model": name, "batch": r["batch"], "steps each": r["steps_each"],
                     "dense ms": f"{r['dense_ms']:.2f}", "fused masked ms": f"{r['fused_ms']:.2f}",
                     "fused / dense": f"{r['fused_overhead']:.2f}", "legacy masked ms": f"{r['legacy_ms']:.2f}",
                     "legacy / dense": f"{r['legacy_overhead']:.2f}",
                     "fused / dense, fastest steps": f"{r['fused_overhead_best']:.2f}",
                     "legacy / dense, fastest steps": f"{r['legacy_overhead_best']:.2f}", "goal <= 1.3x (medians)":
                         "met" if r["fused_overhead"] <= 1.3 else "not met"})
        print(f"[{name}] done", file=sys.stderr, flush=True)
    title = (f"Mask training overhead, median step time over interleaved rounds ({args.threads} thread(s), "
             f"torch {torch.__version__}, {datetime.date.today().isoformat()})")
    print(f"`{cmd}`\n")
    print(format_table(rows, title=title))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"command": cmd, "threads": args.threads, "rows": raw}, indent=1))
    print(f"\nsaved {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
