"""The CLI: train writes results.json and a loadable model; bad input is one line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flowprune.cli import main
from flowprune.io import load


def test_train_cli_writes_results_and_model(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--model", "lenet300", "--data", "digits", "--epochs", "2", "--out", str(out),
               "--no-speed", "--lr", "0.1"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    for key in ("accuracy", "macs", "params", "epochs", "seed"):
        assert key in res
    # learns: measured 83.3% on the 359 test digits (1 and 2 threads); 0.6 is 12 standard errors below
    assert res["epochs"] == 2 and res["accuracy"] > 0.6
    assert res["macs"] == 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10 + 400  # + ReLU outputs
    assert load(out).flowprune_base["name"] == "lenet300"
    assert "test acc %" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["train", "--model", "resnet21", "--data", "digits", "--epochs", "1"], "unknown model 'resnet21'; allowed:"),
    (["train", "--model", "lenet300", "--data", "cifar9", "--epochs", "1"], "unknown data set 'cifar9'; allowed:"),
    (["train", "--model", "lenet300", "--data", "digits", "--epochs", "0"], "epochs must be a positive integer"),
    (["train", "--model", "lenet300", "--data", "digits", "--test-fraction", "0.9", "--val-fraction", "0.2",
      "--epochs", "1"], "below 1"),
    (["train", "--model", "lenet300", "--data", "imagefolder:/does/not/exist", "--epochs", "1"], "does not exist"),
])
def test_bad_input_is_one_line_without_traceback(tmp_path, argv, needle):
    p = subprocess.run([sys.executable, "-m", "flowprune", *argv, "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert needle in p.stderr
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_debug_shows_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "flowprune", "train", "--model", "nope", "--data", "digits",
                        "--epochs", "1", "--out", str(tmp_path), "--debug"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0 and "Traceback" in p.stderr
