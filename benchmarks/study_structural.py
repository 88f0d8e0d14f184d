"""Study: which structural pruning configuration keeps the most accuracy one-shot (issue 9, item 3).

    python -m benchmarks.study_structural --models cnn1d --seeds 0,1,2 --configs all
    python -m benchmarks.study_structural --models resnet20 --seeds 0 --configs agf-global,tp-best

Every configuration starts from the SAME dense model per seed (``benchmarks._dense``: trained to
convergence, seed = training seed = calibration seed), is cut to 2x/4x/8x/16x fewer MACs with no
weight training, BatchNorm statistics re-estimated on the calibration batches (10 x 128 from the
train split), and measured on the test split. Multi-step configurations re-score and re-estimate
BN between steps (still no weight update). Torch-Pruning configurations run through its own
``MetaPruner`` (``flowprune.compare.tp_prune_to_target``), uniform and global.

Every configuration pins every option (see CONFIGS), so the command in a table's header reproduces
it from the code as it is. Every finished (model, seed, target, config) is appended to
``runs/bench/study/<model>.jsonl`` at once (resume), with the code version it ran on (``git
describe``); the summary (mean ± std over seeds) goes to ``docs/results/study_structural.json`` and
``.md`` with ``--doc``.

    python -m benchmarks.study_structural --from-json docs/results/study_structural.json --doc
        rewrites the .md from the results file alone (nothing is run)
    python -m benchmarks.study_structural --recheck --models cnn1d --seeds 0 --targets 2,16 --configs ... --doc
        reruns those rows of the results file with today's code and writes
        docs/results/study_structural_recheck.{json,md} (old and new accuracy side by side)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# Every configuration pins every option (issue 20): a flowprune configuration names every field of
# PruneConfig except those run_one sets for all of them (RUN_FIELDS) and every option of its score; a
# Torch-Pruning configuration names every option of tp_prune_to_target except those run_one sets.
# So a library default that changes later cannot change what a configuration computes
# (tests/test_study_pinned.py checks this). Score options, spelled out:
AGF_PAPER = {"feature": "post", "abs_mode": "elementwise", "calibration": "frozen", "trajectory_lr": 0.01,
             "center": False}
AGFC = {**AGF_PAPER, "center": True}  # centred; |.| elementwise (agf's default until issue 9)
AGFC_AS = {**AGFC, "abs_mode": "after_sum"}  # |.| after the per-sample sum (agf's default since issue 9)
AGFC_SQ = {**AGFC, "abs_mode": "squared"}
L2 = {"bn": "fold", "group": "producers"}
TAYLOR: dict = {}
RANDOM = {"seed": 0}
# the same for every flowprune configuration of the study: one-shot cuts (no training), BN re-estimated
FIXED = {"schedule": "geometric", "reestimate_bn": True, "min_width": 1, "round_to": 1,
         "kinds": ("channel", "neuron", "head"), "finetune_epochs": 0, "final_finetune_epochs": 0,
         "finetune_config": None, "recovery": "finetune", "recovery_options": None, "recovery_epochs": None,
         "target_speedup": None, "batch_size": 1, "backend": "eager"}
# set by run_one for every configuration alike
RUN_FIELDS = ("target_macs", "ratio", "calib_batches", "calib_batch_size", "seed", "measure")
TP_RUN_FIELDS = ("model", "method", "target", "input_shape", "batches", "seed", "cache", "importance")


def fp(method: str, score_options: dict, *, budget: str, normalize: str, compensate: bool,
       steps: int | str) -> tuple[str, dict]:
    """A flowprune.prune configuration; every argument is required (no default can leak in)."""
    return "fp", {"method": method, "score_options": dict(score_options), "budget": budget, "normalize": normalize,
                  "compensate": compensate, "steps": steps, **FIXED}


def tp(method: str, *, mode: str, steps: int) -> tuple[str, dict]:
    """A Torch-Pruning MetaPruner configuration (tp_prune_to_target's search settings pinned too)."""
    return "tp", {"method": method, "mode": mode, "steps": steps, "tol": 0.03, "round_to": None,
                  "max_pruning_ratio": 0.95, "max_trials": 12}


def _agf(score: dict, budget: str, *, steps: int | str = 1, compensate: bool = False,
         normalize: str = "unit") -> tuple[str, dict]:
    # the study's own naming convention, not the library's defaults: no -mc = compensate False, no -sN = 1 step
    return fp("agf" if score["center"] else "agf-paper", score, budget=budget,
              normalize=normalize, compensate=compensate, steps=steps)


# name -> (kind, settings). fp: flowprune.prune(...) with these keyword arguments; tp: tp_prune_to_target.
CONFIGS: dict[str, tuple[str, dict]] = {
    "agf-paper": _agf(AGF_PAPER, "layer"),
    "agf-layer": _agf(AGF_PAPER, "layer"),
    "agf-global": _agf(AGF_PAPER, "global"),
    "agf-raw-global": _agf({**AGF_PAPER, "feature": "raw"}, "global"),
    "agf-global-s4": _agf(AGF_PAPER, "global", steps=4),
    "agf-global-s8": _agf(AGF_PAPER, "global", steps=8),
    "agf-layer-s8": _agf(AGF_PAPER, "layer", steps=8),
    "agf-macs": _agf(AGF_PAPER, "macs"),
    "agf-macs-s8": _agf(AGF_PAPER, "macs", steps=8),
    "agf-sq-global": _agf({**AGF_PAPER, "abs_mode": "squared"}, "global"),
    "agfc-macs": _agf(AGFC, "macs"),
    "agfc-macs-s8": _agf(AGFC, "macs", steps=8),
    "agfc-global": _agf(AGFC, "global"),
    "agfc-layer": _agf(AGFC, "layer"),
    "agfc-global-s8": _agf(AGFC, "global", steps=8),
    "agfc-layer-s8": _agf(AGFC, "layer", steps=8),
    "agfc-raw-global": _agf({**AGFC, "feature": "raw"}, "global"),
    "agfc-as-global": _agf(AGFC_AS, "global"),
    "agfc-as-layer": _agf(AGFC_AS, "layer"),
    "agfc-as-global-s8": _agf(AGFC_AS, "global", steps=8),
    "agfc-as-layer-s8": _agf(AGFC_AS, "layer", steps=8),
    "agfc-as-block": _agf(AGFC_AS, "global", normalize="block"),
    "agfc-sq-layer": _agf(AGFC_SQ, "layer"),
    "agfc-sq-global": _agf(AGFC_SQ, "global"),
    "agfc-sq-block": _agf(AGFC_SQ, "global", normalize="block"),
    "agfc-sq-macs": _agf(AGFC_SQ, "macs"),
    "agfc-as-global-mc": _agf(AGFC_AS, "global", compensate=True),
    "agfc-as-layer-mc": _agf(AGFC_AS, "layer", compensate=True),
    "agfc-sq-layer-mc": _agf(AGFC_SQ, "layer", compensate=True),
    "agfc-sq-global-mc": _agf(AGFC_SQ, "global", compensate=True),
    "agfc-as-global-mc-auto": _agf(AGFC_AS, "global", compensate=True, steps="auto"),
    "agfc-sq-layer-mc-auto": _agf(AGFC_SQ, "layer", compensate=True, steps="auto"),
    "taylor-layer": fp("taylor", TAYLOR, budget="layer", normalize="unit", compensate=False, steps=1),
    "taylor-global": fp("taylor", TAYLOR, budget="global", normalize="unit", compensate=False, steps=1),
    "taylor-global-s8": fp("taylor", TAYLOR, budget="global", normalize="unit", compensate=False, steps=8),
    "taylor-macs-s8": fp("taylor", TAYLOR, budget="macs", normalize="unit", compensate=False, steps=8),
    "taylor-global-mc": fp("taylor", TAYLOR, budget="global", normalize="unit", compensate=True, steps=1),
    "l2-global": fp("l2", L2, budget="global", normalize="unit", compensate=False, steps=1),
    "l2-layer": fp("l2", L2, budget="layer", normalize="unit", compensate=False, steps=1),
    "l2-global-s8": fp("l2", L2, budget="global", normalize="unit", compensate=False, steps=8),
    "l2-layer-mc": fp("l2", L2, budget="layer", normalize="unit", compensate=True, steps=1),
    "random-layer": fp("random", RANDOM, budget="layer", normalize="unit", compensate=False, steps=1),
    "tp-magnitude-uniform": tp("tp-magnitude", mode="auto", steps=1),
    "tp-magnitude-global": tp("tp-magnitude", mode="global", steps=1),
    "tp-taylor-uniform": tp("tp-taylor", mode="auto", steps=1),
    "tp-taylor-global": tp("tp-taylor", mode="global", steps=1),
    "tp-magnitude-uniform-s8": tp("tp-magnitude", mode="auto", steps=8),
    "tp-taylor-global-s8": tp("tp-taylor", mode="global", steps=8),
    "tp-taylor-uniform-s8": tp("tp-taylor", mode="auto", steps=8),
    "tp-bn-scale-uniform": tp("tp-bn-scale", mode="auto", steps=1),
    "tp-bn-scale-global": tp("tp-bn-scale", mode="global", steps=1),
}
GROUPS = {
    "tp-best": [k for k in CONFIGS if k.startswith("tp-")],
    "all": list(CONFIGS),
}
# Names: agf-* = the paper's plain reading (agf-paper); agfc = centred (center=True), |.| elementwise;
# -as = abs after the per-sample sum; -sq = squared; -layer/-global/-block/-macs = allocation; -sN = N
# steps with BN re-estimation and re-scoring in between (no training); -auto = steps="auto"; -mc = mean
# compensation (without -mc: none). "-uniform" Torch-Pruning configurations use mode "auto" (uniform,
# global where a uniform ratio cannot land on the target). The library's default (issue 9) is
# agfc-as-global-mc.
CALIB_BATCHES, CALIB_BATCH_SIZE = 10, 128


def run_one(key: str, seed: int, target: float, config: str) -> dict:
    from benchmarks._dense import dense_model
    from flowprune.compare import tp_prune_to_target
    from flowprune.data import make_loader
    from flowprune.measure import accuracy, count_macs_params
    from flowprune.pruning.structural import prune
    from flowprune.train import reestimate_bn

    dense, data, info = dense_model(key, seed)
    kind, kw = CONFIGS[config]
    shape = tuple(data.input_shape)
    test = make_loader(data.test, 512)
    t0 = time.perf_counter()
    if kind == "fp":
        kw = dict(kw)
        method = kw.pop("method")
        res = prune(dense, data, method=method, target_macs=target, calib_batches=CALIB_BATCHES,
                    calib_batch_size=CALIB_BATCH_SIZE, seed=seed, measure=False, **kw)
        model, reduction = res.model, res.reduction
    else:
        # Torch-Pruning's MetaPruner, one-shot or along the same geometric schedule as flowprune's
        # multi-step configurations (fresh calibration batches, gradients and BN statistics per step)
        from flowprune.schedules import macs_schedule

        steps = kw["steps"]
        dm, _ = count_macs_params(dense, shape)
        model = dense
        for s, t_s in enumerate(macs_schedule(target, steps)):
            calib = data.calibration_batches(CALIB_BATCH_SIZE, CALIB_BATCHES, seed=seed * 1000 + s)
            cur, _ = count_macs_params(model, shape)
            model, _info = tp_prune_to_target(model, kw["method"], t_s * cur / dm, input_shape=shape,
                                              batches=calib, mode=kw["mode"], seed=seed, tol=kw["tol"],
                                              round_to=kw["round_to"], max_pruning_ratio=kw["max_pruning_ratio"],
                                              max_trials=kw["max_trials"])
            reestimate_bn(model, calib)
        m, _ = count_macs_params(model, shape)
        reduction = dm / m
    secs = time.perf_counter() - t0
    acc = accuracy(model, test)
    return {"model": key, "seed": seed, "target": target, "config": config, "acc_bn": acc,
            "reduction": reduction, "dense_acc": info["dense_acc"], "seconds": secs, "code": code_version()}


def code_version() -> str:
    """The commit of the working tree, ``+dirty`` where ``src/`` or ``benchmarks/`` differ from it
    (``unknown`` outside a git checkout)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10, cwd=root).stdout.strip()
        diff = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "src", "benchmarks"], timeout=10, cwd=root)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+dirty" if diff.returncode else "")) if head else "unknown"


def dedupe(rows: list[dict]) -> list[dict]:
    """One row per (model, seed, target, config): the first (a resumed run can append a row twice)."""
    seen, out = set(), []
    for r in rows:
        k = (r["model"], r["seed"], r["target"], r["config"])
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


def summarise(rows: list[dict]) -> list[dict]:
    by: dict[tuple, list[dict]] = {}
    for r in rows:
        by.setdefault((r["model"], r["config"], r["target"]), []).append(r)
    out = []
    for (model, config, target), rs in sorted(by.items()):
        accs = [r["acc_bn"] for r in rs]
        out.append({"model": model, "config": config, "target": target, "n": len(rs),
                    "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "reduction": statistics.mean(r["reduction"] for r in rs),
                    "seconds": statistics.median(r["seconds"] for r in rs)})
    return out


def table(summary: list[dict], model: str) -> str:
    targets = sorted({s["target"] for s in summary if s["model"] == model})
    configs = sorted({s["config"] for s in summary if s["model"] == model})
    by = {(s["config"], s["target"]): s for s in summary if s["model"] == model}
    lines = ["| config | " + " | ".join(f"{t:g}x" for t in targets) + " |",
             "|---|" + "---|" * len(targets)]
    for c in configs:
        cells = []
        for t in targets:
            s = by.get((c, t))
            cells.append("-" if s is None else f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f} (n={s['n']})")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


RESULTS = Path("docs/results/study_structural.json")
RECHECK = RESULTS.with_name("study_structural_recheck.json")
LEGACY = """**Where these numbers come from.** Rows without a recorded code version were appended to
`runs/bench/study/*.jsonl` while commits bb6b835 and 70c3861 (2 Dec 2026, issue 9) were developed,
over several states of the code, and committed in 70c3861 with a header command (`--configs
agf-layer`) that only summarised the accumulated file. Their configurations then left options to the
library's defaults, which changed during that work (bb6b835 gave `agf` the `center` option, made
`after_sum` its default `abs_mode`, and added mean compensation, on by default), so which defaults
each of them ran with is not known; the names are read here by the study's naming convention (`-as`,
`-sq`, `-mc`, `-sN`; see `CONFIGS`), which every configuration now pins. **No configuration reproduces
these rows on today's code**: the dense models differ (DENSE) and later fixes changed the scores
(issue 20's BatchNorm fold changes every magnitude score of a residual stage, so every ResNet-20
`l2` row); rows rerun on today's code, with their pinned configurations, are in
[study_structural_recheck.md](study_structural_recheck.md). Exact repeats of a row (same model, seed,
target and configuration, appended twice by a resumed run) are counted once (REPEATS). The default
(`agfc-as-global-mc`) was chosen on the single ResNet-20 seed below: one model, one seed."""


def provenance(raw: list[dict], rows: list[dict]) -> str:
    """The note on rows without a code version: the legacy text, with today's dense accuracies where
    the recheck file has them, and how many exact repeats were dropped."""
    if all("code" in r for r in rows):
        return ""
    dense = ""
    if RECHECK.exists():
        now = {(r["model"], r["seed"]): r["dense_acc"] for r in json.loads(RECHECK.read_text())["rows"]}
        old = {(r["model"], r["seed"]): r["dense_acc"] for r in rows}
        dense = "dense test accuracy in this file vs rebuilt today: " + ", ".join(
            f"{m} seed {s} {100 * old[(m, s)]:.1f} vs {100 * a:.1f}" for (m, s), a in sorted(now.items())
            if (m, s) in old)
    return (LEGACY.replace("(DENSE)", f"({dense})" if dense else "")
            .replace("(REPEATS)", f"({len(raw) - len(rows)} rows dropped)"))


def write_doc(rows: list[dict], cmd: str, note: str, path: Path | None = RESULTS,
              runs: list[dict] | None = None) -> str:
    """The summary tables of ``rows`` as markdown (returned), and with a path, the .json (``runs``, as
    given, default ``rows``; the summary) and the .md (rendered from that JSON by :func:`doc_page`)."""
    summary = summarise(rows)
    if path is not None:
        from benchmarks.results_pages import write_page

        write_page(path.stem, {"command": cmd, "provenance": note, "summary": summary,
                               "runs": rows if runs is None else runs}, path.parent)
    return "\n".join(_doc_lines(rows, summary, cmd, note))


def _doc_lines(rows: list[dict], summary: list[dict], cmd: str, note: str) -> list[str]:
    versions = sorted({r.get("code", "not recorded") for r in rows})
    text = [f"Command: `{cmd}`", "", f"Code versions of the rows: {', '.join(versions)}.", ""]
    if note:
        text += [note, ""]
    for key in sorted({r["model"] for r in rows}):
        text += [f"## {key}", "", table(summary, key), ""]
    return text


def doc_page(payload: dict) -> str:
    """docs/results/study_structural.md from its JSON (what ``--doc`` writes): the stored summary, and
    the code versions and models of the stored runs (the same sets as those of the summarised rows)."""
    return ("# Study: one-shot structural pruning configurations\n\n"
            + "\n".join(_doc_lines(payload["runs"], payload["summary"], payload["command"], payload["provenance"]))
            + "\n")


def recheck(rows: list[dict], wanted: list[tuple], cmd: str, doc: bool) -> str:
    """Rerun ``wanted`` (model, seed, target, config) with today's code next to the results file's rows."""
    old = {(r["model"], r["seed"], r["target"], r["config"]): r for r in rows}
    out = []
    for key, seed, target, c in wanted:
        r = run_one(key, seed, target, c)
        o = old.get((key, seed, target, c))
        out.append({**r, "acc_results_file": None if o is None else o["acc_bn"],
                    "same": None if o is None else abs(o["acc_bn"] - r["acc_bn"]) < 5e-4})
        was = "-" if o is None else f"{100 * o['acc_bn']:.1f}"
        print(f"{key} s{seed} {target:g}x {c:24s} file {was} now {100 * r['acc_bn']:.1f}", flush=True)
    payload = {"command": cmd, "code": code_version(), "rows": out}
    if doc:
        from benchmarks.results_pages import write_page

        write_page(RECHECK.stem, payload, RECHECK.parent)
    return "\n".join(_recheck_lines(payload))


def _recheck_lines(payload: dict) -> list[str]:
    lines = [f"Command: `{payload['command']}`", "",
             f"Code: {payload['code']}. Each row of {RESULTS} named below, rerun with",
             "its pinned configuration on today's code (same dense model recipe, seed, calibration).", "",
             "| model | seed | target | config | results file | today | same |", "|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        was = "-" if r["acc_results_file"] is None else f"{100 * r['acc_results_file']:.1f}"
        lines.append(f"| {r['model']} | {r['seed']} | {r['target']:g}x | {r['config']} | {was} | "
                     f"{100 * r['acc_bn']:.1f} | {'-' if r['same'] is None else ('yes' if r['same'] else 'no')} |")
    return lines


def recheck_page(payload: dict) -> str:
    """docs/results/study_structural_recheck.md from its JSON (what ``--recheck --doc`` writes)."""
    return "# Study rows rerun on today's code\n\n" + "\n".join(_recheck_lines(payload)) + "\n"


def _run(models: list[str], seeds: list[int], targets: list[float], configs: list[str]) -> list[dict]:
    root = Path("runs/bench/study")
    root.mkdir(parents=True, exist_ok=True)
    all_rows = []
    for key in models:
        f = root / f"{key}.jsonl"
        rows = [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []
        done = {(r["seed"], r["target"], r["config"]) for r in rows}
        for seed in seeds:
            for target in targets:
                for c in configs:
                    if (seed, target, c) in done:
                        continue
                    r = run_one(key, seed, target, c)
                    rows.append(r)
                    with f.open("a") as fh:
                        fh.write(json.dumps(r) + "\n")
                    print(f"{key} s{seed} {target:g}x {c:24s} {100 * r['acc_bn']:6.2f}  "
                          f"({r['reduction']:.2f}x, {r['seconds']:.0f} s)", flush=True)
        all_rows += rows
    return dedupe(all_rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="cnn1d")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--targets", default="2,4,8,16")
    p.add_argument("--configs", default="all")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--doc", action="store_true", help="write docs/results/study_structural.{json,md}")
    p.add_argument("--from-json", default=None, metavar="PATH",
                   help="no runs: rebuild the summary and the .md from the runs in this results file")
    p.add_argument("--recheck", action="store_true",
                   help="rerun the selected rows of the results file on today's code, side by side")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    configs: list[str] = []
    for c in args.configs.split(","):
        configs += GROUPS.get(c, [c])
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"unknown config {c!r}; choose from {', '.join(list(CONFIGS) + list(GROUPS))}")
    models, seeds = args.models.split(","), [int(s) for s in args.seeds.split(",")]
    targets = [float(t) for t in args.targets.split(",")]
    cmd = "python -m benchmarks.study_structural " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.from_json or args.recheck:
        saved = json.loads(Path(args.from_json or RESULTS).read_text())
        if args.recheck:
            wanted = [(m, s, t, c) for m in models for s in seeds for t in targets for c in configs]
            print(recheck(saved["runs"], wanted, cmd, args.doc))
            return 0
        rows = dedupe(saved["runs"])
        text = write_doc(rows, cmd, provenance(saved["runs"], rows), RESULTS if args.doc else None,
                         runs=saved["runs"])
    else:
        text = write_doc(_run(models, seeds, targets, configs), cmd, "", RESULTS if args.doc else None)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
