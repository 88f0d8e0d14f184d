"""``flowprune idap``: IDAP++ filter pruning and/or whole-layer removal within an accuracy budget."""

from __future__ import annotations

import argparse
import sys

from flowprune.commands import _speed
from flowprune.commands._common import (
    Timer,
    add_data_arguments,
    check_out_path,
    load_checkpoint_and_data,
    open_run,
    setup_parser,
)
from flowprune.errors import FlowpruneError

NAME = "idap"
HELP = "IDAP++: flow-divergence filter pruning, then whole-layer removal, within a budget"

STAGE_CHOICES = {"1": (1,), "2": (2,), "1,2": (1, 2), "2,1": (2, 1)}


def parse_stages(text: str) -> tuple[int, ...]:
    key = text.replace(" ", "")
    if key not in STAGE_CHOICES:
        raise FlowpruneError(f"--stages {text!r} is not allowed; use one of: {', '.join(STAGE_CHOICES)}")
    return STAGE_CHOICES[key]


def _pct(x) -> float | None:
    return None if x is None else 100 * x


def add_arguments(p: argparse.ArgumentParser) -> None:
    setup_parser(p)
    p.add_argument("--model", default=None, help="zoo name of the model (checked against the checkpoint; optional)")
    p.add_argument("--checkpoint", required=True, help="trained dense model directory (written by `flowprune train`)")
    add_data_arguments(p)
    p.add_argument("--out", required=True, help="output directory: results.json, model/, idap checkpoints")
    p.add_argument("--stages", default="1,2", help="1 (filters), 2 (layers), 1,2 (default) or 2,1")
    g = p.add_argument_group("budget")
    g.add_argument("--max-drop", type=float, default=0.01,
                   help="largest allowed validation accuracy drop, a fraction (default 0.01 = one point)")
    g.add_argument("--max-output-error", type=float, default=None,
                   help="largest allowed sum||N0(x)-N(x)||^2 / sum||N0(x)||^2 on validation logits")
    g.add_argument("--no-accuracy-budget", action="store_true", help="use only --max-output-error")
    g.add_argument("--target-macs", type=float, default=None, help="stop at this MACs reduction factor (e.g. 3)")
    g.add_argument("--target-params", type=float, default=None, help="stop at this params reduction factor")
    g.add_argument("--val-split", choices=("split", "shared"), default="split",
                   help="split (default): recovery early stop on one half of the validation split, accepting a "
                        "step on the other; shared: both on the whole split (overfits the budget)")
    g.add_argument("--confidence-z", type=float, default=1.0,
                   help="accept only when drop + z * (paired standard error) <= --max-drop (default 1; 0 = the plain drop)")
    g.add_argument("--no-track-test", action="store_true",
                   help="do not measure the test accuracy next to every decision")
    s = p.add_argument_group("schedule and recovery")
    s.add_argument("--p0", type=float, default=0.05)
    s.add_argument("--T", type=int, default=10)
    s.add_argument("--alpha", type=float, default=1.5)
    s.add_argument("--max-steps", type=int, default=None, help="most stage-1 steps (default T)")
    s.add_argument("--max-retries", type=int, default=2,
                   help="after a stage-1 step breaks the budget: roll back and retry it this many times")
    s.add_argument("--retry-factor", type=float, default=0.5, help="each retry multiplies the step's fraction by this")
    s.add_argument("--recover-epochs", type=int, default=2)
    s.add_argument("--recover-batches", type=int, default=None, help="cap on batches per recovery epoch")
    s.add_argument("--stage2-recover-batches", type=int, default=None,
                   help="batches of recovery after a layer removal breaks the budget (0 = none)")
    s.add_argument("--final-epochs", type=int, default=0)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--round-to", type=int, default=1, help="round pruned widths to a multiple of this")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in OUT/checkpoint")
    _speed.add_speed_arguments(p)


def run(args: argparse.Namespace) -> int:
    import shutil

    from flowprune import io
    from flowprune.pruning.idap import idap
    from flowprune.report import format_table, write_results

    stages = parse_stages(args.stages)
    check_out_path(args.out)
    model, data = load_checkpoint_and_data(args)
    run = open_run(args, inputs=(("--checkpoint", args.checkpoint),))
    if run.finished:
        return 0
    out = run.out
    ckpt = out / "checkpoint"
    if args.no_resume and ckpt.exists():
        shutil.rmtree(ckpt)
    elif run.resumed and (ckpt / "idap_state.json").exists():
        print(f"flowprune: idap resumes from its checkpoint in {ckpt}", file=sys.stderr)
    with run, Timer() as t:
        res = idap(model, data, stages=stages, max_drop=None if args.no_accuracy_budget else args.max_drop,
                   max_output_error=args.max_output_error, target_macs=args.target_macs,
                   target_params=args.target_params, p0=args.p0, T=args.T, alpha=args.alpha,
                   max_steps=args.max_steps, max_retries=args.max_retries,
                   retry_factor=args.retry_factor, recover_epochs=args.recover_epochs,
                   recover_batches=args.recover_batches, stage2_recover_batches=args.stage2_recover_batches,
                   final_epochs=args.final_epochs, lr=args.lr, round_to=args.round_to, checkpoint_dir=ckpt,
                   seed=args.seed, progress=None, val_split=args.val_split, confidence_z=args.confidence_z,
                   track_test=not args.no_track_test)
    summary = res.to_dict()
    summary.update(command="idap", checkpoint=args.checkpoint, data=args.data, seed=args.seed,
                   seconds=t.seconds, model_name=model.flowprune_base.get("name"))
    speed = _speed.measure(args, {"dense": model, "pruned": res.model}, data.input_shape, "dense")
    if speed is not None:
        summary.update(_speed.flat(speed, "pruned"), speed=speed, macs_reduction=res.final["macs_reduction"])
    io.save(res.model, out / "model", metadata={"method": "idap", "stages": list(stages),
                                                "removed_blocks": res.removed_blocks,
                                                "essential_blocks": res.essential_blocks,
                                                "stop_reason": res.stop_reason})
    write_results(out / "results.json", summary)
    run.finish()
    rows = [{"step": f"{s['stage']}.{s.get('step', '')}", "block": s.get("block", ""),
             "accepted": s.get("accepted"), "val acc %": 100 * s["accuracy"] if "accuracy" in s else None,
             "test acc %": _pct(s.get("test_accuracy", s.get("rejected_test_accuracy"))),
             "MACs": s.get("macs"), "params": s.get("params")} for s in res.steps]
    if rows:
        print(format_table(rows, title="IDAP++ steps"))
    print(format_table([{"": "dense", "test acc %": 100 * (res.dense["test_accuracy"] or 0), "MACs": res.dense["macs"],
                         "params": res.dense["params"]},
                        {"": "pruned", "test acc %": 100 * (res.final["test_accuracy"] or 0),
                         "MACs": res.final["macs"], "params": res.final["params"], **_speed.columns(speed, "pruned")}]))
    if speed is not None:
        print(_speed.describe(speed))
    print(f"MACs {res.final['macs_reduction']:.2f}x fewer, params {res.final['params_reduction']:.2f}x fewer; "
          f"blocks removed: {len(res.removed_blocks)}, kept as essential: {len(res.essential_blocks)}")
    if "2" in res.stage_reasons and res.stage_reasons["2"].startswith("skipped"):
        print(f"stage 2 {res.stage_reasons['2']}")
    print(f"stopped: {res.stop_reason}")
    print(f"wall time {res.seconds / 60:.1f} min")
    print(f"saved to {out}/ (model/, results.json)")
    return 0
