"""Every page in docs/results/ regenerates byte for byte from the JSON beside it (issue 23).

Pages are discovered: a new docs/results/X.md without X.json or without a registered writer fails
here, with a message naming what to add (benchmarks/results_pages.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import results_pages as rp  # noqa: E402

PAGES = rp.pages()


def test_pages_are_found():
    assert len(PAGES) >= 8 and {"compare", "hyperflows", "idap", "route"} <= set(PAGES), PAGES


@pytest.mark.parametrize("name", PAGES)
def test_page_regenerates_from_its_json(name):
    problem = rp.page_problem(name)
    assert problem is None, problem


def test_missing_json_and_missing_writer_say_what_to_add(tmp_path):
    assert "unwritten" not in rp.WRITERS
    (tmp_path / "unwritten.md").write_text("# unwritten\n")
    assert "has no unwritten.json beside it" in rp.page_problem("unwritten", tmp_path)
    assert "write_page('unwritten', payload)" in rp.page_problem("unwritten", tmp_path)
    (tmp_path / "unwritten.json").write_text(json.dumps({"command": "python -m benchmarks.unwritten"}))
    assert "no writer registered for docs/results/unwritten.md" in rp.page_problem("unwritten", tmp_path)
    assert rp.problems(tmp_path) == [rp.page_problem("unwritten", tmp_path)]
    # a registered writer that cannot read its JSON is a failing writer, not a missing one
    (tmp_path / "speed.md").write_text("# speed\n")
    (tmp_path / "speed.json").write_text(json.dumps({"command": "python -m benchmarks.bench_speed"}))
    assert "the writer of docs/results/speed.md fails on speed.json: KeyError" in rp.page_problem("speed", tmp_path)


def test_write_page_writes_both_and_a_hand_edit_is_caught(tmp_path, monkeypatch):
    monkeypatch.setitem(rp.WRITERS, "toy", lambda p: f"# toy\n\nCommand: `{p['command']}`\n\n| a |\n|---|\n| {p['a']} |\n")
    rp.write_page("toy", {"command": "python -m benchmarks.toy --n 3", "a": 1.5}, tmp_path)
    assert json.loads((tmp_path / "toy.json").read_text())["a"] == 1.5
    assert (tmp_path / "toy.md").read_text().endswith("| 1.5 |\n")
    assert rp.page_problem("toy", tmp_path) is None
    (tmp_path / "toy.md").write_text((tmp_path / "toy.md").read_text().replace("1.5", "1.6"))
    assert "differs from what its writer produces" in rp.page_problem("toy", tmp_path)
    # a page whose header does not name its command
    monkeypatch.setitem(rp.WRITERS, "toy", lambda p: "# toy\n")
    (tmp_path / "toy.md").write_text("# toy\n")
    assert "does not name the command" in rp.page_problem("toy", tmp_path)


MD = ("# T\n\nText with | a pipe.\n\n| a | b |\n|---|---|\n| 1 | 2.5 |\n\n"
      "| model    | acc % |\n|----------|-------|\n| dense    | 97.80 |\n\n| x |\n|:-:|\n| y |\nend\n")


def test_blocks_round_trip_byte_for_byte_and_keep_numbers_in_tables():
    blocks = rp.to_blocks(MD)
    assert rp.render_blocks({"page": blocks}) == MD
    tables = [b["table"] for b in blocks if "table" in b]
    assert [t["rows"] for t in tables] == [[[" 1 ", " 2.5 "]], [[" dense    ", " 97.80 "]], [[" y "]]]
    assert [c.strip() for c in tables[1]["columns"]] == ["model", "acc %"]


def test_archive_converts_a_page_once_and_again_after_an_edit(tmp_path):
    (tmp_path / "old.md").write_text("# Old\n\nmeasured by `python -m benchmarks.bench_old`:\n\n| a |\n|---|\n| 3 |\n")
    (tmp_path / "old.json").write_text(json.dumps({"summary": [1, 2]}))  # a benchmark's own file: kept as raw
    rp.archive("old", "2026-12-04", tmp_path)
    payload = json.loads((tmp_path / "old.json").read_text())
    assert payload["kind"] == "archived-page" and payload["raw"] == {"summary": [1, 2]}
    assert rp.page_problem("old", tmp_path) is None
    md = (tmp_path / "old.md").read_text()
    assert "Archived page, not regenerable" in md and md.endswith("| a |\n|---|\n| 3 |\n")
    (tmp_path / "old.md").write_text(md.replace("| 3 |", "| 4 |"))
    rp.archive("old", "2026-12-05", tmp_path)
    md2 = (tmp_path / "old.md").read_text()
    assert md2.count("Archived page") == 1 and "| 4 |" in md2 and "2026-12-05" in md2
    assert json.loads((tmp_path / "old.json").read_text())["raw"] == {"summary": [1, 2]}


def test_calibration_cost_page_comes_from_its_payload(tmp_path):
    t = {"model": "m", "median_s": {"train pass": 1.0, "AGF": 0.5, "TP Taylor": 2.0},
         "ratio_vs_train": {"AGF": 0.5, "TP Taylor": 2.0}, "find_units_s": 0.01}
    m = {"model": "m", "median_peak_increase_bytes": {"train step": 10 * 2**20, "AGF calibration": 12 * 2**20},
         "ratio": 1.2, "valid": True, "how": ["sampled RSS"]}
    payload = {"command": "python -m benchmarks.bench_calibration_cost --quick --doc x", "date": "2026-12-04 17:00",
               "torch": "2.14.1", "threads": 1, "T": 10, "batch": 64, "repeats": 3, "mem_repeats": 1,
               "time": [t], "memory": [m]}
    rp.write_page("calibration_cost", payload, tmp_path)
    md = (tmp_path / "calibration_cost.md").read_text()
    assert "| m | 1.000 | 0.500 | 0.50x | 2.000 | 2.00x | 0.01 |" in md
    assert "| m | 10.0 | 12.0 | 1.20x | sampled RSS |" in md and "m 0.50x (**met**)" in md
    assert rp.page_problem("calibration_cost", tmp_path) is None
