"""``flowprune prune`` end to end on a tiny saved model."""

from __future__ import annotations

import json

import torch

from flowprune import io
from flowprune.cli import main
from flowprune.models import build_model


def test_prune_cli_writes_results_and_model(tmp_path, capsys):
    torch.manual_seed(0)
    dense = build_model("resnet20", (1, 8, 8), 10)
    io.save(dense, tmp_path / "dense")
    rc = main(["prune", "--checkpoint", str(tmp_path / "dense"), "--data", "digits", "--test-fraction", "0.05", "--method", "l1",
               "--target-macs", "2x", "--calib-batches", "2", "--out", str(tmp_path / "out"), "--no-speed"])
    assert rc == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["method"] == "l1" and abs(res["macs_reduction"] / 2 - 1) <= 0.03
    assert {"dense_accuracy", "accuracy_after_cut", "accuracy_after_bn", "widths", "params", "seed"} <= set(res)
    pruned = io.load(tmp_path / "out")
    assert pruned(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_prune_cli_bad_input_is_one_line(tmp_path, capsys):
    dense = build_model("resnet20", (1, 8, 8), 10)
    io.save(dense, tmp_path / "dense")
    rc = main(["prune", "--checkpoint", str(tmp_path / "dense"), "--data", "digits", "--method", "nope",
               "--ratio", "0.5", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "allowed: agf" in capsys.readouterr().err
    rc = main(["prune", "--checkpoint", str(tmp_path / "dense"), "--data", "digits", "--target-macs", "1000x",
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "cannot be reached" in capsys.readouterr().err
