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
    return 0
