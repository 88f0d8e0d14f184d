"""``flowprune export``: a saved (pruned) model as an ONNX file or a ``torch.export`` program.

    flowprune export runs/agf4x --format onnx --out agf4x.onnx
    flowprune export runs/agf4x --format pt2 --out agf4x.pt2
    flowprune export runs/routed --out routed_onnx/      # a routed model: light.onnx, heavy.onnx, cascade.json

The batch dimension is dynamic unless ``--static-batch``; the file is checked against PyTorch
(onnxruntime / the exported program, at two batch sizes) before it is renamed into place, so a
failed export leaves nothing behind. See :mod:`flowprune.export`.
"""

from __future__ import annotations

import argparse

NAME = "export"
HELP = "export a saved model to ONNX (runs with onnxruntime) or a torch.export program (.pt2)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="a saved model directory (flowprune train/prune/idap/hyperflows --out) "
                   "or a routed model directory (flowprune route --out)")
    p.add_argument("--format", default=None, help="onnx or pt2 (default: from --out's file name)")
    p.add_argument("--out", required=True, help="file to write (*.onnx, *.pt2); a directory for a routed model")
    p.add_argument("--exporter", default="auto", help="ONNX: auto (dynamo, else TorchScript), dynamo or torchscript")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size (default: dynamic)")
    p.add_argument("--no-verify", action="store_true", help="skip the check against PyTorch")
    g = p.add_argument_group("speed after export (onnxruntime, single-model ONNX; docs/speed.md)")
    g.add_argument("--no-speed", action="store_true", help="skip the onnxruntime speed measurement")
    g.add_argument("--baseline", default=None,
                   help="a saved model to time beside it (e.g. the dense model it was pruned from): its "
                        "onnxruntime speed-up is reported next to the MACs reduction")
    g.add_argument("--speed-batch", type=int, default=64, help="throughput batch (default 64; batch 1 always)")
    g.add_argument("--speed-rounds", type=int, default=5, help="interleaved timing rounds (default 5)")


def run(args: argparse.Namespace) -> int:
    from flowprune.errors import bad_choice
    from flowprune.export import EXPORTERS, FORMATS, export

    if args.format is not None and args.format not in FORMATS:
        raise bad_choice("--format", args.format, FORMATS)
    if args.exporter not in EXPORTERS:
        raise bad_choice("--exporter", args.exporter, EXPORTERS)
    res = export(args.dir, args.out, args.format, dynamic_batch=not args.static_batch, exporter=args.exporter,
                 opset=args.opset, verify=not args.no_verify)
    print(f"exported {args.dir} -> {res.describe()}")
    if res.format == "onnx-cascade":
        print("run it without PyTorch: flowprune.export.OnnxCascade(DIR).route(x)  (numpy + onnxruntime)")
    if res.format == "onnx" and not args.no_speed:
        _speed_after_export(args, res)
    return 0


def _speed_after_export(args: argparse.Namespace, res) -> None:
    """Time the exported file in onnxruntime beside its PyTorch model (and ``--baseline``, exported to a
    temporary file), in one interleaved harness call per batch size; write ``OUT.speed.json``."""
    import tempfile
    from pathlib import Path

    from flowprune.errors import check_positive_int
    from flowprune.export import _prepare, export
    from flowprune.export_speed import time_exported
    from flowprune.io import load
    from flowprune.measure import count_macs_params
    from flowprune.report import format_table, write_results

    shape = tuple(res.input_shape)
    models = {"exported": _prepare(load(args.dir))[0]}
    files = {"exported": res.path}
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline:
            models["baseline"] = _prepare(load(args.baseline))[0]
            files["baseline"] = export(models["baseline"], Path(tmp) / "baseline.onnx", exporter=args.exporter,
                                       opset=args.opset).path
        macs = {k: count_macs_params(m, shape)[0] for k, m in models.items()}
        sp = time_exported(models, files, shape, base="baseline" if args.baseline else None,
                           batch_sizes=(1, check_positive_int("--speed-batch", args.speed_batch)),
                           rounds=check_positive_int("--speed-rounds", args.speed_rounds), macs=macs)
    sp["macs"] = macs
    rows = []
    for n in models:
        row = {"model": n, "MACs": macs[n]}
        for b in sp["batch_sizes"]:
            e = sp[f"b{b}"]
            row[f"ORT b{b}/s"] = e["per_second"][f"{n} onnxruntime"]
            row[f"ORT vs eager b{b}"] = e["onnxruntime_vs_eager"][n]
            if n != "baseline" and args.baseline:
                v = e["speedup"][n]
                row[f"speed-up b{b}"] = "refused" if v is None else f"{v:.2f}x"
        rows.append(row)
    print(format_table(rows, title=f"onnxruntime, {sp['threads']} thread(s), timed together with eager PyTorch "
                                   f"({sp['rounds']} interleaved rounds per batch size, medians)"))
    for m in sp["refused"]:
        print(f"refused: {m}")
    out = Path(str(res.path) + ".speed.json")
    write_results(out, sp)
    print(f"speed written to {out}")
