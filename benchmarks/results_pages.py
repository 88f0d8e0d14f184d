"""Every page in docs/results/ is written from the JSON beside it, by one registered writer.

    python -m benchmarks.results_pages --render            # rewrite every docs/results/X.md from X.json
    python -m benchmarks.results_pages --check             # exit 1 if a page differs (what tests/test_results_pages.py checks)
    python -m benchmarks.results_pages --archive X [--source TEXT]   # convert a hand-written X.md (see below)

``WRITERS`` maps a page name (``X`` for ``docs/results/X.md``) to a function ``payload -> markdown``;
:func:`write_page` writes ``X.json`` and ``X.md`` together, so a benchmark that calls it can never leave
the two apart. A new results page = its benchmark calls ``write_page("X", payload)`` and registers
a writer here with ``@writer("X")`` (or stores its page as blocks and uses :func:`render_blocks`).

Archived pages (``payload["kind"] == "archived-page"``): pages whose numbers were measured by the
commands they quote, but whose raw per-run results files (``runs/...``) did not survive on this
machine. ``--archive X`` converts such a page once into blocks (``{"md": text}`` for prose,
``{"table": {"columns": [...], "rows": [[...]]}}`` for each Markdown table, every cell kept as
written) plus a header saying so; the page is then rendered from that JSON like every other one.
Its numbers can be regenerated only by re-running the commands it quotes, not from a results file.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
WRITERS: dict[str, Callable[[dict], str]] = {}
ARCHIVE_NOTE = ("> **Archived page, not regenerable from raw results.** The numbers below were measured by the "
                "commands quoted with them; the per-run results files those commands wrote (`runs/...`) did "
                "not survive, so this page was converted once into [{name}.json]({name}.json) "
                "(`python -m benchmarks.results_pages --archive {name}`, {date}; every table cell kept as "
                "written) and is rendered from it by `python -m benchmarks.results_pages --render`. "
                "Re-running a quoted command is the only way to regenerate a number here.")


def writer(name: str):
    """Register ``fn(payload) -> markdown`` as the writer of ``docs/results/<name>.md``."""
    def deco(fn: Callable[[dict], str]) -> Callable[[dict], str]:
        WRITERS[name] = fn
        return fn
    return deco


def render(name: str, payload: dict) -> str:
    if payload.get("kind") == "archived-page":
        return render_blocks(payload)
    if name not in WRITERS:
        raise KeyError(f"no writer registered for docs/results/{name}.md: add `@writer({name!r})` in "
                       "benchmarks/results_pages.py (or store the page as blocks, see its docstring)")
    return WRITERS[name](payload)


def write_page(name: str, payload: dict, results_dir: Path = RESULTS) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` (rendered from that JSON) into ``results_dir``."""
    results_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=1, default=str) + "\n"
    (results_dir / f"{name}.json").write_text(text)
    md = render(name, json.loads(text))  # rendered from what was written, not from the live objects
    (results_dir / f"{name}.md").write_text(md)
    return results_dir / f"{name}.md"


# ------------------------------------------------------------------------------------- blocks

def table_md(table: dict) -> str:
    """A pipe table; a cell is written as stored (its padding included), a short rule as ``---``."""
    rule = table.get("rule") or ["---"] * len(table["columns"])
    lines = ["|" + "|".join(table["columns"]) + "|", "|" + "|".join(rule) + "|"]
    lines += ["|" + "|".join(row) + "|" for row in table["rows"]]
    return "\n".join(lines)


def render_blocks(payload: dict) -> str:
    out = []
    for b in payload["page"]:
        out.append(b["md"] if "md" in b else table_md(b["table"]) + "\n")
    return "".join(out)


def _cells(line: str) -> list[str]:
    """The cells between the pipes, exactly as written (the page must come back byte for byte)."""
    return line.rstrip("\n")[1:-1].split("|")


