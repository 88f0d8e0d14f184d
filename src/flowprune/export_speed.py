"""Speed after export: onnxruntime sessions and the PyTorch models they came from, timed together.

``time_exported(models, onnx_files, input_shape)`` runs every ONNX file in onnxruntime (CPU
provider, full graph optimisation, ``threads`` intra-op threads) and, with ``eager=True``, the
PyTorch model beside it, in **one** interleaved harness call per batch size
(:func:`flowprune.timing.time_callables`). It reports seconds per batch, samples per second, each
model's onnxruntime speed-up over ``base``'s onnxruntime (refused, like every speed-up flowprune
prints, when it beats the MACs reduction by more than the slack beyond the noise band), and
onnxruntime's speed-up over eager PyTorch for the same model (no physical bound: a runtime may
fuse and skip work eager PyTorch does).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from flowprune.errors import FlowpruneError, ImplausibleTiming, check_positive_int
from flowprune.timing import check_plausible, eval_mode, time_callables

_INSTALL = "pip install 'flowprune[export]' (onnx, onnxruntime, onnxscript)"


def ort_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session with full graph optimisation (``threads`` intra-op threads, default
    torch's thread count, sequential execution)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise FlowpruneError(f"onnxruntime is not installed; {_INSTALL}") from None
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _fns(models, sessions, x: torch.Tensor, eager: bool) -> dict:
    xn = x.numpy()
    fns = {}
    for n, s in sessions.items():
        name = s.get_inputs()[0].name
        fns[f"{n} onnxruntime"] = (lambda s_, nm: (lambda: s_.run(None, {nm: xn})))(s, name)
        if eager:
            fns[f"{n} eager"] = (lambda m: (lambda: m(x)))(models[n])
    return fns


def _entry(t, names: list[str], base: str | None, b: int, macs: Mapping[str, int] | None, slack: float,
           eager: bool) -> tuple[dict, list[str]]:
    e: dict = {"seconds": dict(t.median), "samples": dict(t.samples),
               "per_second": {k: b / v for k, v in t.median.items()},
               "speedup": {}, "onnxruntime_vs_eager": {}}
    refused = []
    for n in names:
        if eager:
            e["onnxruntime_vs_eager"][n] = t.speedup(f"{n} eager", f"{n} onnxruntime")
        if base is None or n == base:
            continue
        try:
            if macs is not None:
                check_plausible(t, base=f"{base} onnxruntime", other=f"{n} onnxruntime",
                                work_ratio=macs[base] / max(macs[n], 1), what=f"{n} vs {base} at batch {b}",
                                slack=slack)
            e["speedup"][n] = t.speedup(f"{base} onnxruntime", f"{n} onnxruntime")
        except ImplausibleTiming as err:
            e["speedup"][n] = None
            refused.append(str(err))
    return e, refused


@torch.no_grad()
def time_exported(models: Mapping[str, nn.Module], onnx_files: Mapping[str, str | os.PathLike],
                  input_shape: Sequence[int], *, base: str | None = None, batch_sizes: Sequence[int] = (1, 64),
                  rounds: int = 5, threads: int | None = None, eager: bool = True,
                  macs: Mapping[str, int] | None = None, slack: float = 0.5, min_round_s: float = 0.02) -> dict:
    """onnxruntime (and eager PyTorch) speed of exported models, timed together; see the module doc.

    Returns ``{"backend": "onnxruntime", "batch_sizes", "threads", "rounds", "refused", "b{B}": {...}}``
    with, per batch size, ``seconds`` and ``per_second`` of every ``"NAME onnxruntime"`` /
    ``"NAME eager"``, ``speedup`` (onnxruntime, vs ``base``) and ``onnxruntime_vs_eager``.
    """
    if set(models) != set(onnx_files) or not models:
        raise FlowpruneError("time_exported: give the same non-empty set of names for models and onnx_files")
    if base is not None and base not in models:
        raise FlowpruneError(f"time_exported: base {base!r} is not one of {', '.join(models)}")
    sizes = [check_positive_int("batch size", b) for b in batch_sizes]
    sessions = {n: ort_session(f, threads) for n, f in onnx_files.items()}
    names = list(models)
    out: dict = {"backend": "onnxruntime", "batch_sizes": sizes, "rounds": rounds, "refused": [],
                 "threads": int(threads or torch.get_num_threads())}
    g = torch.Generator().manual_seed(0)
    with contextlib.ExitStack() as stack:
        for m in models.values():
            stack.enter_context(eval_mode(m))
        for b in sizes:
            x = torch.randn(b, *input_shape, generator=g)
            t = time_callables(_fns(models, sessions, x, eager), rounds=rounds, warmup=1, min_round_s=min_round_s,
                               backend="onnxruntime" + (" + eager" if eager else ""))
            out[f"b{b}"], refused = _entry(t, names, base, b, macs, slack, eager)
            out["refused"] += refused
            out.setdefault("load_before", t.load_before)
            out["load_after"] = t.load_after
    return out
