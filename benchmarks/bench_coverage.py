"""Coverage: can flowprune prune every model a user brings? (issue 16)

For every torchvision classification model up to ``--max-params`` (default 200 M) and a timm
sample (one small model per family), built without weights:

* flowprune's public path: ``find_units`` -> ``get_score("l1")`` -> ``plan_cuts(ratio=0.5,
  budget="layer")`` -> ``apply_cuts``; then forward + backward in train mode (batch 2), an
  eval forward, and a ``flowprune.save``/``flowprune.load`` round trip with identical outputs;
* Torch-Pruning's own pruner: ``tp.pruner.MetaPruner(model, x, MagnitudeImportance(p=1),
  pruning_ratio=0.5, ignored_layers=<layers with num_classes outputs>)``, then the same
  forward + backward;

recording params and MACs before/after (Torch-Pruning's counter, batch 1), the graph-analysis
time, and what flowprune left intact (with its reason). Each model runs in its own process with
a timeout. Writes ``docs/results/coverage.json`` and ``docs/results/coverage.md``.

    python -m benchmarks.bench_coverage --suite tv            # torchvision (76 models)
    python -m benchmarks.bench_coverage --suite timm          # timm sample
    python -m benchmarks.bench_coverage --suite tv --models resnet18,regnet_x_400mf
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results"

# Models that need their native input size (fixed position embeddings / partition sizes / aux heads).
TV_SIZES = {"vit_b_16": 224, "vit_b_32": 224, "vit_l_16": 224, "vit_l_32": 224, "vit_h_14": 224,
            "maxvit_t": 224, "inception_v3": 299}
# One small model per timm family (names missing from the installed timm are skipped).
TIMM_SAMPLE = [
    "resnet10t", "resnext26ts", "seresnext26d_32x4d", "skresnet18", "resnest14d", "res2net50_14w_8s",
    "regnetx_002", "regnety_002", "regnetz_005", "efficientnet_b0", "mobilenetv2_050", "mobilenetv3_small_050",
    "mobilenetv4_conv_small", "mnasnet_small", "fbnetc_100", "ghostnet_100", "ghostnetv2_100", "cspresnet50",
    "cs3darknet_s", "dla34", "dpn48b", "hrnet_w18_small", "densenet121", "repvgg_a0", "convnext_atto",
    "convnextv2_atto", "edgenext_xx_small", "efficientformer_l1", "efficientformerv2_s0", "levit_128s",
    "mobilevit_xxs", "mobilevitv2_050", "vit_tiny_patch16_224", "deit_tiny_patch16_224", "cait_xxs24_224",
    "xcit_nano_12_p16_224", "pit_ti_224", "coat_lite_tiny", "crossvit_tiny_240", "swin_tiny_patch4_window7_224",
    "poolformer_s12", "mixer_s32_224", "resmlp_12_224", "gmlp_ti16_224", "convit_tiny", "eva02_tiny_patch14_224",
    "inception_v3", "nf_resnet26", "rexnet_100", "tinynet_e", "lcnet_050", "hardcorenas_a", "mixnet_s",
    "selecsls42b", "ese_vovnet19b_dw", "gcresnet33ts", "eca_resnet33ts", "halonet26t", "botnet26t_256",
    "fastvit_t8", "repvit_m1", "hgnet_tiny", "hgnetv2_b0", "efficientvit_b0", "efficientvit_m0",
    "tiny_vit_5m_224", "coatnet_nano_rw_224", "davit_tiny", "pvt_v2_b0", "visformer_tiny", "mambaout_femto",
    "starnet_s050", "xception41", "tresnet_m", "darknet17", "ghostnet_050",
]
NUM_CLASSES = 10


# ----------------------------------------------------------------------------------------- one model

class _Skip(Exception):
    """The other half of a split run."""


def _count(model, x):
    import torch
    import torch_pruning as tp

    was = model.training
    model.eval()
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, x[:1])
    model.train(was)
    return int(macs), int(params)


def _first(out):
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _first(out[0])
    if isinstance(out, dict):
        return _first(next(iter(out.values())))
    raise TypeError(f"unexpected output type {type(out).__name__}")


def _loss(out):
    import torch

    if isinstance(out, torch.Tensor):
        return out.float().pow(2).mean()
    if isinstance(out, (tuple, list)):
        return sum(_loss(o) for o in out if o is not None)
    if isinstance(out, dict):
        return sum(_loss(o) for o in out.values())
    return 0.0


def _train_step(model, x2) -> None:
    """Forward + backward in train mode on a batch of 2."""
    model.train()
    model.zero_grad(set_to_none=True)
    _loss(model(x2)).backward()
    model.eval()


def _build(suite: str, name: str, size: int | None):
    """(model, input size): torchvision at 64x64 unless listed; timm at 64 if it runs there, else native."""
    import torch

    from flowprune.models import build_model

    if suite == "tv":
        s = size or TV_SIZES.get(name, 64)
        return build_model(f"tv:{name}", (3, s, s), NUM_CLASSES), s
    import timm

    native = int(timm.models.get_pretrained_cfg(name).input_size[-1]) if timm.models.get_pretrained_cfg(name) else 224
    tries = [size] if size else [64, native]
    err = None
    for s in tries:
        try:
            m = build_model(f"timm:{name}", (3, s, s), NUM_CLASSES)
            with torch.no_grad():
                m.eval()(torch.randn(1, 3, s, s))
            return m, s
        except Exception as e:  # noqa: BLE001 -- try the native size
            err = e
    raise RuntimeError(f"cannot build/run {name}: {type(err).__name__}: {err}")


def _output_layers(model):
    from torch import nn

    return [m for m in model.modules() if (isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES)
            or (isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == NUM_CLASSES)]


def run_one(suite: str, name: str, size: int | None, threads: int, roundtrip: bool, part: str = "both") -> dict:
    import copy

    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    import flowprune as fp
    from flowprune.plan import plan_cuts
    from flowprune.pruning.structural import apply_cuts
    from flowprune.scores import get_score
    from flowprune.units import find_units

    rec: dict = {"suite": suite, "model": name}
    model, s = _build(suite, name, size)
    model.eval()
    rec["input"] = [3, s, s]
    x = torch.randn(1, 3, s, s)
    x2 = torch.randn(2, 3, s, s)
    rec["macs"], rec["params"] = _count(model, x)

    # ---- flowprune
    fpr: dict = {}
    if part in ("both", "fp"):
        rec["flowprune"] = fpr
    try:
        if part not in ("both", "fp"):
            raise _Skip
        t0 = time.perf_counter()
        units = find_units(model, x)
        fpr["graph_s"] = round(time.perf_counter() - t0, 2)
        fpr["units"] = len(units)
        fpr["channel_units_grouped"] = sum(1 for u in units if getattr(u, "classes", None) is not None)
        fpr["intact"] = {n: getattr(units, "reasons", {}).get(n, "") for n in units.unsupported}
        scores = get_score("l1")(model, units)
        plan = plan_cuts(model, units, scores, example_inputs=x, ratio=0.5, budget="layer")
        t0 = time.perf_counter()
        new = apply_cuts(model, plan, example_inputs=x)
        fpr["cut_s"] = round(time.perf_counter() - t0, 2)
        fpr["macs"], fpr["params"] = _count(new, x)
        fpr["cut"] = fpr["params"] < rec["params"]
        _train_step(new, x2)
        with torch.no_grad():
            y = _first(new.eval()(x2))
        fpr["valid"] = bool(torch.isfinite(y).all())
        fpr["ok"] = fpr["valid"] and fpr["cut"]
        if roundtrip:
            try:
                with tempfile.TemporaryDirectory() as d:
                    fp.save(new, d)
                    back = fp.load(d)
                    with torch.no_grad():
                        y2 = _first(back.eval()(x2))
                fpr["roundtrip"] = bool(torch.allclose(y, y2, atol=1e-5, rtol=1e-4))
            except Exception as e:  # noqa: BLE001 -- recorded apart from the cut
                fpr["roundtrip"] = False
                fpr["roundtrip_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    except _Skip:
        pass
    except Exception as e:  # noqa: BLE001 -- recorded per model
        fpr["ok"] = False
        fpr["error"] = f"{type(e).__name__}: {str(e)[:300]}"

    # ---- Torch-Pruning's own pruner
    tpr: dict = {}
    if part in ("both", "tp"):
        rec["tp"] = tpr
    try:
        if part not in ("both", "tp"):
            raise _Skip
        import torch_pruning as tp

        m2 = copy.deepcopy(model)
        t0 = time.perf_counter()
        pruner = tp.pruner.MetaPruner(m2, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
                                      ignored_layers=_output_layers(m2))
        pruner.step()
        tpr["seconds"] = round(time.perf_counter() - t0, 2)
        tpr["macs"], tpr["params"] = _count(m2, x)
        _train_step(m2, x2)
        with torch.no_grad():
            y = _first(m2.eval()(x2))
        tpr["ok"] = bool(torch.isfinite(y).all()) and tpr["params"] < rec["params"]
    except _Skip:
        pass
    except Exception as e:  # noqa: BLE001
        tpr["ok"] = False
        tpr["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return rec


# ----------------------------------------------------------------------------------------- driver

def tv_models(max_params: float) -> list[str]:
    import torchvision

    # the four above 200 M parameters, without building them
    big = {"regnet_y_128gf": 644.8e6, "vit_h_14": 632.0e6, "vit_l_16": 304.3e6, "vit_l_32": 306.5e6}
    return [n for n in torchvision.models.list_models(module=torchvision.models) if big.get(n, 0) <= max_params]


def timm_models() -> list[str]:
    import timm

    have = set(timm.list_models())
    return [n for n in TIMM_SAMPLE if n in have]


def _child(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    rec = run_one(args.suite, args.one, args.size, args.threads, not args.no_roundtrip, args.part)
    print("RESULT " + json.dumps(rec), flush=True)


def _fmt(n) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def summarise(records: list[dict]) -> dict:
    out = {}
    for suite in sorted({r["suite"] for r in records}):
        rs = [r for r in records if r["suite"] == suite]
        fp_ok = [r for r in rs if r.get("flowprune", {}).get("ok")]
        tp_ok = [r for r in rs if r.get("tp", {}).get("ok")]
        both = [r for r in rs if r.get("flowprune", {}).get("ok") and r.get("tp", {}).get("ok")]
        within = [r for r in both if abs(r["flowprune"]["params"] / r["tp"]["params"] - 1) <= 0.05]
        graph = [r["flowprune"]["graph_s"] for r in rs if "graph_s" in r.get("flowprune", {})]
        rt = [r for r in fp_ok if r["flowprune"].get("roundtrip")]
        out[suite] = {"models": len(rs), "flowprune_ok": len(fp_ok), "tp_ok": len(tp_ok), "both_ok": len(both),
                      "params_within_5pct_of_tp": len(within), "roundtrip_ok": len(rt),
                      "outside_5pct": sorted(r["model"] for r in both if r not in within), "max_graph_s": max(graph) if graph else None,
                      "flowprune_only": sorted(r["model"] for r in fp_ok if r not in tp_ok),
                      "tp_only": sorted(r["model"] for r in tp_ok if r not in fp_ok)}
    return out


def write_md(records: list[dict], meta: dict, path: Path) -> None:
    summ = summarise(records)
    lines = ["# Coverage: pruning every model a user brings (issue 16)", "",
             f"Command: `{meta['command']}`", "",
             f"Machine: {meta['machine']}; torch {meta['torch']}, torchvision {meta['torchvision']}, timm "
             f"{meta['timm']}, Torch-Pruning {meta['torch_pruning']}; {meta['threads']} torch thread(s) per model, "
             f"per-model timeout {meta['timeout_s']} s; run on {meta['date']}. {meta.get('note', '')}", "",
             "Each model is built without weights (10 classes). **flowprune**: `find_units` -> `get_score('l1')` -> "
             "`plan_cuts(ratio=0.5, budget='layer')` -> `apply_cuts`, then forward+backward in train mode (batch 2), "
             "an eval forward and a `save`/`load` round trip with identical outputs. **TP**: "
             "`tp.pruner.MetaPruner(MagnitudeImportance(p=1), pruning_ratio=0.5)` with the layers of 10 outputs "
             "ignored, then the same forward+backward. Params/MACs: Torch-Pruning's counter at batch 1 and the "
             "listed input size. `graph s`: flowprune's graph analysis (`find_units`).", ""]
    for suite, s in summ.items():
        lines += [f"## {suite}: summary", "",
                  f"- models: {s['models']}; flowprune pruned and valid: **{s['flowprune_ok']}**; Torch-Pruning: "
                  f"**{s['tp_ok']}**; both: {s['both_ok']}",
                  f"- flowprune params within 5% of Torch-Pruning's (where both prune): {s['params_within_5pct_of_tp']}"
                  f" of {s['both_ok']}",
                  f"- outside 5%: {', '.join(s['outside_5pct']) or '-'}",
                  f"- save/load round trip with identical outputs: {s['roundtrip_ok']} of {s['flowprune_ok']}",
                  f"- slowest graph analysis: {s['max_graph_s']} s",
                  f"- only flowprune: {', '.join(s['flowprune_only']) or '-'}",
                  f"- only Torch-Pruning: {', '.join(s['tp_only']) or '-'}", ""]
        lines += [f"## {suite}: per model", "",
                  "| model | input | params | MACs | flowprune params | flowprune MACs | TP params | TP MACs | "
                  "fp/TP params | graph s | flowprune | save/load | TP | left intact (flowprune) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in [r for r in records if r["suite"] == suite]:
            f, t = r.get("flowprune", {}), r.get("tp", {})
            ratio = (f"{f['params'] / t['params']:.2f}" if f.get("params") and t.get("params") else "-")
            fst = "ok" if f.get("ok") else (f.get("error") or r.get("error") or "fail")[:80]
            tst = "ok" if t.get("ok") else (t.get("error") or r.get("error") or "fail")[:80]
            rts = ("ok" if f.get("roundtrip") else (f.get("roundtrip_error") or "differs")[:70]
                   if "roundtrip" in f else "-")
            intact = f.get("intact") or {}
            it = (f"{len(intact)}: " + "; ".join(f"{k} ({v[:60]})" for k, v in list(intact.items())[:2])
                  + (" ..." if len(intact) > 2 else "")) if intact else "-"
            lines.append(f"| {r['model']} | {'x'.join(map(str, r.get('input', [])[1:])) or '-'} | "
                         f"{_fmt(r.get('params'))} | {_fmt(r.get('macs'))} | {_fmt(f.get('params'))} | "
                         f"{_fmt(f.get('macs'))} | {_fmt(t.get('params'))} | {_fmt(t.get('macs'))} | {ratio} | "
                         f"{f.get('graph_s', '-')} | {fst.replace('|', '/')} | {rts.replace('|', '/')} | {tst.replace('|', '/')} | "
                         f"{it.replace('|', '/')} |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=["tv", "timm", "both"], default="tv")
    p.add_argument("--models", default="", help="comma-separated subset")
    p.add_argument("--timeout", type=int, default=300, help="seconds per model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-params", type=float, default=200e6)
    p.add_argument("--size", type=int, default=None, help="input size (default: per model)")
    p.add_argument("--no-roundtrip", action="store_true")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--note", default="", help="what else ran on the machine")
    p.add_argument("--merge", default=None, help="a coverage.json whose records are folded into --out")
    p.add_argument("--inprocess", action="store_true", help="run every model in this process (faster; "
                   "timeouts by SIGALRM)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--part", choices=["both", "fp", "tp"], default="both", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        _child(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / "coverage.json"
    old = json.loads(jpath.read_text()) if jpath.exists() else {"records": []}
    if args.merge:  # fold another run's records (e.g. the timm sample) into this results file
        other = json.loads(Path(args.merge).read_text())
        done = {(r["suite"], r["model"]): r for r in old.get("records", []) + other.get("records", [])}
        meta = old.get("meta", {})
        om = other.get("meta", {})
        meta["command"] = f"{meta.get('command', '')}; {om.get('command', '')}".strip("; ")
        meta["note"] = f"{meta.get('note', '')} {om.get('note', '')}".strip()
        records = sorted(done.values(), key=lambda r: (r["suite"], r["model"]))
        jpath.write_text(json.dumps({"meta": meta, "summary": summarise(records), "records": records}, indent=1))
        write_md(records, meta, out / "coverage.md")
        return
    suites = ["tv", "timm"] if args.suite == "both" else [args.suite]
    todo = []
    for s in suites:
        names = tv_models(args.max_params) if s == "tv" else timm_models()
        if args.models:
            want = args.models.split(",")
            names = [n for n in names if n in want] or want
        todo += [(s, n) for n in names]
    done = {(r["suite"], r["model"]): r for r in old.get("records", [])}
    if args.inprocess:
        _run_inprocess(todo, done, args, out)
        return
    for i, (s, n) in enumerate(todo):
        t0 = time.time()
        rec: dict = {"suite": s, "model": n}
        for part, key in (("fp", "flowprune"), ("tp", "tp")):
            cmd = [sys.executable, "-m", "benchmarks.bench_coverage", "--suite", s, "--one", n, "--part", part,
                   "--threads", str(args.threads)] + (["--size", str(args.size)] if args.size else []) + \
                  (["--no-roundtrip"] if args.no_roundtrip else [])
            try:
                res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1"})
                line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
                if line:
                    got = json.loads(line[-1][7:])
                    for k, v in got.items():
                        if k not in ("flowprune", "tp") or k == key:
                            rec[k] = v
                else:
                    tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
                    rec[key] = {"ok": False, "error": f"crashed (rc {res.returncode}): {tail[0][:200]}"}
            except subprocess.TimeoutExpired:
                rec[key] = {"ok": False, "error": f"timeout after {args.timeout} s"}
        rec["seconds"] = round(time.time() - t0, 1)
        done[(s, n)] = rec
        f, t = rec.get("flowprune", {}), rec.get("tp", {})
        print(f"[{i + 1}/{len(todo)}] {s}:{n} flowprune={'ok' if f.get('ok') else f.get('error', rec.get('error'))} "
              f"tp={'ok' if t.get('ok') else t.get('error', rec.get('error'))} ({rec['seconds']} s)", flush=True)
        _write(done, args, out)
    _write(done, args, out)


def _run_inprocess(todo, done: dict, args, out: Path) -> None:
    """All models in this process (no start-up cost per model); a SIGALRM timeout per half."""
    import logging
    import signal
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    class _Timeout(Exception):
        pass

    def alarm(*_):
        raise _Timeout

    signal.signal(signal.SIGALRM, alarm)
    for i, (s, n) in enumerate(todo):
        t0 = time.time()
        rec: dict = {"suite": s, "model": n}
        for part, key in (("fp", "flowprune"), ("tp", "tp")):
            signal.alarm(args.timeout)
            try:
                got = run_one(s, n, args.size, args.threads, not args.no_roundtrip, part)
                for k, v in got.items():
                    if k not in ("flowprune", "tp") or k == key:
                        rec[k] = v
            except _Timeout:
                rec[key] = {"ok": False, "error": f"timeout after {args.timeout} s"}
            except Exception as e:  # noqa: BLE001 -- e.g. the model cannot be built
                rec[key] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}
            finally:
                signal.alarm(0)
        rec["seconds"] = round(time.time() - t0, 1)
        done[(s, n)] = rec
        f, t = rec.get("flowprune", {}), rec.get("tp", {})
        print(f"[{i + 1}/{len(todo)}] {s}:{n} flowprune={'ok' if f.get('ok') else f.get('error')} "
              f"tp={'ok' if t.get('ok') else t.get('error')} ({rec['seconds']} s)", flush=True)
        _write(done, args, out)


def _write(done: dict, args, out: Path) -> None:
    import timm
    import torch
    import torchvision

    records = sorted(done.values(), key=lambda r: (r["suite"], r["model"]))
    meta = {"command": "python -m benchmarks.bench_coverage " + " ".join(sys.argv[1:]),
            "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
            "torch_pruning": importlib.metadata.version("torch-pruning"), "threads": args.threads, "timeout_s": args.timeout, "note": args.note}
    (out / "coverage.json").write_text(json.dumps({"meta": meta, "summary": summarise(records),
                                                   "records": records}, indent=1))
    write_md(records, meta, out / "coverage.md")


if __name__ == "__main__":
    main()