def to_blocks(md: str) -> list[dict]:
    """Split a Markdown page into prose and table blocks; ``render_blocks(to_blocks(md))`` is ``md``
    for every table written as ``| a | b |`` lines with a ``|---|`` rule (the test checks)."""
    lines = md.splitlines(keepends=True)
    blocks: list[dict] = []
    prose: list[str] = []
    i = 0
    while i < len(lines):
        ln = lines[i]
        is_table = (ln.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|")
                    and set(lines[i + 1].strip().replace("|", "").replace(" ", "")) <= set("-:")
                    and lines[i + 1].strip().replace("|", "").strip() != "")
        if not is_table:
            prose.append(ln)
            i += 1
            continue
        j = i + 2
        while j < len(lines) and lines[j].startswith("|"):
            j += 1
        table = {"columns": _cells(lines[i]), "rule": _cells(lines[i + 1]),
                 "rows": [_cells(r) for r in lines[i + 2:j]]}
        candidate = table_md(table) + "\n"
        if candidate != "".join(lines[i:j]) or not lines[j - 1].endswith("\n"):
            prose.extend(lines[i:j])  # a table written in another layout stays prose, byte for byte
        else:
            if prose:
                blocks.append({"md": "".join(prose)})
                prose = []
            blocks.append({"table": table})
        i = j
    if prose:
        blocks.append({"md": "".join(prose)})
    return blocks


def archive(name: str, date: str, results_dir: Path = RESULTS) -> Path:
    """Convert the hand-written ``<name>.md`` into ``<name>.json`` (blocks) + the archived header.

    A results file already beside the page (a benchmark's own JSON that the page's prose cannot be
    rebuilt from) is kept whole under ``raw``. Run again on an archived page (after a merge edited it),
    it converts the page anew, keeping ``raw``."""
    md = (results_dir / f"{name}.md").read_text()
    jpath = results_dir / f"{name}.json"
    old = json.loads(jpath.read_text()) if jpath.is_file() else None
    raw = old.get("raw") if isinstance(old, dict) and old.get("kind") == "archived-page" else old
    head, _, rest = md.partition("\n")
    marker = ARCHIVE_NOTE.split("{")[0]
    if not head.strip():  # a page that starts with a blank line
        head, _, rest = rest.lstrip("\n").partition("\n")
    if rest.lstrip("\n").startswith(marker):  # already archived: drop the old note paragraph
        rest = rest.lstrip("\n").partition("\n")[2]
    else:
        rest = rest.lstrip("\n")
    note = ARCHIVE_NOTE.format(name=name, date=date) + (
        f" The benchmark's own results file is kept whole under `raw` in {name}.json." if raw is not None else "")
    payload = {"kind": "archived-page", "command": f"python -m benchmarks.results_pages --archive {name}",
               "date": date, "page": [{"md": (head + "\n\n" if head.strip() else "") + note + "\n\n"}] + to_blocks(rest)}
    if raw is not None:
        payload["raw"] = raw
    return write_page(name, payload, results_dir)


# ------------------------------------------------------------------------------ benchmark writers

# pages whose benchmark renders them straight from the payload: name -> (module, function(payload) -> md)
PAYLOAD_RENDERERS = {
    "calibration_cost": ("benchmarks.bench_calibration_cost", "render_md"),
    "study_structural": ("benchmarks.study_structural", "doc_page"),
    "study_structural_recheck": ("benchmarks.study_structural", "recheck_page"),
    "speed": ("benchmarks.bench_speed", "markdown"),
    "speed_gpu_quick": ("benchmarks.bench_speed", "markdown"),
    "speed_gpu_b256": ("benchmarks.bench_speed", "markdown"),
    "gpu_check_h200": ("benchmarks.gpu_check", "markdown"),
    "recurrent": ("benchmarks.bench_recurrent", "markdown"),
    "threads": ("benchmarks.bench_threads", "render"),
    "demo_speed": ("benchmarks.bench_demo_speed", "markdown"),
    "demo_calibration": ("benchmarks.bench_demo_speed", "markdown"),
    "demo_speed_budget025": ("benchmarks.bench_demo_speed", "markdown"),
}


def _by_name(module: str, fn: str) -> Callable[[dict], str]:
    def render_page(payload: dict) -> str:
        import importlib

        return getattr(importlib.import_module(module), fn)(payload)
    return render_page


for _name, (_module, _fn) in PAYLOAD_RENDERERS.items():
    writer(_name)(_by_name(_module, _fn))


