"""``flowprune report``: one self-contained HTML page for one or several runs.

    flowprune report runs/dense runs/agf4x runs/routed --out runs/report.html

Each DIR is a directory written by a flowprune command (it holds ``results.json``), or a
directory of such runs (``flowprune demo --out DIR``). Every command already writes
``OUT/report.html`` for its own run; this merges runs into one page (summary table, then each
run's plots, plus accuracy vs MACs over all runs). See :mod:`flowprune.report.html`.
"""

from __future__ import annotations

import argparse

NAME = "report"
HELP = "write one self-contained HTML report (summary table + plots) for one or more run directories"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run directories (each holds results.json) or a demo directory")
    p.add_argument("--out", required=True, help="the HTML file to write, e.g. runs/report.html")
    p.add_argument("--title", default=None, help="page title (default: the run names)")


def run(args: argparse.Namespace) -> int:
    from flowprune.report import merge_reports

    path = merge_reports(args.dirs, args.out, title=args.title)
    print(f"report: {path}")
    return 0
