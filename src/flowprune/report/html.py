"""One self-contained HTML page per run (or per set of runs), from ``results.json``.

The page is plain HTML with a little CSS, no script and nothing fetched: every plot is a
matplotlib PNG inlined as base64. It starts with a summary table (one row per run; every number
cell carries ``data-key`` = its path in that run's results.json and ``data-value`` = the exact
value, so tools can check the page against the file), then one section per run with what its
kind of run recorded:

=============  ===============================================================================
kind           sections (each skipped when its data is missing)
=============  ===============================================================================
train          loss and validation accuracy per epoch
prune          accuracy at each stage; kept width per layer, dense vs pruned; score
               distribution per layer (when ``scores`` are in results.json); step history
compare        accuracy vs MACs per method with +-1 std bands (after the cut, BN, fine-tune)
route          routing Pareto curve (accuracy vs real cascade cost and vs heavy usage) beside
               random routing, with the calibrated operating point
hyperflows     per-layer weight sparsity; sparsity and pressure per epoch
hf sweep       the pressure law: remaining weights vs pressure, with the fitted power law
idap           step history: validation accuracy and MACs per step, accepted vs rolled back
demo           the demo's summary table (summary.json) and its sub-runs
=============  ===============================================================================

When several runs with accuracy and MACs are on one page, a cross-run accuracy vs MACs plot is
added ("compare runs").
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowprune.errors import FlowpruneError
from flowprune.report.results import fmt

RESULTS = "results.json"
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1100px;
     color:#222;padding:0 16px;line-height:1.4}
h1{font-size:1.6em;margin-bottom:0.2em} h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:2em}
h3{margin-bottom:0.3em} .meta{color:#666;font-size:0.9em}
table{border-collapse:collapse;margin:8px 0 16px;font-size:0.9em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right} th{background:#f3f3f3}
td.t,th.t{text-align:left} tr:nth-child(even) td{background:#fafafa}
figure{display:inline-block;margin:6px 12px 12px 0;vertical-align:top}
figure img{max-width:100%;border:1px solid #eee} figcaption{color:#555;font-size:0.85em;max-width:640px}
.wide{overflow-x:auto} #summary{font-size:0.82em} .note{color:#777;font-size:0.85em} code{background:#f3f3f3;padding:0 3px}
"""


# ----------------------------------------------------------------------------------------- loading

class Run:
    """One run directory: its results.json (``data``), its kind and a display name."""

    def __init__(self, path: Path, data: dict, kind: str, name: str):
        self.path, self.data, self.kind, self.name = path, data, kind, name


def _read_json(p: Path) -> dict | None:
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def detect_kind(r: dict) -> str:
    """Which command wrote a results.json: train, prune, compare, route, hyperflows, hf-sweep, idap, demo."""
    if "rows" in r and "route" in r:
        return "demo"
    if "sweep" in r and "cost" in r and "router" in r:
        return "route"
    if "runs" in r and "summary" in r:
        return "compare"
    if "runs" in r and "fit" in r:
        return "hf-sweep"
    if "steps" in r and "final" in r and "dense" in r:
        return "idap"
    if r.get("method") == "hyperflows" or ("masked_weights" in r and "layers" in r):
        return "hyperflows"
    if "widths" in r and "method" in r:
        return "prune"
    if "history" in r and "epochs" in r:
        return "train"
    return "run"


