"""Coverage over Hugging Face transformers: one tiny config per architecture family (issue 22, item 5).

For every family of ``flowprune.hf.coverage.FAMILIES`` that the installed transformers builds
from a config (offline, random weights): flowprune cuts half of every unit (attention heads as
whole key/value groups, MLP neurons), runs the cut model (``generate()`` for decoders), saves
and loads it (outputs must match to 1e-6); Torch-Pruning's ``BasePruner`` with its documented
transformers options runs beside it on the same model (see ``flowprune/hf/coverage.py``).
Writes ``docs/results/transformers.json`` and ``docs/results/transformers.md``.

    python -m benchmarks.bench_transformers                       # every family
    python -m benchmarks.bench_transformers --families bert,llama # a few (not written to docs)
    python -m benchmarks.bench_transformers --render              # transformers.md from transformers.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"


def _row(r: dict) -> str:
    tp = r.get("torch_pruning", {})
    left = "; ".join(f"`{k}`: {v[:90]}" for k, v in (r.get("left_intact") or {}).items())
    note = r.get("error", "") or left
    cut = f"{r['params']} -> {r['params_cut']}" if "params_cut" in r else ""
    tp_cut = f"{r['params']} -> {tp['params_cut']}" if "params_cut" in tp else ""
    return (f"| {r['family']} | {r.get('class', '')} | {r['status']} | {r.get('heads', '')} | {r.get('mlps', '')} | "
            f"{cut} | {tp.get('status', '')} | {tp_cut} | {note.replace('|', '/')[:220]} | "
            f"{tp.get('error', '').replace('|', '/')[:160]} |")


def write_markdown(results: list[dict], meta: dict, path: Path) -> None:
    built = [r for r in results if r["status"] != "skip"]
    ok = [r for r in built if r["status"] in ("pass", "partial")]
    tp_ok = [r for r in built if r.get("torch_pruning", {}).get("status") == "pass"]
    tp_slow = [r["family"] for r in built if r.get("torch_pruning", {}).get("error", "").startswith("timeout")]
    lines = [
        "# transformers coverage (issue 22)",
        "",
        f"Command: `{meta['command']}` (transformers {meta['transformers']}, Torch-Pruning {meta['torch_pruning']}, "
        f"{meta['date']}). Generated from `transformers.json` by the same command.",
        "",
        f"flowprune: **{len(ok)} / {len(built)}** families that build from a config prune half of every head "
        f"and neuron unit, run (and `generate()`), and round-trip through `flowprune.save`/`load` "
        f"({sum(r['status'] == 'pass' for r in built)} with every attention cut, "
        f"{sum(r['status'] == 'partial' for r in built)} with some attention left intact for the reason given). "
        f"Torch-Pruning (BasePruner, documented HF options): **{len(tp_ok)} / {len(built)}** run after its step"
        + (f"; {len(tp_slow)} of its failures are timeouts ({', '.join(tp_slow)}: no result within the "
           f"per-family limit on a loaded 2-core machine, load average {meta.get('load', '?')}), not errors"
           if tp_slow else "") + ".",
        "",
        "| family | class | flowprune | attn units | MLP units | params | Torch-Pruning | TP params | "
        "flowprune note | TP error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(r) for r in results]
    path.write_text("\n".join(lines) + "\n")


def _tp_in_child(family: str, timeout: int) -> dict:
    """Torch-Pruning on ``family`` in a fresh process (its trace of some families runs for minutes)."""
    import subprocess

    cmd = [sys.executable, "-m", "benchmarks.bench_transformers", "--tp-one", family]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired:
        return {"status": "fail", "error": f"timeout: no result within {timeout} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"status": "fail", "error": f"crashed (exit {out.returncode}): {out.stderr[-200:]}"}
    return json.loads(lines[-1])


def main(argv=None) -> None:
    import torch
    import torch_pruning
    import transformers

    from flowprune.hf.coverage import run_transformers_sweep

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default=None, help="comma-separated subset (then nothing is written to docs/)")
    p.add_argument("--no-torch-pruning", action="store_true")
    p.add_argument("--tp-timeout", type=int, default=300, help="seconds for Torch-Pruning on one family")
    p.add_argument("--tp-one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--render", action="store_true", help="rewrite transformers.md from transformers.json only")
    args = p.parse_args(argv)
    if args.render:
        saved = json.loads((OUT / "transformers.json").read_text())
        write_markdown(saved["results"], saved["meta"], OUT / "transformers.md")
        return
    torch.set_num_threads(1)
    if args.tp_one:  # child: Torch-Pruning on one family, JSON on the last line
        from flowprune.hf.coverage import check_family_torch_pruning

        print(json.dumps(check_family_torch_pruning(args.tp_one)))
        return
    fams = args.families.split(",") if args.families else None

    def with_tp(rec: dict) -> None:
        if not args.no_torch_pruning and rec["status"] != "skip":
            rec["torch_pruning"] = _tp_in_child(rec["family"], args.tp_timeout)
        print(rec["family"], rec["status"], rec.get("torch_pruning", {}).get("status"), flush=True)

    results = run_transformers_sweep(fams, torch_pruning=False, on_family=with_tp)
    meta = {"command": "python -m benchmarks.bench_transformers " + " ".join(argv if argv is not None else sys.argv[1:]),
            "transformers": transformers.__version__, "torch_pruning": torch_pruning.__version__,
            "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "load": " ".join(f"{v:.1f}" for v in os.getloadavg())}
    if fams is not None:
        print(json.dumps(results, indent=1))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "transformers.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    write_markdown(results, meta, OUT / "transformers.md")
    print(f"wrote {OUT / 'transformers.json'} and {OUT / 'transformers.md'}")


if __name__ == "__main__":
    main()
