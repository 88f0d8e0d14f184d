"""The ``flowprune`` command. Subcommands live in :mod:`flowprune.commands`, one module each.

A command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
Bad input prints one line, ``flowprune: error: ...``, and exits with 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from flowprune import __version__
from flowprune.errors import FlowpruneError


def _command_modules():
    import flowprune.commands as pkg

    mods = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mods.append(importlib.import_module(f"flowprune.commands.{info.name}"))
    return mods


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    common.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    common.add_argument("--no-report", action="store_true", help="do not write OUT/report.html after the command")
    parser = argparse.ArgumentParser(prog="flowprune", parents=[common],
                                     description="Make trained PyTorch networks smaller and faster.")
    parser.add_argument("--version", action="version", version=f"flowprune {__version__}")
    from flowprune.commands._common import setup_parser

    setup_parser(parser, overwrite=False)  # one-line argparse errors and the --threads range before the command too
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _command_modules():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP, parents=[common])
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _write_report(args: argparse.Namespace) -> None:
    """After a command succeeded: ``OUT/report.html`` from ``OUT/results.json`` (the one place every
    command's report is written). A failure here is a warning: the command's results are safe."""
    from pathlib import Path

    out = getattr(args, "out", None)
    if not out or getattr(args, "command", None) == "report":
        return
    d = Path(out)
    if not (d.is_dir() and (d / "results.json").is_file()):
        return
    try:
        from flowprune.report import write_report

        print(f"report: {write_report(d)}")
    except Exception as e:  # noqa: BLE001
        print(f"flowprune: warning: could not write {d / 'report.html'} ({type(e).__name__}: {e})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    debug = bool(getattr(args, "debug", False))
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise FlowpruneError(f"--threads must be a positive integer, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        rc = int(args._run(args) or 0)
        if rc == 0 and not getattr(args, "no_report", False):
            _write_report(args)
        return rc
    except FlowpruneError as e:
        if debug:
            raise
        print(f"flowprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flowprune: interrupted; run the same command again to resume from the last checkpoint",
              file=sys.stderr)
        return 130
    except FloatingPointError as e:
        if debug:
            raise
        print(f"flowprune: error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