def collect_runs(paths: list[Path]) -> list[Run]:
    """The runs under ``paths``: a directory with results.json is one run; a directory without one
    contributes its summary.json (the demo), every direct sub-directory that has a results.json, and
    every sub-directory holding a saved pruned model (the prune record in its model.json metadata)."""
    runs: list[Run] = []
    for p in paths:
        if p.is_file() and p.name == RESULTS:
            p = p.parent
        if not p.is_dir():
            raise FlowpruneError(f"{str(p)!r} is not a directory; pass run directories written by flowprune commands "
                                 f"(each holds {RESULTS})")
        res = p / RESULTS
        if res.is_file():
            d = _read_json(res)
            if d is None:
                raise FlowpruneError(f"{res} is not a JSON object; was it written by a flowprune command?")
            runs.append(Run(p, d, detect_kind(d), p.name or str(p)))
            continue
        found = []
        summ = _read_json(p / "summary.json") if (p / "summary.json").is_file() else None
        if summ is not None:
            found.append(Run(p, summ, detect_kind(summ), p.name))
        for sub in sorted(q for q in p.iterdir() if q.is_dir()):
            d = _read_json(sub / RESULTS) if (sub / RESULTS).is_file() else None
            if d is not None:
                found.append(Run(sub, d, detect_kind(d), f"{p.name}/{sub.name}"))
                continue
            # a saved pruned model without results.json (the demo's light expert): its recipe's metadata
            rec = _read_json(sub / "model.json") if (sub / "model.json").is_file() else None
            meta = rec.get("metadata") if isinstance(rec, dict) else None
            if isinstance(meta, dict) and isinstance(meta.get("widths"), dict) and meta.get("method"):
                found.append(Run(sub, meta, "prune", f"{p.name}/{sub.name}"))
        if not found:
            raise FlowpruneError(f"{str(p)!r} holds no {RESULTS} (nor run sub-directories with one); pass a directory "
                                 "written by a flowprune command (train, prune, compare, route, idap, hyperflows, demo)")
        runs.extend(found)
    return runs


# ----------------------------------------------------------------------------------------- helpers

def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(float(v)) else None


