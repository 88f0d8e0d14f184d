"""``flowprune route``: put a light and a heavy expert behind a calibrated router, measure, save."""

from __future__ import annotations

import argparse
import sys

from flowprune.commands._common import (
    add_data_arguments,
    check_data_fits_model,
    check_out_path,
    load_data,
    load_model_arg,
    open_run,
    setup_parser,
)

NAME = "route"
HELP = "route inputs between a light (pruned) and a heavy (full) model with a calibrated threshold"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from flowprune.route.routers import describe_options, list_routers

    setup_parser(p)
    p.add_argument("--light", required=True, help="saved light expert (directory written by flowprune)")
    p.add_argument("--heavy", required=True, help="saved heavy expert (directory written by flowprune)")
    add_data_arguments(p)
    p.add_argument("--router", default="confidence", choices=list_routers(),
                   help="routing signal (default confidence); any router registered with @register_router")
    p.add_argument("--router-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the router, repeatable; values: true/false, none, numbers or names. "
                        + "; ".join(f"{n}: {describe_options(n)}" for n in list_routers()))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--heavy-budget", type=float, default=None,
                   help="fraction of inputs sent to the heavy expert, in [0, 1] (default 0.5)")
    g.add_argument("--max-drop", type=float, default=None,
                   help="accuracy drop allowed versus the heavy expert on the val split, in [0, 1]")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="accepted standard error of the calibrated usage/accuracy (default 0.05)")
    p.add_argument("--l1-direction", default="auto", choices=("auto", "low_is_hard", "high_is_hard"),
                   help="l1 router: which feature-norm direction means hard (auto: chosen on val); "
                        "same as --router-option direction=...")
    p.add_argument("--learned-fraction", type=float, default=0.5,
                   help="learned router: share of the val split that trains it, in (0, 1) (default 0.5)")
    p.add_argument("--learned-hidden", type=int, default=32, help="learned router: hidden units (default 32)")
    p.add_argument("--no-speed", action="store_true", help="skip latency/throughput/overhead measurement")
    p.add_argument("--no-sweep", action="store_true", help="skip the threshold sweep (Pareto curve)")
    p.add_argument("--no-diagnostic", action="store_true", help="skip the AGF signal-compression diagnostic")
    p.add_argument("--out", required=True, help="output directory (results.json, pareto.png, cascade/)")


def _router_options(args: argparse.Namespace) -> dict:
    """``--router-option k=v`` (checked against the router's options), plus the older
    ``--l1-direction`` for a router that takes a ``direction`` (an explicit option wins)."""
    from flowprune.route.routers import parse_router_options, router_class

    rk = parse_router_options(args.router_option, args.router)
    if args.l1_direction != "auto" and "direction" in router_class(args.router).accepted_options():
        rk.setdefault("direction", args.l1_direction)
    return rk


def route_config(args: argparse.Namespace):
    """The :class:`~flowprune.route.api.RouteConfig` the arguments ask for (values checked by the library)."""
    from flowprune.route.api import RouteConfig
    from flowprune.route.routers import get_router

    rk = _router_options(args)
    cfg = RouteConfig.resolve(None, dict(
        router=args.router, heavy_budget=args.heavy_budget, max_drop=args.max_drop, tolerance=args.tolerance,
        router_kwargs=rk, measure=not args.no_speed, sweep=not args.no_sweep, diagnostic=not args.no_diagnostic,
        seed=args.seed, learned_fraction=args.learned_fraction, learned_hidden=args.learned_hidden))
    get_router(args.router, **rk)  # an unknown option or a bad value fails here, before any loading
    return cfg


def run(args: argparse.Namespace) -> int:
    from flowprune.report import format_table
    from flowprune.route.api import route_experts

    cfg = route_config(args)
    check_out_path(args.out)
    light = load_model_arg(args.light, "--light")
    heavy = load_model_arg(args.heavy, "--heavy")
    data = load_data(args)
    check_data_fits_model(light, data, "--light")
    check_data_fits_model(heavy, data, "--heavy")
    run = open_run(args, inputs=(("--light", args.light), ("--heavy", args.heavy)))
    if run.finished:
        return 0
    out = run.out
    if run.resumed:  # routing has no intermediate checkpoint: it takes seconds, and is redone (same seed)
        print("flowprune: route resumes by redoing the calibration (deterministic for --seed)", file=sys.stderr)
    with run:
        res = route_experts(light, heavy, data, cfg, out_dir=out)
    run.finish()
    s = res.summary()
    rows = [{k: (100 * v if k.endswith("_acc") or k in ("heavy_usage",) or k.startswith("random_acc") else v)
             for k, v in s.items()}]
    print(format_table(rows, title="routed (accuracies and heavy usage in %)"))
    files = "results.json, " + ("" if args.no_sweep else "pareto.png, ") + "cascade/ -> flowprune.route.load_cascade"
    print(f"saved to {out}/ ({files})")
    return 0
