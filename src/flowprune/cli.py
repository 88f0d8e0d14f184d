"""The ``flowprune`` command. Subcommands live in :mod:`flowprune.commands`, one module each.

A command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
Plugins named in ``$FLOWPRUNE_PLUGINS`` (:mod:`flowprune.plugins`) are imported first, so the
scores, procedures and routers they register are among the choices.
Bad input prints one line, ``flowprune: error: ...``, and exits with 2; ``--debug`` shows the
traceback instead.

``--device`` and ``--amp`` (every command) are validated before any work, and the command runs
inside :func:`flowprune.device.use`. Started by ``torchrun --nproc-per-node N -m flowprune ...``,
``main`` joins the process group (:mod:`flowprune.distributed`) around the command: rank 0 writes
``--out`` and prints; every other rank works in a private scratch copy of ``--out`` (so resuming
behaves the same on every rank) that is removed at the end, with its standard output silenced.
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
    common.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: $FLOWPRUNE_THREADS, else $OMP_NUM_THREADS, else the cores "
                             "not busy by the load average, at most torch's default; see flowprune.threads)")
    common.add_argument("--no-report", action="store_true", help="do not write OUT/report.html after the command")
    from flowprune.commands._common import add_runtime_arguments

    add_runtime_arguments(common)  # --device, --amp
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


def _record_warnings(args: argparse.Namespace, warned: list[dict]) -> None:
    """Add the run's warnings, in full, to ``OUT/results.json`` (``warnings``; printed short, once)."""
    from pathlib import Path

    out = getattr(args, "out", None)
    path = Path(out) / "results.json" if out else None
    if not warned or path is None or not path.is_file():
        return
    import json

    from flowprune.report import write_results

    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(res, dict):
        return
    merged = list(res.get("warnings") or [])
    merged += [w for w in warned if w not in merged]
    if merged != res.get("warnings"):
        write_results(path, {**res, "warnings": merged})


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
    try:  # extensions in the user's own files ($FLOWPRUNE_PLUGINS): before the parser lists the choices
        from flowprune.plugins import load_plugins

        load_plugins()
    except FlowpruneError as e:
        if "--debug" in argv:
            raise
        print(f"flowprune: error: {e}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    debug = bool(getattr(args, "debug", False))
    from flowprune import distributed, notices

    scratch = None
    try:
        from flowprune.threads import configure

        configure(args.threads)  # --threads, FLOWPRUNE_THREADS, OMP_NUM_THREADS, else the idle cores
        from flowprune.device import check_amp, resolve_device, use

        dev = resolve_device(args.device if args.device is not None else "auto")  # before any work
        amp = check_amp(args.amp, dev)
        distributed.init_from_env(dev)
        scratch = _rank_scratch(args)
        with use(dev, amp), _quiet_unless_main(), notices.collect() as warned:
            rc = int(args._run(args) or 0)
        if rc == 0 and distributed.is_main():
            _record_warnings(args, warned)
            if not getattr(args, "no_report", False):
                _write_report(args)
        return rc
    except FlowpruneError as e:
        if debug:
            raise
        print(f"flowprune: error{_rank_tag()}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flowprune: interrupted; run the same command again to resume from the last checkpoint",
              file=sys.stderr)
        return 130
    except FloatingPointError as e:
        if debug:
            raise
        print(f"flowprune: error{_rank_tag()}: {e}", file=sys.stderr)
        return 3
    finally:
        if scratch is not None:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
        distributed.shutdown()


def _rank_tag() -> str:
    from flowprune import distributed

    return "" if distributed.is_main() else f" (rank {distributed.rank()})"


def _rank_scratch(args: argparse.Namespace) -> str | None:
    """Under torchrun, ranks other than 0 get a private copy of ``--out`` (returned: the folder to remove).

    The copy is taken before rank 0 writes anything (a barrier), so every rank sees the same
    earlier run (the same resume decision) and only rank 0 writes into the user's ``--out``.
    """
    from pathlib import Path

    from flowprune import distributed

    if not distributed.active():
        return None
    tmp = None
    out = getattr(args, "out", None)
    if distributed.rank() != 0 and isinstance(out, str) and out:
        import shutil
        import tempfile

        tmp = tempfile.mkdtemp(prefix=f"flowprune-rank{distributed.rank()}-")
        dst = Path(tmp) / "out"
        if Path(out).is_dir():
            shutil.copytree(out, dst, symlinks=True)
        args.out = str(dst)
    distributed.barrier()
    return tmp


def _quiet_unless_main():
    import contextlib
    import os

    from flowprune import distributed

    if distributed.is_main():
        return contextlib.nullcontext()
    return contextlib.redirect_stdout(open(os.devnull, "w"))  # noqa: SIM115 - closed at exit


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