def _get(d: dict, path: str) -> Any:
    cur: Any = d
    for k in path.split("."):
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return cur


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _figure(draw: Callable, caption: str, *, size=(6.4, 3.6), ncols: int = 1) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    draw(*axes)
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator

    for ax in axes:
        ax.grid(True, alpha=0.3)
        if ax.get_xscale() == "log":  # MACs: 12.4K, 2M ... at 1, 2 and 5 times powers of ten
            si = FuncFormatter(lambda v, _pos: fmt(int(round(v))) if v >= 1 else f"{v:g}")
            ax.xaxis.set_major_formatter(si)
            ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
            ax.xaxis.set_minor_formatter(si)
        if ax.get_xlabel().startswith(("epoch", "step")):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    b64 = base64.b64encode(buf.getvalue()).decode("ascii")
    w, h = int(size[0] * 100), int(size[1] * 100)
    return (f'<figure><img src="data:image/png;base64,{b64}" width="{w}" height="{h}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _table(rows: list[dict], columns: list[str] | None = None, digits: int = 2) -> str:
    if not rows:
        return ""
    cols = columns or list(dict.fromkeys(k for r in rows for k in r))
    out = ["<table><tr>" + "".join(f'<th class="t">{_e(c)}</th>' if i == 0 else f"<th>{_e(c)}</th>"
                                   for i, c in enumerate(cols)) + "</tr>"]
    for r in rows:
        cells = []
        for i, c in enumerate(cols):
            v = r.get(c)
            cls = ' class="t"' if i == 0 or isinstance(v, str) else ""
            cells.append(f"<td{cls}>{_e(fmt(v, digits))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</table>"


def _pct(v: Any) -> float | None:
    x = _num(v)
    return None if x is None else 100 * x


# ----------------------------------------------------------------------------------------- summary

# (label, path in results.json, how to show it) per kind; the first path found is used.
_SUMMARY = [
    ("model", ("model_name", "config.model", "dense.model"), "text"),
    ("data", ("data", "config.data"), "text"),
    ("method", ("method", "router", "config.methods"), "text"),
    ("test acc %", ("test_accuracy", "accuracy", "test.accuracy", "final.test_accuracy"), "pct"),
    ("dense / heavy acc %", ("dense_accuracy", "test.heavy_accuracy", "dense.test_accuracy", "dense.accuracy"), "pct"),
    ("MACs", ("macs", "final.macs"), "int"),
    ("MACs fewer (x)", ("macs_reduction", "final.macs_reduction", "reduction"), "num"),
    ("params", ("params", "final.params"), "int"),
    ("weight sparsity %", ("sparsity",), "pct"),
    ("heavy usage %", ("test.heavy_usage",), "pct"),
    ("C_cascade", ("cost.C_cascade",), "num"),
    ("seconds", ("seconds", "train_seconds"), "num"),
]


def summary_cells(run: Run) -> list[tuple[str, str | None, Any, str]]:
    """``(label, path, value, text)`` for every summary column (path None when the run lacks it)."""
    cells = []
    for label, paths, how in _SUMMARY:
        if run.kind in ("compare", "hf-sweep", "demo") and label not in ("model", "data", "method", "seconds"):
            paths = ()
        found = next(((p, _get(run.data, p)) for p in paths if _get(run.data, p) is not None), (None, None))
        path, v = found
        if how == "text":
            text = ",".join(map(str, v)) if isinstance(v, list) else ("" if v is None else str(v))
        elif _num(v) is None:
            path, text = None, ""
        elif how == "pct":
            text = f"{100 * float(v):.2f}"
        elif how == "int":
            text = fmt(int(v))
        else:
            text = f"{float(v):.2f}"
        cells.append((label, path, v, text))
    return cells


def _summary_table(runs: list[Run]) -> str:
    heads = ["run", "kind"] + [label for label, _, _ in _SUMMARY]
    rows = []
    for i, run in enumerate(runs):
        tds = [f'<td class="t"><a href="#run{i}">{_e(run.name)}</a></td>', f'<td class="t">{_e(run.kind)}</td>']
        for _label, path, v, text in summary_cells(run):
            if path is None or isinstance(v, (str, list)):
                tds.append(f'<td class="t">{_e(text)}</td>')
            else:
                tds.append(f'<td data-run="{i}" data-key="{_e(path)}" data-value="{_e(repr(v))}">{_e(text)}</td>')
        rows.append("<tr>" + "".join(tds) + "</tr>")
    head = "<tr>" + "".join(f'<th class="t">{_e(h)}</th>' if j < 2 else f"<th>{_e(h)}</th>"
                            for j, h in enumerate(heads)) + "</tr>"
    return f'<div class="wide"><table id="summary">{head}{"".join(rows)}</table></div>'


# ----------------------------------------------------------------------------------------- sections

def _train(r: dict) -> list[str]:
    hist = [h for h in r.get("history") or [] if isinstance(h, dict)]
    if not hist:
        return []
    ep = [h.get("epoch", i + 1) for i, h in enumerate(hist)]
    loss = [_num(h.get("loss")) for h in hist]
    val = [_pct(h.get("val_accuracy")) for h in hist]

    def draw(a1, a2):
        if any(v is not None for v in loss):
            a1.plot(ep, [v if v is not None else math.nan for v in loss], "o-", color=COLORS[0])
        a1.set_xlabel("epoch")
        a1.set_ylabel("training loss")
        if any(v is not None for v in val):
            a2.plot(ep, [v if v is not None else math.nan for v in val], "o-", color=COLORS[2])
        a2.set_xlabel("epoch")
        a2.set_ylabel("validation accuracy %")

    return ["<h3>Training</h3>", _figure(draw, "training loss and validation accuracy per epoch", size=(9, 3.2),
                                           ncols=2)]


def _dense_widths(run: Run, names: list[str]) -> dict[str, int]:
    """Widths of the same units in the unpruned architecture, rebuilt from the run's model.json."""
    rec = _read_json(run.path / "model.json") or _read_json(run.path / "model" / "model.json")
    if not rec or "base" not in rec:
        return {}
    try:
        from flowprune.models import build_model

        b = rec["base"]
        m = build_model(b["name"], b["input_shape"], b["num_classes"], **b.get("kwargs", {}))
    except Exception:  # noqa: BLE001 -- the plot just shows pruned widths then
        return {}
    out = {}
    for n in names:
        try:
            mod = m.get_submodule(n)
        except AttributeError:
            continue
        for a in ("num_heads", "out_channels", "out_features", "num_features"):
            if isinstance(getattr(mod, a, None), int):
                out[n] = int(getattr(mod, a))
                break
    return out


def _prune(run: Run) -> list[str]:
    r = run.data
    parts = []
    stages = [("dense", r.get("dense_accuracy")), ("after cut", r.get("accuracy_after_cut")),
              ("after BN", r.get("accuracy_after_bn")), ("after fine-tune", r.get("accuracy_after_finetune"))]
    stages = [(k, _pct(v)) for k, v in stages if _pct(v) is not None]
    if stages:
        def draw_acc(ax):
            ax.bar([k for k, _ in stages], [v for _, v in stages], color=COLORS[: len(stages)])
            for i, (_, v) in enumerate(stages):
                ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
            ax.set_ylabel("test accuracy %")
        parts.append(_figure(draw_acc, "test accuracy at each stage of the prune run", size=(5.2, 3.2)))
    widths = r.get("widths")
    if isinstance(widths, dict) and widths:
        names = list(widths)
        dense = _dense_widths(run, names)

        def draw_w(ax):
            xs = range(len(names))
            if dense:
                ax.bar([x - 0.2 for x in xs], [dense.get(n, 0) for n in names], width=0.4, label="dense",
                       color="#bbbbbb")
            ax.bar([x + (0.2 if dense else 0) for x in xs], [widths[n] for n in names], width=0.4 if dense else 0.7,
                   label="pruned", color=COLORS[0])
            ax.set_xticks(list(xs))
            ax.set_xticklabels(names, rotation=90 if len(names) > 6 else 0, fontsize=7)
            ax.set_ylabel("kept width (channels / neurons / heads)")
            ax.legend(fontsize=8)
        parts.append(_figure(draw_w, "kept width per layer" + (", dense vs pruned" if dense else " (pruned)"),
                             size=(max(5.2, min(11, 0.25 * len(names) + 3)), 3.8)))
    scores = r.get("scores")
    if isinstance(scores, dict) and scores:
        names = [n for n, v in scores.items() if isinstance(v, list) and v and all(_num(x) is not None for x in v)]
        if names:
            def draw_s(ax):
                ax.boxplot([scores[n] for n in names], showfliers=True)
                ax.set_xticks(range(1, len(names) + 1))
                ax.set_xticklabels(names, rotation=90 if len(names) > 6 else 0, fontsize=7)
                ax.set_ylabel(f"{r.get('method', '')} score")
                if all(min(scores[n]) > 0 for n in names):
                    ax.set_yscale("log")
            parts.append(_figure(draw_s, "score distribution per layer", size=(max(5.2, min(11, 0.25 * len(names) + 3)), 3.8)))
    hist = [h for h in r.get("history") or [] if isinstance(h, dict)]
    if hist:
        cols = [c for c in ("step", "target", "reduction", "macs", "params", "acc_cut", "acc_bn", "acc_ft")
                if any(c in h for h in hist)]
        parts.append("<h3>Steps</h3>" + _table(hist, cols, digits=4))
    return parts


_STAGE_LABELS = {"acc_raw": "after the cut", "acc_bn": "after BN re-estimation", "acc_ft": "after fine-tuning"}


def _compare(r: dict) -> list[str]:
    summ = [s for s in r.get("summary") or [] if isinstance(s, dict)]
    if not summ:
        return []
    methods = list(dict.fromkeys(s.get("method") for s in summ))
    stages = [k for k in ("acc_raw", "acc_bn", "acc_ft") if any(_num(s.get(k)) is not None for s in summ)]
    dense_acc = _pct(_get(r, "dense.accuracy"))
    dense_macs = _num(_get(r, "dense.macs"))
    parts = []
    for st in stages:
        def draw(ax, st=st):
            for i, m in enumerate(methods):
                rows = sorted((s for s in summ if s.get("method") == m and _num(s.get(st)) is not None
                               and _num(s.get("macs")) is not None), key=lambda s: s["macs"])
                if not rows:
                    continue
                x = [s["macs"] for s in rows]
                y = [100 * s[st] for s in rows]
                sd = [100 * (_num(s.get(st + "_std")) or 0.0) for s in rows]
                c = COLORS[i % len(COLORS)]
                ax.plot(x, y, "o-", color=c, label=str(m))
                ax.fill_between(x, [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)], color=c, alpha=0.2)
            if dense_acc is not None and dense_macs is not None:
                ax.plot([dense_macs], [dense_acc], "k*", markersize=10, label="dense")
            ax.set_xscale("log")
            ax.set_xlabel("MACs per sample (log)")
            ax.set_ylabel("test accuracy %")
            ax.legend(fontsize=8)
        parts.append(_figure(draw, f"accuracy vs MACs {_STAGE_LABELS[st]} (mean over seeds, band = +-1 std)"))
    cols = ["method", "target", "n", "achieved"] + [c for s in stages for c in (s, s + "_std")]
    parts.append(_table(summ, cols, digits=4))
    return parts


def _route(r: dict) -> list[str]:
    sw = r.get("sweep") or {}
    routed = [s for s in sw.get("routed") or [] if isinstance(s, dict)]
    rnd = [s for s in sw.get("random") or [] if isinstance(s, dict)]
    if not routed:
        return []
    t = r.get("test") or {}
    cost = r.get("cost") or {}

    def draw(a1, a2):
        for ax, key, label in ((a1, "C_cascade", "cascade cost C_cascade (x heavy MACs)"),
                               (a2, "heavy_usage", "heavy usage (share of inputs escalated)")):
            pts = sorted((s[key], 100 * s["accuracy"]) for s in routed if _num(s.get(key)) is not None
                         and _num(s.get("accuracy")) is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=COLORS[0], label=f"{r.get('router')} router")
            rp = sorted((s[key], 100 * s["accuracy"], 100 * (_num(s.get("accuracy_std")) or 0.0)) for s in rnd
                        if _num(s.get(key)) is not None and _num(s.get("accuracy")) is not None)
            if rp:
                ax.plot([p[0] for p in rp], [p[1] for p in rp], "s--", color=COLORS[1], label="random routing")
                ax.fill_between([p[0] for p in rp], [p[1] - p[2] for p in rp], [p[1] + p[2] for p in rp],
                                color=COLORS[1], alpha=0.2)
            x0 = _num(cost.get("C_cascade")) if key == "C_cascade" else _num(t.get("heavy_usage"))
            if x0 is not None and _num(t.get("accuracy")) is not None:
                ax.plot([x0], [100 * t["accuracy"]], "k*", markersize=12, label="calibrated threshold")
            ax.set_xlabel(label)
            ax.set_ylabel("test accuracy %")
        a1.legend(fontsize=8)

    parts = [_figure(draw, "routing Pareto curve on the test split (thresholds from val quantiles) vs random routing "
                           "at the same usage (band = +-1 std over draws)", size=(10, 3.8), ncols=2)]
    cols = [c for c in ("target_usage", "heavy_usage", "accuracy", "C_mix", "C_cascade", "measured_cost")
            if any(c in s for s in routed)]
    parts.append(_table(routed, cols, digits=4))
    return parts


def _hyperflows(r: dict) -> list[str]:
    parts = []
    layers = r.get("layers")
    if isinstance(layers, dict) and layers:
        names = [n for n, v in layers.items() if _num(v if not isinstance(v, dict) else v.get("sparsity")) is not None]
        vals = [100 * (layers[n] if not isinstance(layers[n], dict) else layers[n]["sparsity"]) for n in names]

        def draw(ax):
            ax.bar(range(len(names)), vals, color=COLORS[0])
            if _num(r.get("sparsity")) is not None:
                ax.axhline(100 * r["sparsity"], color="k", ls="--", lw=1, label="overall")
                ax.legend(fontsize=8)
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(names, rotation=90 if len(names) > 6 else 0, fontsize=7)
            ax.set_ylabel("weight sparsity %")
        parts.append(_figure(draw, "weight sparsity per layer", size=(max(5.2, min(11, 0.25 * len(names) + 3)), 3.6)))
    ep = [e for e in r.get("epochs") or [] if isinstance(e, dict)]
    if ep:
        def draw2(a1, a2):
            x = [e.get("epoch", i + 1) for i, e in enumerate(ep)]
            a1.plot(x, [100 * (1 - e["remaining"]) if _num(e.get("remaining")) is not None else math.nan for e in ep],
                    "o-", color=COLORS[0], label="sparsity")
            if any(_num(e.get("expected")) is not None for e in ep):
                a1.plot(x, [100 * (1 - e["expected"]) if _num(e.get("expected")) is not None else math.nan for e in ep],
                        "--", color="#888", label="scheduled")
            a1.set_xlabel("epoch")
            a1.set_ylabel("weight sparsity %")
            a1.legend(fontsize=8)
            a2.plot(x, [_num(e.get("gamma")) if _num(e.get("gamma")) is not None else math.nan for e in ep], "o-",
                    color=COLORS[3])
            a2.set_xlabel("epoch")
            a2.set_ylabel("pressure gamma")
        parts.append(_figure(draw2, "sparsity and pressure per epoch (prune, then regrowth)", size=(9, 3.2), ncols=2))
    return parts


def _hf_sweep(r: dict) -> list[str]:
    runs = [x for x in r.get("runs") or [] if isinstance(x, dict) and _num(x.get("gamma")) and _num(x.get("remaining"))]
    if not runs:
        return []
    fit = (r.get("fit") or {}).get("power") or {}
    lq = (r.get("fit") or {}).get("log_quadratic") or {}

    def draw(ax):
        g = [x["gamma"] for x in runs]
        ax.plot(g, [x["remaining"] for x in runs], "o", color=COLORS[0], label="measured")
        lo, hi = min(g), max(g)
        grid = [lo * (hi / lo) ** (i / 50) for i in range(51)] if hi > lo else [lo]
        if _num(fit.get("c")) and _num(fit.get("a")) is not None:
            ax.plot(grid, [fit["c"] * v ** (-fit["a"]) for v in grid], "-", color=COLORS[1],
                    label=f"S = {fit['c']:.3g} gamma^-{fit['a']:.3g}, R2 = {fit.get('r2', math.nan):.3f}")
        if all(_num(lq.get(k)) is not None for k in ("c", "a0", "a1")):
            ax.plot(grid, [lq["c"] * math.exp(-(lq["a0"] + lq["a1"] * math.log(v)) * math.log(v)) for v in grid],
                    ":", color=COLORS[2], label=f"log-quadratic, R2 = {lq.get('r2', math.nan):.3f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("pressure gamma")
        ax.set_ylabel("remaining weights S")
        ax.legend(fontsize=8)
    return [_figure(draw, "pressure law: remaining weights vs constant pressure"),
            _table(runs, ["gamma", "remaining", "sparsity", "accuracy"], digits=4)]


def _idap(r: dict) -> list[str]:
    steps = [s for s in r.get("steps") or [] if isinstance(s, dict)]
    if not steps:
        return []

    def draw(a1, a2):
        x = list(range(1, len(steps) + 1))
        for ax, key, label, scale in ((a1, "accuracy", "validation accuracy %", 100), (a2, "macs", "MACs", 1)):
            ys = [(_num(s.get(key)) or math.nan) * scale for s in steps]
            ax.plot(x, ys, "-", color="#999", lw=1)
            acc = [(xi, y) for xi, y, s in zip(x, ys, steps) if s.get("accepted")]
            rej = [(xi, y) for xi, y, s in zip(x, ys, steps) if not s.get("accepted")]
            if acc:
                ax.plot([a for a, _ in acc], [b for _, b in acc], "o", color=COLORS[2], label="accepted")
            if rej:
                ax.plot([a for a, _ in rej], [b for _, b in rej], "x", color=COLORS[1], markersize=9,
                        label="rolled back")
            ax.set_xlabel("step (stage 1: filters, stage 2: layers)")
            ax.set_ylabel(label)
        dense = _pct(_get(r, "dense.accuracy"))
        if dense is not None:
            a1.axhline(dense, color="k", ls="--", lw=1, label="dense")
        a1.legend(fontsize=8)

    rows = [{"step": f"{s.get('stage')}.{s.get('step', '')}", "block": s.get("block", ""),
             "accepted": "yes" if s.get("accepted") else "rolled back", "val acc %": _pct(s.get("accuracy")),
             "MACs": s.get("macs"), "params": s.get("params")} for s in steps]
    return [_figure(draw, "IDAP++ step history (green: accepted, red x: rolled back)", size=(10, 3.6), ncols=2),
            _table(rows, ["step", "block", "accepted", "val acc %", "MACs", "params"]),
            f'<p class="note">stopped: {_e(r.get("stop_reason", ""))}; blocks removed: '
            f'{_e(", ".join(r.get("removed_blocks") or []) or "none")}</p>']


def _demo(r: dict) -> list[str]:
    rows = [x for x in r.get("rows") or [] if isinstance(x, dict)]
    return [_table(rows)] if rows else []


def _generic(r: dict) -> list[str]:
    flat = [{"key": k, "value": v} for k, v in r.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    return [_table(flat[:40], ["key", "value"], digits=4)] if flat else []


def _sections(run: Run) -> list[str]:
    r = run.data
    kind = run.kind
    builders = {"train": lambda: _train(r), "prune": lambda: _prune(run), "compare": lambda: _compare(r),
                "route": lambda: _route(r), "hyperflows": lambda: _hyperflows(r), "hf-sweep": lambda: _hf_sweep(r),
                "idap": lambda: _idap(r), "demo": lambda: _demo(r)}
    try:
        parts = builders.get(kind, lambda: _generic(r))()
    except Exception as e:  # noqa: BLE001 -- one odd results.json must not cost the whole page
        parts = [f'<p class="note">section skipped: {_e(type(e).__name__)}: {_e(str(e)[:200])}</p>']
    return parts


def _cross_run(runs: list[Run]) -> str:
    pts = []
    for run in runs:
        if run.kind in ("compare", "hf-sweep", "demo"):
            continue
        cells = {label: v for label, _, v, _ in summary_cells(run)}
        acc, macs = _num(cells.get("test acc %")), _num(cells.get("MACs"))
        if acc is not None and macs is not None:
            pts.append((run.name, macs, 100 * acc))
    if len(pts) < 2:
        return ""

    def draw(ax):
        for i, (n, m, a) in enumerate(pts):
            ax.plot([m], [a], "o", color=COLORS[i % len(COLORS)], label=n)
        ax.set_xscale("log")
        ax.set_xlabel("MACs per sample (log)")
        ax.set_ylabel("test accuracy %")
        ax.legend(fontsize=7)
    return "<h2>Compare runs</h2>" + _figure(draw, "test accuracy vs MACs of every run on this page")


# ----------------------------------------------------------------------------------------- page

def render(runs: list[Run], title: str | None = None) -> str:
    """The HTML text of the page for ``runs``."""
    from flowprune import __version__

    title = title or ("flowprune report: " + ", ".join(r.name for r in runs[:4]) + (" ..." if len(runs) > 4 else ""))
    body = [f"<h1>{_e(title)}</h1>",
            f'<p class="meta">flowprune {_e(__version__)}, written {_e(time.strftime("%Y-%m-%d %H:%M:%S"))}; '
            f"{len(runs)} run(s). Accuracies on the held-out test split unless marked val.</p>",
            "<h2>Summary</h2>", _summary_table(runs), _cross_run(runs)]
    for i, run in enumerate(runs):
        body.append(f'<h2 id="run{i}">{_e(run.name)} <span class="meta">({_e(run.kind)}; {_e(run.path)})</span></h2>')
        parts = _sections(run)
        body.extend(parts if parts else ['<p class="note">nothing to plot in this results.json</p>'])
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(b for b in body if b)
            + "\n</body></html>\n")


def write_html(paths: list[Path], out: Path, *, title: str | None = None) -> Path:
    """Collect the runs under ``paths``, render the page and write it to ``out`` atomically."""
    if not paths:
        raise FlowpruneError("give at least one run directory")
    out = Path(out)
    if out.is_dir():
        out = out / "report.html"
    if out.suffix.lower() not in (".html", ".htm"):
        raise FlowpruneError(f"report file {str(out)!r} must end in .html")
    runs = collect_runs(paths)
    text = render(runs, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out
