"""The README's test count and demo table, written from the outputs of the commands behind them.

    python -m benchmarks.readme_figures --test-log .ci-test.log --demo runs/demo/summary.json          # rewrite
    python -m benchmarks.readme_figures --test-log .ci-test.log --demo runs/demo/summary.json --check  # CI

README.md marks the two blocks with ``<!-- figures:tests -->`` ... ``<!-- /figures:tests -->`` and
``<!-- figures:demo -->`` ... ``<!-- /figures:demo -->``. Without ``--check`` the blocks are rewritten
from the pytest log of ``make test`` (its last summary line and the ``-ra`` skip reasons) and from the
demo's ``summary.json`` (the rows ``flowprune demo`` prints, rendered by the same
:func:`flowprune.report.format_table`). With ``--check`` nothing is written; the figures in README.md are
compared with the outputs, and any difference beyond the tolerances below exits 1 naming it:

* test counts (passed, failed, skipped, errors): **exact**;
* accuracies and heavy usage (columns with ``acc`` or ``usage`` in the name, in %): within 3 standard
  errors of the difference of two binomial proportions on the demo's n test images,
  ``3 * sqrt(2 p (1 - p) / n)`` (about 2 points at 97.8 %, 3.2 points at 94 %, 6.7 points at 50 %
  usage for n = 1,000);
* MACs within 5 % (the planner's MACs target tolerance is 3 %), params within 25 % (which channels a
  pruned model keeps follows float noise in the scores: two machines of the same kind gave 41.65 K
  and 35.0 K for the demo's light expert), rel. cost within 0.1;
* timings (latency, throughput, seconds, speed-up ratios such as "x heavy b256"): not compared (they
  follow the machine and its load).

See docs/ci.md.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from flowprune.report import format_table

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = ("tests", "demo")
TIMING = ("latency", "throughput", "second", "time", "x heavy", "speed")  # speed ratios follow the load too
SUMMARY = re.compile(r"^=*\s*(?P<body>(?:\d+ (?:passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?)"
                     r"(?:, )?)+) in [\d.]+s")


def _block_re(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- figures:{name} -->\n)(.*?)(<!-- /figures:{name} -->)", re.S)


def read_block(readme: str, name: str) -> str:
    m = _block_re(name).search(readme)
    if not m:
        raise SystemExit(f"README.md has no <!-- figures:{name} --> ... <!-- /figures:{name} --> block")
    return m.group(2)


def replace_block(readme: str, name: str, body: str) -> str:
    read_block(readme, name)
    return _block_re(name).sub(lambda m: m.group(1) + body + m.group(3), readme, count=1)


# ------------------------------------------------------------------------------------------ tests

def test_counts(log: str) -> dict[str, int]:
    """Counts of pytest's last summary line (``676 passed, 5 skipped, 3 deselected in 151.20s``)."""
    found = [m.group("body") for line in log.splitlines() if (m := SUMMARY.match(line.strip()))]
    if not found:
        raise SystemExit("no pytest summary line (`N passed ... in S s`) in the test log")
    counts = {"passed": 0, "failed": 0, "skipped": 0, "deselected": 0, "errors": 0}
    for n, what in re.findall(r"(\d+) (\w+)", found[-1]):
        what = "errors" if what.startswith("error") else what
        if what in counts:
            counts[what] = int(n)
    return counts


def skip_reasons(log: str) -> list[tuple[int, str]]:
    """``(count, reason)`` of each ``SKIPPED [n] file:line: reason`` line of ``-ra``."""
    out: dict[str, int] = {}
    for m in re.finditer(r"^SKIPPED \[(\d+)\] [^:]+:\d+: (.+)$", log, re.M):
        out[m.group(2).strip()] = out.get(m.group(2).strip(), 0) + int(m.group(1))
    return sorted(((n, r) for r, n in out.items()), key=lambda t: (-t[0], t[1]))


def render_tests(log: str) -> str:
    c = test_counts(log)
    reasons = "; ".join(f"{n}: {r}" for n, r in skip_reasons(log))
    return (f"**Tests** (`make test`, the first pass of `bash .ci/run`): **{c['passed']} passed**, "
            f"{c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped"
            + (f" ({reasons})" if reasons else "") + f", {c['deselected']} deselected (marked slow). "
            "CI runs the suite a second time with 2 threads in shuffled order ([docs/ci.md](docs/ci.md)).\n")


