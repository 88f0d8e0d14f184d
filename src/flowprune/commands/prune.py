"""``flowprune prune``: structural pruning of a trained model (AGF or a baseline score).

    flowprune prune --checkpoint runs/dense --data mnist5k --method agf --target-macs 4x --out runs/agf4x

writes ``OUT/results.json`` (accuracy of the dense model, after the cut, after BatchNorm
re-estimation and after fine-tuning; MACs, params, per-unit widths, latency, seed, method, the
per-step history) and the pruned model (``OUT/model.safetensors`` + ``OUT/model.json``).
Step checkpoints go to ``OUT/steps/`` so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import sys

from flowprune.commands import _speed
from flowprune.commands._common import (
    Timer,
    add_checkpoint_arguments,
    add_data_arguments,
    check_out_path,
    load_checkpoint_and_data,
    open_run,
    setup_parser,
)

NAME = "prune"
HELP = "prune a trained model's channels / neurons / heads by AGF or a baseline score"


def add_arguments(p: argparse.ArgumentParser) -> None:
    setup_parser(p)
    add_checkpoint_arguments(p)
    add_data_arguments(p)
    from flowprune.scores import list_scores

    p.add_argument("--method", default="agf", help=f"score: {', '.join(list_scores())} (default agf)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--target-macs", default=None, help="MACs reduction, e.g. 4x (= 4 times fewer MACs)")
    g.add_argument("--ratio", type=float, default=None, help="fraction of every unit's width to remove, in [0, 1)")
    g.add_argument("--target-speedup", default=None,
                   help="measured speed-up on --device at --batch-size, e.g. 3x (a latency lookup table of the "
                        "model is measured there once and cached; see docs/latency.md)")
    p.add_argument("--batch-size", type=int, default=1, help="with --target-speedup: the batch size the speed-up is "
                   "for (default 1)")
    p.add_argument("--backend", default="eager", help="with --target-speedup: how the model will run (eager)")
    p.add_argument("--latency-cache", default=None, help="with --target-speedup: where latency tables are cached "
                   "(default $FLOWPRUNE_CACHE_DIR/latency or ~/.cache/flowprune/latency)")
    p.add_argument("--steps", default="1", help="iterative pruning steps (default 1: one shot), or 'auto' "
                   "(one step per halving of the MACs)")
    p.add_argument("--schedule", default="geometric", help="geometric or linear")
    p.add_argument("--budget", default=None, help="global (default: one ranking of unit-normalised scores), layer "
                   "(per-layer top-k) or macs (utility per MAC saved)")
    p.add_argument("--normalize", default=None, help="global ranking normalisation: unit (default), block or none")
    p.add_argument("--no-compensate", action="store_true",
                   help="do not fold the removed channels' means into their consumers' biases")
    p.add_argument("--score-option", action="append", default=[], metavar="K=V",
                   help="an option of the score, e.g. --score-option abs_mode=elementwise (repeatable)")
    p.add_argument("--calib-batches", type=int, default=10, help="calibration batches T (default 10)")
    p.add_argument("--calib-batch-size", type=int, default=128)
    p.add_argument("--finetune-epochs", type=int, default=0, help="fine-tune epochs between steps")
    p.add_argument("--final-finetune-epochs", type=int, default=None,
                   help="fine-tune epochs after the last step (default: --finetune-epochs)")
    p.add_argument("--lr", type=float, default=0.01, help="fine-tune learning rate")
    p.add_argument("--recovery", default=None, help="recovery recipe: kd (default: distillation from the input "
                   "model, warm-up + cosine) or finetune (plain)")
    p.add_argument("--recovery-epochs", type=int, default=None,
                   help="one recovery budget in epochs shared by the steps (instead of --finetune-epochs)")
    p.add_argument("--recovery-option", action="append", default=[], metavar="K=V",
                   help="a recovery option: temperature, alpha, warmup_fraction, lr (repeatable)")
    p.add_argument("--round-to", type=int, default=1, help="kept widths are multiples of this")
    p.add_argument("--min-width", type=int, default=1, help="no unit goes below this width")
    p.add_argument("--out", required=True, help="output directory")
    _speed.add_speed_arguments(p)


def parse_steps(value: str) -> int | str:
    """``--steps``: a positive integer or ``auto``."""
    from flowprune.errors import FlowpruneError

    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise FlowpruneError(f"--steps must be a positive integer or 'auto', got {value!r}") from None
    if n < 1:
        raise FlowpruneError(f"--steps must be a positive integer or 'auto', got {value!r}")
    return n


def parse_options(flag: str, items: list[str]) -> dict:
    """``K=V`` strings -> a dict; V parsed as JSON where it can be (numbers, true/false), else a string."""
    import json

    from flowprune.errors import FlowpruneError

    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise FlowpruneError(f"{flag} must look like key=value, got {item!r}")
        try:
            out[k.strip()] = json.loads(v)
        except ValueError:
            out[k.strip()] = v
    return out


def prune_config(args: argparse.Namespace):
    """The :class:`~flowprune.pruning.structural.PruneConfig` the arguments ask for (validated by the library)."""
    from flowprune.errors import FlowpruneError
    from flowprune.pruning.structural import PruneConfig
    from flowprune.train import TrainConfig

    if args.target_macs is None and args.ratio is None and args.target_speedup is None:
        raise FlowpruneError("give --target-macs (e.g. 4x), --target-speedup (e.g. 3x) or --ratio (a fraction in "
                             "[0, 1))")
    final_ft = args.finetune_epochs if args.final_finetune_epochs is None else args.final_finetune_epochs
    extra = {"normalize": args.normalize} if args.normalize is not None else {}
    return PruneConfig.resolve(None, dict(
        method=args.method, target_macs=args.target_macs, ratio=args.ratio, steps=parse_steps(args.steps),
        schedule=args.schedule, budget=args.budget, calib_batches=args.calib_batches,
        calib_batch_size=args.calib_batch_size, compensate=not args.no_compensate,
        score_options=parse_options("--score-option", args.score_option), finetune_epochs=args.finetune_epochs,
        final_finetune_epochs=final_ft, finetune_config=TrainConfig(lr=args.lr, seed=args.seed).validate(),
        min_width=args.min_width, round_to=args.round_to, seed=args.seed, target_speedup=args.target_speedup,
        batch_size=args.batch_size, backend=args.backend, recovery=args.recovery,
        recovery_epochs=args.recovery_epochs,
        recovery_options=parse_options("--recovery-option", args.recovery_option) or None, **extra))


def run(args: argparse.Namespace) -> int:
    from flowprune.data import make_loader
    from flowprune.measure import accuracy
    from flowprune.pruning.structural import prune

    cfg = prune_config(args)  # every value checked before any work
    check_out_path(args.out)
    model, data = load_checkpoint_and_data(args)
    run = open_run(args, inputs=(("--checkpoint", args.checkpoint),))
    if run.finished:
        return 0
    out = run.out
    if run.resumed and (out / "steps" / "state.json").exists():
        import json

        done = json.loads((out / "steps" / "state.json").read_text()).get("step")
        print(f"flowprune: prune resumes after step {done} of {cfg.steps} (checkpoints in {out / 'steps'})",
              file=sys.stderr)
    dense_acc = accuracy(model, make_loader(data.test, 512))
    with run, Timer() as t:
        res = prune(model, data, cfg, checkpoint_dir=out / "steps", latency_cache=args.latency_cache)
    results = _results(args, model, data, res, dense_acc, t.seconds)
    _save_and_print(args, out, data, res, results)
    run.finish()
    print(f"saved to {out}/ (model.safetensors, model.json, results.json)")
    return 0


def _results(args, model, data, res, dense_acc: float, seconds: float) -> dict:
    """``OUT/results.json``: the dense model, every stage's accuracy, sizes, speed and the history."""
    from flowprune.data import make_loader
    from flowprune.measure import accuracy, count_macs_params

    last = res.history[-1] if res.history else {}
    dense_macs, dense_params = count_macs_params(model, data.input_shape)
    results = {"model_name": model.flowprune_base["name"], "data": data.name, "method": args.method,
               "seed": args.seed, "target_macs": args.target_macs, "ratio": args.ratio,
               "budget": res.config["budget"], "steps": res.config["steps"],
               "dense_accuracy": dense_acc, "accuracy_after_cut": last.get("acc_cut"),
               "accuracy_after_bn": last.get("acc_bn"),
               "accuracy_before_finetune": last.get("acc_bn", last.get("acc_cut")),
               "accuracy_after_finetune": last.get("acc_ft"), "accuracy": accuracy(res.model, make_loader(data.test, 512)),
               "macs": res.macs, "params": res.params, "dense_macs": dense_macs, "dense_params": dense_params,
               "macs_reduction": dense_macs / max(res.macs, 1), "widths": res.widths, "history": res.history,
               "seconds": seconds, "config": res.config, "unsupported_layers": res.unsupported,
               "target_speedup": args.target_speedup, "latency": res.latency}
    speed = _speed.measure(args, {"dense": model, "pruned": res.model}, data.input_shape, "dense")
    if speed is not None:
        b = args.speed_batch
        results.update(_speed.flat(speed, "pruned"), speed=speed,
                       latency_ms_b1=1e3 * speed["b1"]["seconds"]["pruned"],
                       **{f"throughput_b{b}": speed[f"b{b}"]["per_second"]["pruned"]},
                       dense_speed={"latency_ms_b1": 1e3 * speed["b1"]["seconds"]["dense"],
                                    f"throughput_b{b}": speed[f"b{b}"]["per_second"]["dense"]})
    return results


