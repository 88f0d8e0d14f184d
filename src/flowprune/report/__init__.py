"""Reporting, the last step of the flow: results.json files, plain-text tables and HTML reports.

* :func:`write_results`, :func:`format_table`, :func:`fmt` -- ``results.json`` and Markdown tables.
* :func:`write_report` -- ``OUT/report.html`` from ``OUT/results.json``: one self-contained page
  (matplotlib PNGs inline as base64, no script, no network) with a summary table and the plots
  each kind of run supports (see :mod:`flowprune.report.html`). Every command writes one.
* :func:`merge_reports` -- several runs on one page (``flowprune report DIR [DIR ...] --out FILE``).
"""

from __future__ import annotations

import os
from pathlib import Path

from flowprune.report.results import _clean, fmt, format_table, write_results

__all__ = ["write_results", "format_table", "fmt", "write_report", "merge_reports", "_clean"]


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, title: str | None = None) -> Path:
    """Write ``run_dir/report.html`` (or ``out``) from ``run_dir/results.json``; returns its path.

    A directory without ``results.json`` whose sub-directories hold runs (``flowprune demo``) gives
    one page for all of them. See :func:`flowprune.report.html.write_html`.
    """
    from flowprune.report.html import write_html

    d = Path(run_dir)
    return write_html([d], Path(out) if out is not None else d / "report.html", title=title)


def merge_reports(run_dirs, out: str | os.PathLike, *, title: str | None = None) -> Path:
    """One HTML page for several run directories (each as in :func:`write_report`); returns its path."""
    from flowprune.report.html import write_html

    return write_html([Path(d) for d in run_dirs], Path(out), title=title)