def check_tests(block: str, log: str) -> list[str]:
    c = test_counts(log)
    errs = []
    for key in ("passed", "failed", "errors", "skipped", "deselected"):
        m = re.search(rf"(\d[\d,]*)\**\s+(?:tests? )?{key}", block)
        if not m:
            errs.append(f"tests: the README block does not state a '{key}' count")
        elif int(m.group(1).replace(",", "")) != c[key]:
            errs.append(f"tests: README says {m.group(1)} {key}, the log says {c[key]}")
    return errs


# ------------------------------------------------------------------------------------------- demo

def _rows(summary: dict) -> list[dict]:
    return summary["rows"]


def render_demo(summary: dict) -> str:
    return "```\n" + format_table(_rows(summary)) + "\n```\n"


def parse_table(text: str) -> list[dict[str, str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    if len(lines) < 3:
        return []
    cols = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(cols, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def number(cell: str) -> float | None:
    """``31.48M`` -> 31480000.0, ``-`` -> None."""
    cell = cell.strip()
    if cell in ("-", ""):
        return None
    mult = {"K": 1e3, "M": 1e6, "G": 1e9}.get(cell[-1], 1.0)
    return float(cell[:-1] if mult != 1.0 else cell) * mult


def tolerance(col: str, value: float, n_test: int) -> float | None:
    """Largest allowed |README - run| for a cell of column ``col`` (None: not compared)."""
    low = col.lower()
    if any(t in low for t in TIMING):
        return None
    if "acc" in low or "usage" in low:
        p = min(max(value / 100.0, 0.0), 1.0)
        return 100.0 * 3.0 * math.sqrt(2.0 * p * (1.0 - p) / n_test) + 0.01  # + the table's rounding
    if low == "macs":
        return 0.05 * abs(value)
    if low == "params":
        return 0.25 * abs(value)
    if "cost" in low:
        return 0.1
    return 0.0


def check_demo(block: str, summary: dict, n_test: int) -> list[str]:
    readme, run = parse_table(block), parse_table(format_table(_rows(summary)))
    if not readme:
        return ["demo: no table in the README block"]
    errs = []
    if [r.get("model") for r in readme] != [r.get("model") for r in run] or list(readme[0]) != list(run[0]):
        return [f"demo: rows/columns differ: README {[r.get('model') for r in readme]} {list(readme[0])}, "
                f"run {[r.get('model') for r in run]} {list(run[0])}"]
    for a, b in zip(readme, run):
        for col in a:
            if col == "model":
                continue
            va, vb = number(a[col]), number(b[col])
            if (va is None) != (vb is None):
                errs.append(f"demo: {a['model']} / {col}: README {a[col]}, run {b[col]}")
                continue
            tol = tolerance(col, vb, n_test) if vb is not None else None
            if tol is not None and abs(va - vb) > tol + 1e-9:
                errs.append(f"demo: {a['model']} / {col}: README {a[col]}, run {b[col]} (tolerance {tol:g})")
    return errs


def n_test_of(summary: dict) -> int:
    from flowprune.data import load_dataset

    route = summary.get("route", {})
    data = route.get("data") or "mnist5k"
    return len(load_dataset(data, seed=0).test) if data in ("mnist5k", "mnist1d", "digits") else 1000


# ------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    p.add_argument("--test-log", help="output of `make test` (pytest -q -ra)")
    p.add_argument("--demo", help="summary.json written by `make demo` (runs/demo/summary.json)")
    p.add_argument("--check", action="store_true", help="compare only; exit 1 on drift")
    args = p.parse_args(argv)
    if not args.test_log and not args.demo:
        p.error("give --test-log and/or --demo")
    path = Path(args.readme)
    readme = path.read_text()
    errs: list[str] = []
    new = readme
    if args.test_log:
        log = Path(args.test_log).read_text(errors="replace")
        if args.check:
            errs += check_tests(read_block(readme, "tests"), log)
        new = replace_block(new, "tests", render_tests(log))
    if args.demo:
        summary = json.loads(Path(args.demo).read_text())
        if args.check:
            errs += check_demo(read_block(readme, "demo"), summary, n_test_of(summary))
        new = replace_block(new, "demo", render_demo(summary))
    if args.check:
        for e in errs:
            print("README drift:", e, file=sys.stderr)
        print("README figures: " + ("DRIFT" if errs else "match the outputs"))
        return 1 if errs else 0
    path.write_text(new)
    print(f"rewrote the figures blocks of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
