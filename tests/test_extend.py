"""The worked examples of docs/extend/ run here: a new score and a new procedure, each one file.

Each example is loaded the way a user's file is (``flowprune.plugins.load_plugin``) and must then
appear in the registry, in the command line's choices and in ``compare`` without another edit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import flowprune as fp
from flowprune.plugins import load_plugin

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "extend" / "examples"


@pytest.fixture(scope="module")
def linf():
    load_plugin(str(EXAMPLES / "linf_score.py"))
    return fp.get_score("linf")


@pytest.fixture(scope="module")
def agf_layer():
    load_plugin(str(EXAMPLES / "agf_layer_procedure.py"))
    return fp.get_procedure("agf-layer")


def test_score_example_registers_and_scores_by_hand(linf):
    assert "linf" in fp.list_scores() and "linf" in fp.list_procedures()
    net = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -5.0, 2.0], [0.5, 0.25, -0.75]]))
    units = fp.find_units(net, torch.randn(1, 3))
    scores = linf(net, units)
    (unit,) = [u for u in units if u.size == 2]
    # by hand: the largest |w| of each row of the first layer
    assert torch.allclose(scores[unit.name], torch.tensor([5.0, 0.75]))


def test_score_example_prunes(linf, digits_data):
    m = fp.build_model("lenet300", digits_data.input_shape, digits_data.num_classes, hidden=(32, 16))
    res = fp.prune(m, digits_data, "linf", ratio=0.5, calib_batches=1, calib_batch_size=32)
    assert res.widths and all(w <= 16 for w in res.widths.values())


def test_examples_appear_in_cli_choices(monkeypatch, capsys):
    from flowprune.cli import main

    monkeypatch.setenv("FLOWPRUNE_PLUGINS", f"{EXAMPLES / 'linf_score.py'},{EXAMPLES / 'agf_layer_procedure.py'}")
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    assert "linf" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert "agf-layer" in capsys.readouterr().out.replace("\n", "").replace(" ", "")


def test_bad_plugin_is_one_line(monkeypatch, capsys):
    from flowprune.cli import main

    monkeypatch.setenv("FLOWPRUNE_PLUGINS", "/no/such/plugin.py")
    assert main(["prune", "--help"]) == 2
    err = capsys.readouterr().err
    assert "/no/such/plugin.py" in err and "Traceback" not in err


def test_procedure_example_runs_in_compare(agf_layer, digits_data):
    torch.manual_seed(0)
    dense = fp.build_model("lenet300", digits_data.input_shape, digits_data.num_classes, hidden=(64, 32))
    fp.fit(dense, digits_data, fp.TrainConfig(epochs=2, lr=0.05), progress=False)
    res = fp.compare(dense, digits_data, methods="agf,agf-layer", targets=[2], seeds=1, finetune_epochs=0,
                     measure_speed=False, scratch_epochs=0)
    rows = {r["method"]: r for r in res.summary}
    assert set(rows) == {"agf", "agf-layer"}
    assert abs(rows["agf-layer"]["achieved"] / 2 - 1) <= 0.03 + 1e-9
    # a per-layer cut of an MLP keeps the same share of every hidden layer
    run = next(r for r in res.runs if r["method"] == "agf-layer")
    assert 0 < run["ratio"] < 1 and 0.1 < rows["agf-layer"]["acc_bn"] <= 1