def _save_and_print(args, out, data, res, results: dict) -> None:
    from flowprune.io import save
    from flowprune.report import format_table, write_results

    save(res.model, out, metadata={"stage": "pruned", "method": args.method, "data": data.name,
                                   "accuracy": results["accuracy"], "seed": args.seed,
                                   "cuts": getattr(res.model, "flowprune_metadata", {}).get("cuts", [])})
    write_results(out / "results.json", results)

    def pct(v):
        return None if v is None else 100 * v

    print(format_table([{"method": args.method, "target": args.target_macs or args.target_speedup or args.ratio,
                         "dense acc %": pct(results["dense_accuracy"]), "cut %": pct(results["accuracy_after_cut"]),
                         "BN %": pct(results["accuracy_after_bn"]), "final %": pct(results["accuracy"]),
                         "MACs x": results["macs_reduction"], "params": res.params,
                         "latency b1 ms": results.get("latency_ms_b1"),
                         **_speed.columns(results.get("speed"), "pruned")}]))
    line = _speed.describe(results.get("speed"))
    if line:
        print(line)
    if res.latency:
        lat = res.latency
        print(f"speed-up on {lat['device']} ({lat['backend']}): target {lat['target_speedup']:g}x, predicted "
              f"{lat['predicted_speedup']:.2f}x, measured {lat['measured_speedup_b' + str(lat['batch_size'])]:.2f}x "
              f"at batch {lat['batch_size']} and {lat['measured_speedup_b1']:.2f}x at batch 1; "
              f"{lat['macs_reduction']:.2f}x fewer MACs")
    if res.unsupported:
        from flowprune.notices import short_text

        print(short_text("left intact (flowprune cannot cut them)", res.unsupported))
