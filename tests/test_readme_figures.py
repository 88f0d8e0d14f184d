"""benchmarks/readme_figures.py: the README's test count and demo table against the commands' outputs."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import readme_figures as rf  # noqa: E402

LOG = """....s.....
SKIPPED [3] tests/test_device.py:115: needs a CUDA GPU
SKIPPED [1] tests/test_models.py:40: no removable block
SKIPPED [1] tests/test_models.py:41: no removable block
===== 676 passed, 5 skipped, 3 deselected in 151.20s (0:02:31) =====
"""
SUMMARY = {"rows": [
    {"model": "heavy: dense resnet20", "test acc %": 97.8, "MACs": 31480000, "params": 272190, "rel. cost": 1.0,
     "heavy usage %": 100.0, "latency b1 ms": 2.66, "throughput b256/s": 2049.6},
    {"model": "light: AGF 8x", "test acc %": 94.0, "MACs": 3900000, "params": 41650, "rel. cost": 0.12,
     "heavy usage %": 0.0, "latency b1 ms": 1.31, "throughput b256/s": 11657.79},
    {"model": "random routing, same usage", "test acc %": 95.93, "rel. cost": 0.66, "heavy usage %": 53.2}]}


def _readme(tests: str, demo: str) -> str:
    return (f"# x\n\n<!-- figures:demo -->\n{demo}<!-- /figures:demo -->\n\ntext\n"
            f"<!-- figures:tests -->\n{tests}<!-- /figures:tests -->\nmore\n")


def test_counts_and_skip_reasons_from_the_log():
    assert rf.test_counts(LOG) == {"passed": 676, "failed": 0, "skipped": 5, "deselected": 3, "errors": 0}
    assert rf.skip_reasons(LOG) == [(3, "needs a CUDA GPU"), (2, "no removable block")]
    assert rf.test_counts("1 failed, 2 passed, 1 error in 3.0s") == {"passed": 2, "failed": 1, "skipped": 0,
                                                                      "deselected": 0, "errors": 1}
    with pytest.raises(SystemExit, match="no pytest summary"):
        rf.test_counts("collected 0 items")


def test_regenerate_then_check_round_trips_and_counts_are_exact(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(_readme("old\n", "```\nold\n```\n"))
    (tmp_path / "log").write_text(LOG)
    (tmp_path / "summary.json").write_text(__import__("json").dumps(SUMMARY))
    args = ["--readme", str(readme), "--test-log", str(tmp_path / "log"), "--demo", str(tmp_path / "summary.json")]
    assert rf.main(args + ["--check"]) == 1  # the old blocks drifted
    assert rf.main(args) == 0
    text = readme.read_text()
    assert "**676 passed**" in text and "3: needs a CUDA GPU" in text and "| light: AGF 8x" in text
    assert text.endswith("<!-- /figures:tests -->\nmore\n") and "text\n" in text
    assert rf.main(args + ["--check"]) == 0
    (tmp_path / "log").write_text(LOG.replace("676 passed", "677 passed"))  # one test more: exact, so drift
    assert rf.check_tests(rf.read_block(text, "tests"), (tmp_path / "log").read_text()) == [
        "tests: README says 676 passed, the log says 677"]


def test_demo_tolerances():
    block = rf.render_demo(SUMMARY)
    run = copy.deepcopy(SUMMARY)
    run["rows"][1].update({"test acc %": 93.2, "params": 35000, "latency b1 ms": 9.9})  # issue 23's other machine
    run["rows"][2]["heavy usage %"] = 52.3
    assert rf.check_demo(block, run, 1000) == []
    run["rows"][1]["test acc %"] = 89.0  # 5 points: more than 3 standard errors (4.2) on 1,000 images
    run["rows"][0]["MACs"] = 31490000  # the dense model's MACs: within 5 %
    errs = rf.check_demo(block, run, 1000)
    assert len(errs) == 1 and "light: AGF 8x / test acc %" in errs[0]
    assert rf.tolerance("test acc %", 97.8, 1000) == pytest.approx(100 * 3 * (2 * 0.978 * 0.022 / 1000) ** 0.5 + 0.01)
    assert rf.tolerance("latency b1 ms", 1.0, 1000) is None
    assert rf.tolerance("x heavy b256", 2.2, 1000) is None  # a speed ratio: follows the load, never compared
    run["rows"].pop()
    assert "rows/columns differ" in rf.check_demo(block, run, 1000)[0]
