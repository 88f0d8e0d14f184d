"""Speed after export: onnxruntime latency (batch 1) and throughput (batch 256), dense vs pruned.

    python -m benchmarks.bench_export                        # ResNet-20 on mnist5k (1x28x28), 2x/4x/8x, 1 thread
    python -m benchmarks.bench_export --threads 2 --rounds 7
    python -m benchmarks.bench_export --quick                # 8x8 digits, 2 rounds (smoke test)

The dense model is a seeded ResNet-20 (trained weights are not needed for speed; pass
``--checkpoint DIR`` to use a trained one). Each pruned model is ``flowprune.prune(dense, data,
method="l1", target_macs=T)``, one shot, no fine-tune. Every model is exported with
``flowprune.export`` (ONNX, dynamic batch; the exporter used is recorded) and run by onnxruntime
(CPU provider, ``--threads`` intra-op threads, full graph optimisation). PyTorch eager times of the
same models (same thread count) are measured beside them.

Timing: the one harness (:func:`flowprune.export_speed.time_exported` on
:func:`flowprune.timing.time_callables`): for batch 1 and for ``--batch``, every model in
onnxruntime and in eager PyTorch is timed in ``--rounds`` interleaved rounds (rotated order, each
call repeated for at least ``--min-round-s``). The table shows medians over rounds and, per pruned model, its speed-up over the dense one divided by its MACs reduction
("speed-up per MACs cut": 1.0 means time fell as fast as MACs). Writes
``docs/results/export.md`` and ``docs/results/export.json`` (``--no-write`` to skip) with the
machine load seen before and after the run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS_MD = Path("docs/results/export.md")
RESULTS_JSON = Path("docs/results/export.json")


def _load_snapshot() -> dict:
    snap = {"loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()]}
    try:
        out = subprocess.run(["ps", "-eo", "pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True,
                             timeout=10).stdout.splitlines()[1:8]
        snap["top_processes"] = [ln.strip() for ln in out if ln.strip() and not ln.strip().startswith("0.0")]
    except (OSError, subprocess.SubprocessError):
        snap["top_processes"] = []
    return snap


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--data", default="mnist5k")
    ap.add_argument("--checkpoint", default=None, help="a trained dense model directory (default: seeded init)")
    ap.add_argument("--targets", default="2,4,8", help="MACs reductions (default 2,4,8)")
    ap.add_argument("--round-to", default="1,8", help="kept widths multiple of these (one pruned model per value "
                    "and target; default 1,8: any width, and multiples of 8 that vector kernels like)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op and torch threads (default 1)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-round-s", type=float, default=0.05,
                    help="each round repeats a model's call until at least this long (seconds)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--exporter", default="auto", help="auto, dynamo or torchscript")
    ap.add_argument("--quick", action="store_true", help="digits 8x8, 2 rounds, few reps (smoke test)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager columns")
    ap.add_argument("--no-write", action="store_true", help="do not write docs/results/export.*")
    args = ap.parse_args(argv)
    if args.quick:
        args.data, args.rounds, args.min_round_s = "digits", 2, 0.01
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import onnxruntime as ort

    import flowprune as fp
    from flowprune.export_speed import time_exported
    from flowprune.measure import count_macs_params
    from flowprune.report import format_table

    command = "python -m benchmarks.bench_export " + " ".join(argv if argv is not None else sys.argv[1:])
    before = _load_snapshot()
    t_start = time.perf_counter()
    data = fp.load_dataset(args.data, seed=0)
    if args.checkpoint:
        dense = fp.load(args.checkpoint)
    else:
        torch.manual_seed(0)
        dense = fp.build_model(args.model, data.input_shape, data.num_classes)
    dense.eval()
    targets = [float(t.strip().rstrip("x")) for t in args.targets.split(",") if t.strip()]
    models = {"dense": dense}
    rounds_to = [int(r) for r in args.round_to.split(",") if r.strip()]
    for t in targets:
        for rt in rounds_to:
            res = fp.prune(dense, data, method="l1", target_macs=t, steps=1, finetune_epochs=0,
                           final_finetune_epochs=0, round_to=rt, seed=0, measure=False, progress=False)
            models[f"l1 {t:g}x" + (f" /{rt}" if rt > 1 else "")] = res.model.eval()
    shape = tuple(data.input_shape)
    tmp = Path(tempfile.mkdtemp(prefix="bench_export_"))
    info, files = {}, {}
    for name, m in models.items():
        macs, params = count_macs_params(m, shape)
        t0 = time.perf_counter()
        ex = fp.export(m, tmp / f"{name.replace(' ', '_').replace('/', 'r')}.onnx", exporter=args.exporter)
        info[name] = {"macs": macs, "params": params, "exporter": ex.exporter, "opset": ex.opset,
                      "max_abs_error": ex.max_abs_error, "export_seconds": time.perf_counter() - t0,
                      "onnx_bytes": ex.path.stat().st_size}
        files[name] = ex.path
    names = list(models)
    # every model, onnxruntime and eager, timed together: one interleaved harness call per batch size
    sp = time_exported(models, files, shape, base="dense", batch_sizes=(1, args.batch), rounds=args.rounds,
                       threads=args.threads, eager=not args.no_torch, min_round_s=args.min_round_s,
                       macs={n: info[n]["macs"] for n in names})
    after = _load_snapshot()
    b1, bb = sp["b1"], sp[f"b{args.batch}"]
    rows = []
    for n in names:
        red = info["dense"]["macs"] / info[n]["macs"]
        sp_lat, sp_thr = (1.0, 1.0) if n == "dense" else (b1["speedup"][n], bb["speedup"][n])
        row = {"model": n, "MACs": info[n]["macs"], "MACs fewer x": red, "params": info[n]["params"],
               "exporter": info[n]["exporter"],
               "ORT latency b1 ms": 1e3 * b1["seconds"][f"{n} onnxruntime"],
               f"ORT throughput b{args.batch}/s": bb["per_second"][f"{n} onnxruntime"],
               "ORT speed-up b1": sp_lat, f"ORT speed-up b{args.batch}": sp_thr,
               "speed-up per MACs cut b1": None if sp_lat is None else sp_lat / red,
               f"speed-up per MACs cut b{args.batch}": None if sp_thr is None else sp_thr / red}
        if not args.no_torch:
            row["torch latency b1 ms"] = 1e3 * b1["seconds"][f"{n} eager"]
            row[f"torch throughput b{args.batch}/s"] = bb["per_second"][f"{n} eager"]
            row["ORT vs torch b1"] = b1["onnxruntime_vs_eager"][n]
            row[f"ORT vs torch b{args.batch}"] = bb["onnxruntime_vs_eager"][n]
        rows.append(row)
    seconds = time.perf_counter() - t_start
    title = (f"{args.model} on {args.data} {shape}: onnxruntime {ort.__version__} vs PyTorch {torch.__version__} "
             f"eager, {args.threads} thread(s), medians of {args.rounds} interleaved rounds")
    table = format_table(rows, title=title)
    print(f"$ {command}\n")
    print(table)
    print(f"\nmachine load before: {before}\nmachine load after:  {after}\n({seconds:.0f} s)")
    result = {"command": command, "title": title, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "onnxruntime": ort.__version__, "threads": args.threads},
              "load_before": before, "load_after": after, "settings": vars(args), "models": info,
              "timing": sp, "timing_note": timing_note(args.batch), "rows": rows, "seconds": seconds}
    if not args.no_write:
        from flowprune.report import write_results

        RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
        write_results(RESULTS_JSON, result)
        RESULTS_MD.write_text(_markdown(command, table, result, rows, args.batch))
        print(f"wrote {RESULTS_MD} and {RESULTS_JSON}")
    return 0


def timing_note(batch: int) -> str:
    """How this harness times the models, as the page says it (stored in the payload as ``timing_note``,
    so a page re-rendered from an older run's JSON keeps the description of how that run measured)."""
    return (f"Latency: batch 1; throughput: batches of {batch}; every model timed together in one interleaved "
            "harness call per batch size (medians).")


def _markdown(command: str, table: str, res: dict, rows: list[dict], batch: int) -> str:
    m = res["machine"]
    lines = [
        "# Speed after export: onnxruntime, dense vs pruned",
        "",
        f"Measured {res['date']} on {m['cpus']} CPU cores ({m['platform']}), Python {m['python']}, "
        f"torch {m['torch']}, onnxruntime {m['onnxruntime']}, {m['threads']} thread(s), by",
        "",
        "```bash",
        command.replace("python ", "HF_HUB_OFFLINE=1 .venv/bin/python ", 1),
        "```",
        "",
        "Pruned models: `flowprune.prune(dense, data, method=\"l1\", target_macs=T)`, one shot, no fine-tune "
        "(speed only; accuracy is not measured here); \"/8\" marks kept widths rounded to multiples of 8 "
        "(`round_to=8`). Each model exported by `flowprune.export` "
        "(ONNX, dynamic batch, checked against PyTorch to 1e-4) and run by onnxruntime's CPU provider. "
        f"{res.get('timing_note') or timing_note(batch)} \"speed-up per MACs cut\" = speed-up over the dense "
        "ONNX model / MACs reduction (1.0 = time fell as fast as MACs).",
        "",
        table,
        "",
        f"Machine load (1/5/15-min load average) before: {res['load_before']['loadavg_1_5_15']}, "
        f"after: {res['load_after']['loadavg_1_5_15']}; busiest processes before the run: "
        f"{', '.join(res['load_before'].get('top_processes', [])[:5]) or 'n/a'}. "
        "The machine is shared: compare numbers only as ratios inside this table.",
        "",
        f"Raw numbers (every round, export details): [export.json](export.json). Total {res['seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