def _written(write: Callable[..., None], *args) -> str:
    """The text a benchmark's ``write(*args, path)`` writes to a file (for writers that only write files)."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "page.md"
        write(*args, p)
        return p.read_text()


@writer("coverage")
def _coverage(payload: dict) -> str:
    from benchmarks.bench_coverage import write_md

    return _written(write_md, payload["records"], payload["meta"])


@writer("export")
def _export(payload: dict) -> str:
    from benchmarks.bench_export import _markdown
    from flowprune.report import format_table

    s = payload["settings"]
    title = payload.get("title")
    if title is None:  # the title bench_export prints, rebuilt for runs that did not store it
        from flowprune.data import load_dataset

        shape = tuple(payload.get("input_shape") or load_dataset(s["data"], seed=0).input_shape)
        title = (f"{s['model']} on {s['data']} {shape}: onnxruntime "
                 f"{payload['machine']['onnxruntime']} vs PyTorch {payload['machine']['torch']} eager, "
                 f"{s['threads']} thread(s), medians of {s['rounds']} interleaved rounds")
    table = format_table(payload["rows"], title=title)
    return _markdown(payload["command"], table, payload, payload["rows"], s["batch"])


@writer("recovery")
@writer("recovery_digits")
def _recovery(payload: dict) -> str:
    from benchmarks.bench_recovery import render as render_recovery

    return render_recovery(payload, payload["command"]) + "\n"  # as bench_recovery writes it


@writer("transformers")
def _transformers(payload: dict) -> str:
    from benchmarks.bench_transformers import write_markdown

    return _written(write_markdown, payload["results"], payload["meta"])


# ------------------------------------------------------------------------------------------- main

def pages(results_dir: Path = RESULTS) -> list[str]:
    return sorted(p.stem for p in results_dir.glob("*.md"))


def command_of(payload: dict) -> str:
    return str(payload.get("command") or payload.get("meta", {}).get("command") or "").strip()


def problems(results_dir: Path = RESULTS) -> list[str]:
    """One sentence per page that does not regenerate byte for byte from its JSON (what to add)."""
    return [p for name in pages(results_dir) if (p := page_problem(name, results_dir))]


def page_problem(name: str, results_dir: Path = RESULTS) -> str | None:
    """Why ``<name>.md`` does not regenerate from ``<name>.json`` (what to add or rerun), or None."""
    j = results_dir / f"{name}.json"
    if not j.is_file():
        return (f"docs/results/{name}.md has no {name}.json beside it: make the benchmark that wrote it call "
                f"benchmarks.results_pages.write_page({name!r}, payload) and register its writer with "
                f"@writer({name!r}) in benchmarks/results_pages.py (or, for numbers whose raw results are "
                f"lost, run `python -m benchmarks.results_pages --archive {name}`)")
    payload = json.loads(j.read_text())
    try:
        md = render(name, payload)
    except KeyError as e:
        if name not in WRITERS and payload.get("kind") != "archived-page":  # what to add, not a failing writer
            return str(e.args[0])
        return f"the writer of docs/results/{name}.md fails on {name}.json: KeyError: {e}"
    except Exception as e:  # noqa: BLE001 - a writer that cannot read its JSON is a finding, not a crash
        return f"the writer of docs/results/{name}.md fails on {name}.json: {type(e).__name__}: {e}"
    have = (results_dir / f"{name}.md").read_text()
    if md != have:
        a, b = have.splitlines(), md.splitlines()
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return (f"docs/results/{name}.md differs from what its writer produces from {name}.json, first at line "
                f"{k + 1}: page {a[k] if k < len(a) else '<end>'!r} vs writer {b[k] if k < len(b) else '<end>'!r} "
                "(a hand edit? change the JSON or the writer, then `python -m benchmarks.results_pages --render`)")
    cmd = command_of(payload)
    if not cmd:
        return f"docs/results/{name}.json has no 'command' (the command that wrote it and the page)"
    if cmd.split(" --")[0] not in md:
        return f"docs/results/{name}.md does not name the command that wrote it ({cmd!r}) in its header"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--check", action="store_true")
    g.add_argument("--render", action="store_true")
    g.add_argument("--archive", metavar="NAME")
    p.add_argument("--date", default=None, help="with --archive: the date to record (default: today, UTC)")
    args = p.parse_args(argv)
    if args.archive:
        import datetime as dt

        date = args.date or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
        print("wrote", archive(args.archive, date))
        return 0
    if args.render:
        for name in pages():
            j = RESULTS / f"{name}.json"
            if j.is_file():
                (RESULTS / f"{name}.md").write_text(render(name, json.loads(j.read_text())))
        return 0
    found = problems()
    for f in found:
        print(f, file=sys.stderr)
    print(f"{len(pages()) - len(found)} of {len(pages())} results pages regenerate from their JSON")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
