"""``flowprune train``: train a zoo model on a data set, checkpoint every epoch, write results.json."""

from __future__ import annotations

import argparse

from flowprune.commands._common import (
    Timer,
    add_data_arguments,
    add_train_arguments,
    check_out_path,
    load_data,
    open_run,
    setup_parser,
    train_config,
)

NAME = "train"
HELP = "train a model from the zoo on a data set (resumes from DIR/checkpoint.pt)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    setup_parser(p)
    p.add_argument("--model", default="resnet20", help="zoo name (resnet20, resnet56, wrn16_2, vgg11, vgg8, vit, "
                   "lenet300, cnn1d, lstm1d, gru1d), tv:NAME or timm:NAME")
    add_data_arguments(p)
    add_train_arguments(p)
    p.add_argument("--out", required=True, help="output directory (model, checkpoint, results.json)")
    p.add_argument("--no-resume", action="store_true", help="start over even if DIR/checkpoint.pt exists")
    p.add_argument("--no-speed", action="store_true", help="skip latency/throughput measurement")


def run(args: argparse.Namespace) -> int:
    import torch

    from flowprune.api import train_model
    from flowprune.models import build_model

    # validate everything before the first write to OUT
    check_out_path(args.out)
    cfg = train_config(args)
    data = load_data(args)
    torch.manual_seed(cfg.seed)  # exactly what train_model does with a model name
    net = build_model(args.model, data.input_shape, data.num_classes)
    run = open_run(args)
    if run.finished:
        return 0
    out = run.out
    with run, Timer() as t:
        res = train_model(net, data, cfg, out_dir=out, resume=not args.no_resume,
                          measure_speed=not args.no_speed)
    run.finish()
    from flowprune.report import format_table

    print(format_table([{"model": args.model, "data": args.data, "epochs": cfg.epochs, "seed": cfg.seed,
                         "test acc %": 100 * res["accuracy"], "MACs": res["macs"], "params": res["params"],
                         "latency b1 ms": res.get("latency_ms_b1"), "seconds": t.seconds}]))
    print(f"saved to {out}/ (model.safetensors, model.json, results.json)")
    return 0
