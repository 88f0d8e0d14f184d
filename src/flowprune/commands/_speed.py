"""The speed every model-making command reports (``--no-speed``, ``--speed-batch``, ``--speed-backend``).

After a command has made a model it times the new model and the one it came from together, in
one interleaved harness call per batch size (:func:`flowprune.measure.speed_compare` on
:mod:`flowprune.timing`), at batch 1 and at the throughput batch, and writes the result under
``results["speed"]`` with the flat figures ``speedup_b1``, ``speedup_b{B}``, ``macs_reduction`` and
``speed_backend`` beside it. It is cheap by default (a few rounds of ~20 ms each) and skipped with
``--no-speed``.
"""

from __future__ import annotations

import argparse

from flowprune.errors import check_positive_int

SPEED_OPTIONS = ("no_speed", "speed_batch", "speed_backend", "speed_rounds")


def add_speed_arguments(p: argparse.ArgumentParser) -> None:
    from flowprune.measure import SPEED_BATCH
    from flowprune.timing import BACKENDS

    g = p.add_argument_group("speed (measured next to the MACs reduction; docs/speed.md)")
    g.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    g.add_argument("--speed-batch", type=int, default=SPEED_BATCH,
                   help=f"throughput batch size of the speed measurement (default {SPEED_BATCH}; batch 1 always)")
    g.add_argument("--speed-backend", choices=BACKENDS, default="eager",
                   help="eager (default) or compile (torch.compile; falls back to eager, noted, where it fails)")
    g.add_argument("--speed-rounds", type=int, default=5, help="interleaved timing rounds (default 5)")


def measure(args: argparse.Namespace, models: dict, input_shape, base: str, macs: dict | None = None) -> dict | None:
    """``speed_compare(models, base=base)`` at batch 1 and ``--speed-batch``; None with ``--no-speed``."""
    if getattr(args, "no_speed", False):
        return None
    from flowprune.measure import speed_compare

    b = check_positive_int("--speed-batch", args.speed_batch)
    return speed_compare(models, input_shape, base=base, batch_sizes=(1, b), backend=args.speed_backend,
                         rounds=check_positive_int("--speed-rounds", args.speed_rounds), macs=macs)


def flat(speed: dict | None, other: str) -> dict:
    """The flat results.json figures of ``other`` (empty without a measurement)."""
    if speed is None:
        return {}
    from flowprune.measure import speed_summary

    return {**speed_summary(speed, other), "speed_refused": speed["refused"] or None}


def columns(speed: dict | None, other: str) -> dict:
    """Summary-table columns: speed-up at batch 1 and at the throughput batch ('refused' when refused)."""
    if speed is None:
        return {}
    out = {}
    for b in speed["batch_sizes"]:
        v = speed[f"b{b}"]["speedup"].get(other)
        out[f"speed-up b{b}"] = "refused" if v is None else f"{v:.2f}x"
    return out


def describe(speed: dict | None) -> str | None:
    """One printed line: how the speed figures were measured (or why some were refused)."""
    if speed is None:
        return None
    lb, la = speed.get("load_before"), speed.get("load_after")
    load = f"load {lb[0]:.2f} -> {la[0]:.2f}" if lb and la else "load unknown"
    line = (f"speed: {', '.join(speed['macs'])} timed together, interleaved ({speed['rounds']} rounds per batch "
            f"size, medians), {speed['backend']} on {speed['device']}, {speed['threads']} thread(s), {load}")
    for msg in speed["refused"]:
        line += f"\n  refused: {msg}"
    for note in speed["notes"]:
        line += f"\n  note: {note}"
    return line
