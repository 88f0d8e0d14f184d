"""The worked example of docs/extend/router.md runs here: a new router (margin = 1 - (p1 - p2)) in
one file, loaded the way a user's file is, must then work in route_experts, save/load, the ONNX
export and the command line (``--router`` choices, ``--router-option``) without another edit."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import flowprune as fp
from flowprune.errors import FlowpruneError
from flowprune.route import get_router, list_routers, load_cascade, route_experts

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "extend" / "examples" / "margin_router.py"
_MODELS: dict = {}


def _load_example():
    from flowprune.plugins import load_plugin

    return load_plugin(str(EXAMPLE))


@pytest.fixture(scope="module")
def margin():
    _load_example()
    return get_router("margin")


@pytest.fixture
def experts(digits_data):
    """A small light LeNet (16 hidden, 1 epoch) and a 300-100 heavy one on real 8x8 digits."""
    if not _MODELS:
        torch.manual_seed(0)
        heavy = fp.build_model("lenet300", digits_data.input_shape, 10)
        fp.train.fit(heavy, digits_data, fp.train.TrainConfig(epochs=3, lr=0.05, augment=False), progress=False)
        torch.manual_seed(1)
        light = fp.build_model("lenet300", digits_data.input_shape, 10, hidden=(16,))
        fp.train.fit(light, digits_data, fp.train.TrainConfig(epochs=1, lr=0.05, augment=False), progress=False)
        _MODELS.update(light=light.eval(), heavy=heavy.eval())
    return copy.deepcopy(_MODELS["light"]), copy.deepcopy(_MODELS["heavy"])


def test_example_registers_and_scores_by_hand(margin):
    assert "margin" in list_routers()
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]]))
    torch.testing.assert_close(margin(logits), torch.tensor([1 - 0.5, 1 - 0.05]))
    hot = get_router("margin", temperature=2.0)(logits)  # a higher temperature flattens the softmax
    assert bool((hot > margin(logits)).all())
    with pytest.raises(FlowpruneError, match=r"unknown option\(s\) \['temp'\] for router 'margin'; accepted: temperature"):
        get_router("margin", temp=2.0)
    with pytest.raises(FlowpruneError, match="positive number"):
        get_router("margin", temperature=0)


def test_example_routes_saves_loads_and_exports(margin, experts, digits_data, tmp_path):
    light, heavy = experts
    res = route_experts(light, heavy, digits_data, router="margin", router_kwargs={"temperature": 2.0},
                        heavy_budget=0.4, tolerance=0.1, measure=False, sweep=False, diagnostic=False,
                        out_dir=tmp_path / "run")
    s = res.summary()
    assert s["router"] == "margin" and abs(s["heavy_usage"] - 0.4) < 0.1
    # the margin finds the light expert's mistakes: routed above light by more than 3 standard errors of the
    # difference on the n test images (measured 61.8% vs 43.5%, 5 standard errors)
    n, a, b = len(digits_data.test), s["routed_acc"], s["light_acc"]
    assert a - b > 3 * math.sqrt(a * (1 - a) / n + b * (1 - b) / n), s
    assert json.loads((tmp_path / "run" / "results.json").read_text())["router"] == "margin"
    back = load_cascade(tmp_path / "run" / "cascade")
    assert back.router.name == "margin" and back.router.temperature == 2.0
    x = digits_data.test.tensors[0]
    a, b = res.cascade.route(x), back.route(x)
    assert torch.equal(a.expert, b.expert) and math.isclose(back.threshold, res.cascade.threshold)
    fp.export(back, tmp_path / "onnx", exporter="torchscript")  # traced to router.onnx: no numpy formula needed
    assert (tmp_path / "onnx" / "router.onnx").is_file()
    got = fp.export.OnnxCascade(tmp_path / "onnx").route(x.numpy())
    borderline = np.abs(a.score.numpy() - back.threshold) < 1e-5
    assert np.array_equal(got.expert[~borderline], a.expert.numpy()[~borderline])


def test_example_in_the_command_line(margin, experts, digits_data, tmp_path, capsys):
    from flowprune.cli import main
    from flowprune.io import save

    with pytest.raises(SystemExit):
        main(["route", "--help"])
    out = capsys.readouterr().out.replace("\n", " ")
    assert "margin" in out.split("--router {")[1].split("}")[0] and "temperature=1.0" in out
    light, heavy = experts
    save(light, tmp_path / "light")
    save(heavy, tmp_path / "heavy")
    rc = main(["route", "--light", str(tmp_path / "light"), "--heavy", str(tmp_path / "heavy"), "--data", "digits",
               "--router", "margin", "--router-option", "temperature=0.5", "--heavy-budget", "0.3",
               "--tolerance", "0.1", "--no-speed", "--no-sweep", "--no-diagnostic", "--out", str(tmp_path / "cli")])
    assert rc == 0
    assert load_cascade(tmp_path / "cli" / "cascade").router.temperature == 0.5
    rc = main(["route", "--light", str(tmp_path / "light"), "--heavy", str(tmp_path / "heavy"), "--data", "digits",
               "--router", "margin", "--router-option", "temprature=2", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert rc == 2 and "'temprature'" in err and "accepted: temperature" in err


def test_example_as_a_plugin_in_a_fresh_process():
    """Named in FLOWPRUNE_PLUGINS, the file puts ``margin`` in ``flowprune route --router`` (no other edit)."""
    env = {**os.environ, "FLOWPRUNE_PLUGINS": str(EXAMPLE), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "flowprune", "route", "--help"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    choices = out.stdout.replace("\n", " ").split("--router {")[1].split("}")[0]
    assert "margin" in choices.split(",")
