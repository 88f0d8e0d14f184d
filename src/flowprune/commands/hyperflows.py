"""``flowprune hyperflows [prune|sweep]``: unstructured pruning by pressure and regrowth.

``flowprune hyperflows --checkpoint DENSE --data mnist5k --target-sparsity 0.95 --out DIR``
prunes a saved model (``DENSE`` is a directory written by ``flowprune train --out``; with
``--model NAME`` and no ``--checkpoint`` a dense model is trained first for ``--dense-epochs``)
and writes ``DIR/results.json``, the pruned model (``DIR/model.safetensors`` + ``model.json``,
masks baked in: loads with ``flowprune.io.load``), its compact CSR copy in ``DIR/sparse/`` and
the per-epoch checkpoint ``DIR/hyperflows.pt`` (running the same command again resumes).

``flowprune hyperflows sweep --checkpoint DENSE --gammas 0.25,0.5,1,2,4,8 --out DIR`` trains under
each constant pressure and fits the pressure -> sparsity law; pass ``--law DIR/results.json`` to
a later prune run to seed its initial gamma from the fit.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from flowprune.commands import _speed
from flowprune.commands._common import (
    Timer,
    add_data_arguments,
    check_data_fits_model,
    check_out_path,
    load_data,
    open_run,
    setup_parser,
)
from flowprune.errors import FlowpruneError

NAME = "hyperflows"
HELP = "unstructured pruning by pressure and regrowth (Hyperflows); 'sweep' fits the pressure law"


def add_arguments(p: argparse.ArgumentParser) -> None:
    setup_parser(p)
    p.add_argument("action", nargs="?", default="prune", choices=("prune", "sweep"),
                   help="prune (default) or sweep (constant pressures + power-law fit)")
    p.add_argument("--checkpoint", default=None, help="saved dense model directory (flowprune train --out DIR)")
    p.add_argument("--model", default=None, help="zoo name; checked against --checkpoint, or trained first if "
                   "no --checkpoint is given")
    p.add_argument("--dense-epochs", type=int, default=10, help="epochs of dense training when no --checkpoint")
    add_data_arguments(p)
    p.add_argument("--target-sparsity", type=float, default=0.9, help="share of masked weights to remove, in (0, 1)")
    p.add_argument("--epochs", type=int, default=10, help="pruning epochs (per pressure for sweep)")
    p.add_argument("--regrow-epochs", type=int, default=5, help="regrowth epochs after pruning (no pressure)")
    p.add_argument("--lr", type=float, default=0.02, help="SGD learning rate of the weights")
    p.add_argument("--mask-lr", type=float, default=None, help="Adam learning rate of the mask logits "
                   "(default: 5 / pruning steps, clipped to [1e-3, 0.05])")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--gamma0", type=float, default=None, help="initial pressure (default 1, or from --law)")
    p.add_argument("--law", default=None, help="results.json of a sweep: seeds the initial pressure")
    p.add_argument("--updates-per-epoch", type=int, default=4, help="pressure updates per epoch (paper: 1)")
    p.add_argument("--no-correction", action="store_true", help="skip the final global top-k logit correction")
    p.add_argument("--tolerance", type=float, default=0.005, help="allowed distance of the scheduler's own end point "
                   "from the target (sparsity, absolute); a larger miss is reported as a warning")
    p.add_argument("--regrow-mode", default="hold", choices=("hold", "free"),
                   help="hold: the pressure controller keeps the target during regrowth (default); "
                   "free: no pressure during regrowth (paper), pruning aims at 0.9 x the target")
    p.add_argument("--finetune-steps", type=int, default=None, help="weight-training steps after the final "
                   "correction when it flips weights (default: one epoch; 0: none)")
    p.add_argument("--target-scope", default="masked", choices=("masked", "all"),
                   help="the target is a share of the masked weights (default) or of all Conv/Linear weights")
    p.add_argument("--exclude-classifier", action="store_true", help="leave the last Linear layer unmasked")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--gammas", default="0.25,0.5,1,2,4,8,16",
                   help="sweep: comma-separated constant pressures (default 2^k, k=-2..4)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    _speed.add_speed_arguments(p)


def _parse_gammas(text: str) -> list[float]:
    try:
        gs = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise FlowpruneError(f"--gammas must be comma-separated numbers, got {text!r}") from None
    if len(gs) < 2 or any(not (g > 0 and math.isfinite(g)) for g in gs):
        raise FlowpruneError(f"--gammas needs at least two positive finite pressures, got {text!r}")
    return gs


def _model(args: argparse.Namespace, data, *, train: bool = True):
    """The dense model: loaded from --checkpoint, or (train=True) trained from --model into OUT/dense."""
    from flowprune.commands._common import check_model_name, load_model_arg

    if args.checkpoint is not None:
        model = load_model_arg(args.checkpoint)
        check_model_name(args, model)
        check_data_fits_model(model, data, "--checkpoint model")
        return model
    if args.model is None:
        raise FlowpruneError("give --checkpoint DIR (a trained model) or --model NAME (trained first)")
    from flowprune.api import train_model
    from flowprune.train import TrainConfig

    cfg = TrainConfig(epochs=args.dense_epochs, seed=args.seed)
    try:
        cfg.validate()
    except FlowpruneError as e:
        raise FlowpruneError(f"--dense-epochs: {e}") from None
    if not train:
        from flowprune.models import build_model

        build_model(args.model, data.input_shape, data.num_classes)  # unknown name -> error before any write
        return None
    res = train_model(args.model, data, TrainConfig(epochs=args.dense_epochs, seed=args.seed),
                      out_dir=Path(args.out) / "dense", measure_speed=False)
    return res["model"]


def run(args: argparse.Namespace) -> int:
    from flowprune.pruning.hyperflows import HyperflowsConfig

    # validate before any work
    cfg = HyperflowsConfig(target_sparsity=args.target_sparsity, prune_epochs=args.epochs,
                           regrow_epochs=args.regrow_epochs, lr=args.lr, mask_lr=args.mask_lr,
                           batch_size=args.batch_size, seed=args.seed, gamma0=args.gamma0,
                           updates_per_epoch=args.updates_per_epoch,
                           final_correction="none" if args.no_correction else "topk",
                           tolerance=args.tolerance, regrow_mode=args.regrow_mode,
                           finetune_steps=args.finetune_steps, target_scope=args.target_scope,
                           include_classifier=not args.exclude_classifier, augment=not args.no_augment).validate()
    gammas = _parse_gammas(args.gammas) if args.action == "sweep" else None
    law = None
    if args.law is not None:
        lp = Path(args.law)
        lp = lp / "results.json" if lp.is_dir() else lp
        if not lp.exists():
            raise FlowpruneError(f"--law {args.law!r} does not exist; pass the results.json of a sweep")
        from flowprune.io import read_json_file

        law = read_json_file(lp, "sweep results.json")
        if not isinstance(law, dict) or not isinstance(law.get("fit"), dict):
            raise FlowpruneError(f"--law {args.law!r} holds no fit (not a sweep's results.json, or the sweep had "
                                 "fewer than two usable points)")
    check_out_path(args.out)
    data = load_data(args)
    model = _model(args, data, train=False)
    run = open_run(args, inputs=(("--checkpoint", args.checkpoint),))
    if run.finished:
        return 0
    out = run.out
    if run.resumed:
        done = [p.name for p in (out.glob("gamma_*/hyperflows.pt") if args.action == "sweep" else
                                 out.glob("hyperflows.pt"))]
        print(f"flowprune: hyperflows resumes from {len(done)} checkpoint(s) in {out}", file=sys.stderr)
    with run:
        if model is None:
            model = _model(args, data)
        return _work(args, run, out, data, model, cfg, gammas, law)


def _sparse_speed(args, pruned, data, sparsity: float) -> dict:
    """The pruned model run dense, with every sparse layer, and with the auto choice, timed together;
    their work for the plausibility check is the nonzero MACs (dense MACs x density)."""
    import torch

    from flowprune.measure import count_macs_params
    from flowprune.sparse import to_sparse_execution

    fast = to_sparse_execution(pruned)
    auto = to_sparse_execution(pruned, example_input=torch.randn(1, *data.input_shape))
    dense_macs = count_macs_params(pruned, data.input_shape)[0]
    nonzero = max(1, round(dense_macs * (1.0 - sparsity)))
    sp = _speed.measure(args, {"dense": pruned, "sparse": fast, "auto": auto}, data.input_shape, "dense",
                        macs={"dense": dense_macs, "sparse": nonzero, "auto": nonzero})
    sp.update({f"{k}_latency_ms_b1": 1e3 * sp["b1"]["seconds"][k] for k in ("dense", "sparse", "auto")},
              sparse_layers=fast.sparse_layers, auto_sparse_layers=auto.sparse_layers)
    return {"speed": sp, **_speed.flat(sp, "auto")}


def _work(args, run, out, data, model, cfg, gammas, law) -> int:
    from flowprune.pruning.hyperflows import hyperflows_prune, pressure_sweep
    from flowprune.report import format_table, write_results

    if args.action == "sweep":
        with Timer() as t:
            res = pressure_sweep(model, data, gammas, cfg, out_dir=out, resume=not args.no_resume)
        res["seconds"] = t.seconds
        write_results(out / "results.json", res)
        run.finish()
        print(format_table([{k: r[k] for k in ("gamma", "remaining", "sparsity", "accuracy")} for r in res["runs"]],
                           title=f"pressure sweep, {args.epochs} epochs each", digits=4))
        if res["fit"]:
            f = res["fit"]
            line = f"power law: S = {f['power']['c']:.4g} * gamma^(-{f['power']['a']:.4g}), R^2 = {f['power']['r2']:.4f}"
            if "log_quadratic" in f:
                q = f["log_quadratic"]
                line += (f"; log-quadratic: c={q['c']:.4g}, a0={q['a0']:.4g}, a1={q['a1']:.4g}, "
                         f"R^2 = {q['r2']:.4f}")
            print(line)
        print(f"saved to {out}/results.json")
        return 0

    import warnings

    from flowprune.io import save
    from flowprune.sparse import save_sparse

    with Timer() as t, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Hyperflows: the scheduler ended")  # printed below instead
        result = hyperflows_prune(model, data, cfg, checkpoint_dir=out, resume=not args.no_resume, law=law)
    pruned = result.model
    res = dict(result.record)
    res["seconds"] = t.seconds
    meta = {"stage": "hyperflows", "data": data.name, "target_sparsity": cfg.target_sparsity,
            "sparsity": res["sparsity"], "accuracy": res["accuracy"], "seed": cfg.seed}
    save(pruned, out, metadata=meta)
    sp_dir = save_sparse(pruned, out / "sparse", metadata=meta)
    sp_info = json.loads((sp_dir / "model.json").read_text())["sparse"]
    res["sparse_file_bytes"] = sp_info["stored_bytes"]
    res["dense_file_bytes"] = sp_info["dense_bytes"]
    if not args.no_speed:
        res.update(_sparse_speed(args, pruned, data, res["sparsity"]))
    res["test_accuracy"] = res["accuracy"]
    write_results(out / "results.json", res)
    run.finish()
    sch, cor = res["scheduler"], res["correction"]
    row = {"target": cfg.target_sparsity, "sparsity": res["sparsity"],
           "scheduler end": sch["sparsity"], "flipped": cor["flipped"],
           "acc % scheduler": 100 * sch["accuracy"] if sch["accuracy"] is not None else None,
           "test acc %": 100 * res["accuracy"], "regrew": res["regrew_total"], "seconds": t.seconds}
    if "speed" in res:
        row["dense ms"] = res["speed"]["dense_latency_ms_b1"]
        row["sparse ms"] = res["speed"]["sparse_latency_ms_b1"]
        row["auto ms"] = res["speed"]["auto_latency_ms_b1"]
        row.update(_speed.columns(res["speed"], "auto"))
    print(format_table([row], digits=4))
    if "speed" in res:
        print(_speed.describe(res["speed"]) + "\n(speed-up columns: the auto sparse execution over the dense one)")
    if not sch["within_tolerance"]:
        print(f"WARNING: {sch['warning']}; fine-tuned {cor['finetune_steps']} steps after it")
    else:
        print(f"scheduler end point {sch['sparsity']:.4f} is within {sch['tolerance_pp']:.2f} pp of the target")
    print(f"saved to {out}/ (model.safetensors, model.json, sparse/, results.json)")
    return 0
