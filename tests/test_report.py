"""HTML reports: one self-contained page per run (or merged runs) from results.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flowprune.errors import FlowpruneError
from flowprune.report import format_table, merge_reports, write_report, write_results

# Small results.json files shaped like the ones each command writes (keys as of this commit).
DENSE = {"model_name": "lenet300", "data": "digits", "accuracy": 0.805, "val_accuracy": 0.84, "macs": 51010,
         "params": 50610, "epochs": 3, "seed": 0, "train_seconds": 6.3,
         "history": [{"epoch": 1, "loss": 2.17, "val_accuracy": 0.80}, {"epoch": 2, "loss": 1.61, "val_accuracy": 0.84},
                     {"epoch": 3, "loss": 1.15, "val_accuracy": 0.84}]}
PRUNE = {"model_name": "lenet300", "data": "digits", "method": "l1", "seed": 0, "target_macs": "4x",
         "dense_accuracy": 0.805, "accuracy_after_cut": 0.599, "accuracy_after_bn": None,
         "accuracy_after_finetune": 0.674, "accuracy": 0.6740947075208914, "macs": 12426, "params": 12273,
         "dense_macs": 51010, "dense_params": 50610, "macs_reduction": 4.105102205053919,
         "widths": {"body.0": 115, "body.2": 38}, "seconds": 5.92,
         "scores": {"body.0": [0.1 * (i % 7 + 1) for i in range(300)], "body.2": [0.2 * (i % 5 + 1) for i in range(100)]},
         "history": [{"step": 1, "target": 4.0, "reduction": 4.105, "macs": 12426, "params": 12273, "acc_cut": 0.599,
                      "acc_ft": 0.674}]}
_SWEEP = [{"target_usage": u, "heavy_usage": u, "accuracy": 0.674 + 0.131 * u ** 0.7, "C_mix": 0.24 + 0.76 * u,
           "C_cascade": 0.24 + u} for u in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)]
ROUTE = {"kind": "two_experts", "router": "confidence", "data": "digits",
         "calibration": {"mode": "heavy_budget", "target": 0.3, "threshold": 1.75},
         "test": {"accuracy": 0.7130919098854065, "heavy_usage": 0.33704736828804016, "light_accuracy": 0.674,
                  "heavy_accuracy": 0.8050139546394348, "random_accuracy_same_usage": 0.722},
         "cost": {"c_l": 0.2436, "C_mix": 0.4985, "C_cascade": 0.5806466625440684, "macs_light": 12426, "macs_heavy": 51010},
         "sweep": {"routed": _SWEEP, "random": [{**s, "accuracy": 0.674 + 0.131 * s["heavy_usage"], "accuracy_std": 0.01}
                                                for s in _SWEEP]}}
HF = {"method": "hyperflows", "masked_weights": 50200, "sparsity": 0.9, "remaining": 0.1, "accuracy": 0.777,
      "test_accuracy": 0.7771587743732591, "layers": {"body.0": 0.87, "body.2": 0.93, "fc": 0.54}, "seconds": 5.3,
      "epochs": [{"epoch": 1, "phase": "prune", "gamma": 8.6, "remaining": 0.41, "expected": 0.13},
                 {"epoch": 2, "phase": "prune", "gamma": 29.6, "remaining": 0.07, "expected": 0.09},
                 {"epoch": 3, "phase": "regrow", "gamma": 0.0, "remaining": 0.03}]}
HF_SWEEP = {"runs": [{"gamma": g, "remaining": 0.4 * g ** -0.52, "sparsity": 1 - 0.4 * g ** -0.52, "accuracy": 0.88}
                     for g in (0.5, 1.0, 2.0, 4.0)],
            "fit": {"n": 4, "power": {"c": 0.4, "a": 0.52, "r2": 0.996},
                    "log_quadratic": {"c": 0.405, "a0": 0.5, "a1": 0.03, "r2": 0.997}}, "seconds": 5.4}
IDAP = {"model_name": "resnet20", "data": "digits", "stop_reason": "budget", "removed_blocks": ["layer2.1"],
        "dense": {"accuracy": 0.96, "macs": 2000000, "params": 270000, "test_accuracy": 0.95},
        "final": {"accuracy": 0.95, "macs": 700000, "params": 90000, "macs_reduction": 2.857142857142857,
                  "params_reduction": 3.0, "test_accuracy": 0.9443},
        "steps": [{"stage": 1, "step": 0, "accuracy": 0.96, "macs": 1500000, "params": 200000, "accepted": True},
                  {"stage": 1, "step": 1, "accuracy": 0.90, "macs": 1000000, "params": 150000, "accepted": False},
                  {"stage": 1, "step": 1, "accuracy": 0.955, "macs": 1200000, "params": 160000, "accepted": True},
                  {"stage": 2, "block": "layer2.1", "accuracy": 0.95, "macs": 700000, "params": 90000,
                   "accepted": True}], "seconds": 42.0}
_CMP_ROWS = [{"method": m, "target": t, "n": 3, "achieved": t, "macs": 51010 / t,
              "acc_raw": a - 0.1 * t, "acc_raw_std": 0.02, "acc_bn": None, "acc_bn_std": None,
              "acc_ft": a - 0.02 * t, "acc_ft_std": 0.01}
             for m, a in (("l1", 0.9), ("random", 0.85)) for t in (2.0, 4.0, 8.0)]
COMPARE = {"config": {"methods": ["l1", "random"], "data": "digits"}, "dense": {"accuracy": 0.805, "macs": 51010},
           "runs": [], "summary": _CMP_ROWS, "seconds": 12.0}
RUNS = {"dense": DENSE, "prune": PRUNE, "route": ROUTE, "hf": HF, "hfsweep": HF_SWEEP, "idap": IDAP, "compare": COMPARE}
KINDS = {"dense": "train", "prune": "prune", "route": "route", "hf": "hyperflows", "hfsweep": "hf-sweep",
         "idap": "idap", "compare": "compare"}


def make_runs(root: Path) -> dict[str, Path]:
    """One directory per kind of run, each with its results.json (prune also with its model.json)."""
    from flowprune.io import save
    from flowprune.models import build_model

    dirs = {}
    for name, res in RUNS.items():
        d = root / name
        write_results(d / "results.json", res)
        dirs[name] = d
    save(build_model("lenet300", (1, 8, 8), 10), dirs["prune"])  # dense widths come from model.json's base
    return dirs


def summary_cells(page: str) -> list[tuple[int, str, str, str]]:
    """``(run index, data-key, data-value, shown text)`` of every number in the summary table."""
    table = re.search(r'<table id="summary">.*?</table>', page, re.S).group(0)
    return [(int(i), k, v, t) for i, k, v, t in
            re.findall(r'<td data-run="(\d+)" data-key="([^"]+)" data-value="([^"]+)">([^<]*)</td>', table)]


def lookup(d: dict, path: str):
    for k in path.split("."):
        d = d[k]
    return d


def check_summary_matches(page: str, results: list[dict]) -> int:
    cells = summary_cells(page)
    for i, key, value, text in cells:
        v = lookup(results[i], key)
        assert repr(v) == value, (key, v, value)
        assert text.replace("K", "").replace("M", "")  # something is shown
        if isinstance(v, float) and "." in text and key.endswith(("accuracy", "usage", "sparsity")):
            assert text == f"{100 * v:.2f}", (key, v, text)
    return len(cells)


def test_results_helpers_importable_as_before(tmp_path):
    p = write_results(tmp_path / "r", {"a": float("nan"), "b": 1})
    assert p == tmp_path / "r" / "results.json" and json.loads(p.read_text()) == {"a": None, "b": 1}
    assert format_table([{"x": 1234567, "y": 0.5}]).splitlines()[2] == "| 1.23M | 0.50 |"


@pytest.mark.parametrize("name", list(RUNS))
def test_every_kind_of_run_gets_its_sections(tmp_path, name):
    dirs = make_runs(tmp_path)
    out = write_report(dirs[name])
    assert out == dirs[name] / "report.html"
    page = out.read_text()
    assert f"({KINDS[name]};" in page
    assert "<script" not in page and "http://" not in page and "https://" not in page  # self-contained
    n_img = page.count('<img src="data:image/png;base64,')
    expected = {"dense": 1, "prune": 3, "route": 1, "hf": 2, "hfsweep": 1, "idap": 1, "compare": 2}[name]
    assert n_img == expected, (name, n_img)
    check_summary_matches(page, [RUNS[name]])
    if name == "prune":
        assert "kept width per layer, dense vs pruned" in page and "score distribution per layer" in page
    if name == "idap":
        assert "rolled back" in page


def test_missing_sections_are_skipped(tmp_path):
    write_results(tmp_path / "a" / "results.json", {"method": "l1", "widths": {}, "accuracy": 0.5, "history": []})
    write_results(tmp_path / "b" / "results.json", {"something": 3, "odd": "x", "route": None})
    write_results(tmp_path / "c" / "results.json", {"sweep": {"routed": [{"accuracy": "bad"}]}, "cost": {},
                                                     "router": "confidence", "test": {}})
    page = merge_reports([tmp_path / d for d in "abc"], tmp_path / "m.html").read_text()
    assert page.count("<h2 id=") == 3
    assert "nothing to plot" in page or "section skipped" in page


def test_merge_compares_runs_and_cli(tmp_path, capsys):
    from flowprune.cli import main

    dirs = make_runs(tmp_path)
    order = ["dense", "prune", "route", "idap"]
    assert main(["report", *[str(dirs[n]) for n in order], "--out", str(tmp_path / "all.html")]) == 0
    assert "report:" in capsys.readouterr().out
    page = (tmp_path / "all.html").read_text()
    assert "Compare runs" in page
    assert check_summary_matches(page, [RUNS[n] for n in order]) >= 12


def test_report_errors_are_clear(tmp_path, capsys):
    from flowprune.cli import main

    (tmp_path / "empty").mkdir()
    with pytest.raises(FlowpruneError, match="holds no results.json"):
        write_report(tmp_path / "empty")
    assert main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r.html")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    make_runs(tmp_path)
    with pytest.raises(FlowpruneError, match="must end in .html"):
        merge_reports([tmp_path / "dense"], tmp_path / "r.pdf")


def test_every_command_writes_its_report_in_one_place(tmp_path, capsys):
    """The CLI writes OUT/report.html after any command that left OUT/results.json (and not with --no-report)."""
    from flowprune.cli import main

    out = tmp_path / "dense"
    assert main(["train", "--model", "lenet300", "--data", "digits", "--epochs", "1", "--no-speed", "--no-augment",
                 "--out", str(out)]) == 0
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    page = (out / "report.html").read_text()
    check_summary_matches(page, [json.loads((out / "results.json").read_text())])
    out2 = tmp_path / "dense2"
    assert main(["train", "--model", "lenet300", "--data", "digits", "--epochs", "1", "--no-speed", "--no-augment",
                 "--out", str(out2), "--no-report"]) == 0
    assert (out2 / "results.json").exists() and not (out2 / "report.html").exists()


def test_demo_directory_layout_gives_one_page(tmp_path):
    dirs = make_runs(tmp_path / "demo")
    for n in ("prune", "hf", "hfsweep", "idap", "compare"):
        (dirs[n] / "results.json").rename(dirs[n] / "old.json")
    write_results(tmp_path / "demo" / "summary.json", {"rows": [{"model": "heavy", "test acc %": 80.5}],
                                                       "route": {"router": "confidence"}, "seconds": 9.0})
    from flowprune.io import save
    from flowprune.models import build_model

    save(build_model("lenet300", (1, 8, 8), 10), tmp_path / "demo" / "light",  # the demo's light expert
         metadata={"stage": "pruned", "method": "agf", "widths": {"body.0": 75, "body.2": 25}, "reduction": 4.0})
    page = write_report(tmp_path / "demo").read_text()
    assert "(demo;" in page and "(train;" in page and "(route;" in page and "heavy" in page
    assert "demo/light <span" in page and "kept width per layer, dense vs pruned" in page
