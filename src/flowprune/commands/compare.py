"""``flowprune compare``: every pruning method from the same dense model, side by side, with Torch-Pruning.

    flowprune compare --checkpoint runs/dense --data mnist5k \\
        --methods agf,l1,taylor,wanda,random,tp-magnitude,tp-taylor --targets 2x,4x,8x,16x \\
        --seeds 3 --finetune-epochs 1 --out runs/compare

or, with no checkpoint, train the dense model first (saved to ``OUT/dense``):

    flowprune compare --model resnet20 --epochs 15 --data mnist5k --methods agf,tp-magnitude --out runs/cmp

Prints one table (accuracy mean ± std after the cut, after BatchNorm re-estimation and after
fine-tuning; achieved MACs reduction, params, latency and throughput; differences to the best
Torch-Pruning method marked when they exceed one std) and writes ``OUT/results.json`` and
``OUT/compare.md``. Finished runs are kept under ``OUT/runs/``: the same command resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flowprune.commands._common import (
    Timer,
    add_data_arguments,
    check_data_fits_model,
    check_int,
    check_model_name,
    check_out_path,
    load_data,
    load_model_arg,
    open_run,
    setup_parser,
)

NAME = "compare"
HELP = "compare pruning methods (flowprune scores and Torch-Pruning's) from one dense model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    setup_parser(p)
    src = p.add_argument_group("dense model")
    src.add_argument("--checkpoint", default=None,
                     help="directory written by `flowprune train --out DIR`, or one per seed, comma-separated "
                          "(seed i prunes dense model i: the spread then covers dense training too)")
    src.add_argument("--model", default=None, help="zoo name to train first when no --checkpoint is given")
    src.add_argument("--epochs", type=int, default=15, help="dense training epochs with --model (default 15); "
                     "also the train-from-scratch budget unless --scratch-epochs is given")
    src.add_argument("--lr", type=float, default=0.05, help="dense training learning rate with --model")
    src.add_argument("--dense-per-seed", action="store_true",
                     help="with --model: train one dense model per seed (OUT/dense_s<i>), the fair protocol")
    add_data_arguments(p)
    from flowprune.procedures import list_procedures

    p.add_argument("--methods", default="agf,agf-paper,l2,taylor,random,tp-magnitude-uniform,tp-magnitude-global,"
                   "tp-taylor-global",
                   help="comma-separated registered procedures: " + ", ".join(list_procedures())
                        + " (flowprune scores; Torch-Pruning anchors tp-*, -uniform/-global fix its ranking mode; "
                          "your own with @register_procedure)")
    p.add_argument("--targets", default="2x,4x,8x,16x", help="MACs reductions, comma-separated (default 2x,4x,8x,16x)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1) per method x target (default 3)")
    p.add_argument("--finetune-epochs", type=int, default=1, help="fine-tune epochs after the cut, every method")
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--recovery", default="finetune", help="recovery of every method: finetune (plain, default) or "
                   "kd (distillation from the dense model)")
    p.add_argument("--finetune-batches", type=int, default=None, help="cap on steps per fine-tune epoch")
    p.add_argument("--calib-batches", type=int, default=10, help="calibration batches T (default 10)")
    p.add_argument("--calib-batch-size", type=int, default=128)
    p.add_argument("--budget", default=None, help="flowprune budget: global (default), layer or macs")
    p.add_argument("--no-compensate", action="store_true", help="flowprune methods: no mean compensation")
    p.add_argument("--tp-mode", default="auto", help="Torch-Pruning ratio: auto (uniform, else global), uniform, global")
    p.add_argument("--scratch-epochs", type=int, default=None,
                   help="train-from-scratch epochs at the AGF architecture (default: the dense budget; 0 = skip)")
    p.add_argument("--scratch-seeds", type=int, default=None, help="seeds for the scratch baseline (default: all)")
    p.add_argument("--no-speed", action="store_true", help="skip latency/throughput measurement")
    p.add_argument("--out", required=True, help="output directory (results.json, compare.md, runs/)")


def _dense_budget(checkpoint: str) -> int | None:
    """Epochs the checkpoint was trained for, from its results.json (written by `flowprune train`)."""
    p = Path(checkpoint) / "results.json"
    if p.exists():
        try:
            return int(json.loads(p.read_text()).get("epochs"))
        except (ValueError, TypeError, json.JSONDecodeError):
            return None
    return None


def compare_config(args: argparse.Namespace):
    """The :class:`~flowprune.compare.CompareConfig` the arguments ask for (values checked by the library)."""
    from flowprune.compare import CompareConfig
    from flowprune.train import TrainConfig

    check_int("--seeds", args.seeds, 1, 1000)
    check_int("--epochs", args.epochs, 1)
    check_int("--finetune-epochs", args.finetune_epochs, 0)
    check_int("--calib-batches", args.calib_batches, 1)
    check_int("--calib-batch-size", args.calib_batch_size, 1)
    check_int("--finetune-batches", args.finetune_batches, 1, allow_none=True)
    check_int("--scratch-epochs", args.scratch_epochs, 0, allow_none=True)
    check_int("--scratch-seeds", args.scratch_seeds, 0, allow_none=True)
    return CompareConfig.resolve(None, dict(
        methods=args.methods, targets=[t for t in args.targets.split(",") if t.strip()], seeds=args.seeds,
        finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr, finetune_batches=args.finetune_batches,
        calib_batches=args.calib_batches, calib_batch_size=args.calib_batch_size,
        dense_config=TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed), scratch_epochs=args.scratch_epochs,
        scratch_seeds=args.scratch_seeds, plan_options={"budget": args.budget} if args.budget else None,
        tp_mode=args.tp_mode, measure_speed=not args.no_speed, compensate=not args.no_compensate,
        recovery=args.recovery))


def _load_dense(args: argparse.Namespace, data):
    """The dense model(s) of ``--checkpoint A[,B,C]`` (one per seed, or one for all), checked against the data."""
    from flowprune.errors import FlowpruneError

    dirs = [d.strip() for d in args.checkpoint.split(",") if d.strip()]
    if len(dirs) > 1 and len(dirs) != args.seeds:
        raise FlowpruneError(f"--checkpoint lists {len(dirs)} models but --seeds is {args.seeds}; give one "
                             "dense model per seed, or one for all")
    models = [load_model_arg(d) for d in dirs]
    for m in models:
        check_model_name(args, m)
        check_data_fits_model(m, data, "the dense model")
    if len({m.flowprune_base["name"] for m in models}) > 1:
        raise FlowpruneError("the --checkpoint models are of different architectures; give one model per seed "
                             "of the same architecture")
    return (models if len(models) > 1 else models[0]), _dense_budget(dirs[0])


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from flowprune.errors import FlowpruneError

    cfg = compare_config(args)  # validate everything before any work
    if args.checkpoint is None and args.model is None:
        raise FlowpruneError("give --checkpoint DIR (a trained model) or --model NAME --epochs N (train one first)")
    check_out_path(args.out)
    data = load_data(args)
    model = None
    if args.checkpoint is not None:
        model, epochs = _load_dense(args, data)
        if epochs:  # the scratch baseline gets the dense model's own budget
            cfg = replace(cfg, dense_config=replace(cfg.dense_config, epochs=epochs),
                          scratch_epochs=cfg.scratch_epochs if args.scratch_epochs is not None else epochs)
    else:
        from flowprune.models import build_model

        build_model(args.model, data.input_shape, data.num_classes)  # unknown name -> error before any write
    run = open_run(args, inputs=(("--checkpoint", args.checkpoint),))
    if run.finished:
        return 0
    out = run.out
    if run.resumed:
        n = len(list((out / "runs").glob("*.json"))) if (out / "runs").exists() else 0
        print(f"flowprune: compare resumes: {n} finished run(s) in {out / 'runs'} are kept", file=sys.stderr)
    with run:
        return _work(args, run, out, data, model, cfg)


def _work(args, run, out, data, model, cfg) -> int:
    from flowprune.compare import compare

    if model is None:
        from dataclasses import replace

        from flowprune.api import train_model

        seeds = range(args.seeds) if args.dense_per_seed else [None]
        model = []
        for s in seeds:
            d = out / ("dense" if s is None else f"dense_s{s}")
            dense_cfg = cfg.dense_config if s is None else replace(cfg.dense_config, seed=s)
            res = train_model(args.model, data, dense_cfg, out_dir=d, measure_speed=False)
            model.append(res.model)
            print(f"dense {args.model}: test accuracy {100 * res['accuracy']:.1f} % (saved to {d})")
        model = model if len(model) > 1 else model[0]
    with Timer() as t:
        res = compare(model, data, cfg, out_dir=out)
    run.finish()
    print(res.table)
    print(f"\n{t.seconds:.0f} s; wrote {out / 'results.json'} and {out / 'compare.md'}")
    return 0
