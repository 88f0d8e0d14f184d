"""Export: every zoo model after every kind of cut runs in onnxruntime and matches PyTorch.

Cut kinds: channels/neurons (``plan_cuts`` + ``apply_cuts``), attention heads (``vit``), whole
blocks replaced by the identity (``flowprune.pruning.layers``) and Hyperflows weight masks (baked
by the export). CI exports with the TorchScript exporter for the full matrix (0.1 s a model) and
with the default dynamo exporter for one model per cut kind; ``pytest -m slow`` runs the whole
matrix through the dynamo exporter too (3-7 s a model on 2 cores).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import flowprune as fp
from flowprune.errors import FlowpruneError
from flowprune.models import MODELS, build_model
from flowprune.plan import plan_cuts
from flowprune.pruning.layers import find_removable_blocks, remove_block
from flowprune.pruning.masks import install_masks, mask_logits, set_global_topk
from flowprune.pruning.structural import apply_cuts
from flowprune.scores import get_score
from flowprune.units import find_units

ort = pytest.importorskip("onnxruntime")

ZOO = sorted(MODELS)  # the registry (tv:/timm: adapters are not zoo models)
CUTS = ("channels", "heads", "blocks", "hyperflows")


def _shape(name: str) -> tuple[int, ...]:
    return (1, 40) if name.endswith("1d") else (1, 8, 8)  # cnn1d, lstm1d, gru1d read 1-D signals


def _applies(name: str, cut: str) -> bool:
    if cut == "heads":
        return name == "vit"
    if cut == "blocks":
        return bool(_blocks(build_model(name, _shape(name), 10)))
    return True


_BLOCKS: dict[str, list] = {}


def _blocks(m):
    key = m.flowprune_base["name"]
    if key not in _BLOCKS:
        _BLOCKS[key] = find_removable_blocks(m, torch.randn(2, *_shape(key)))
    return _BLOCKS[key]


def cut_model(name: str, cut: str) -> torch.nn.Module:
    """A small zoo model with one kind of cut applied (random weights, eval mode)."""
    torch.manual_seed(0)
    shape = _shape(name)
    m = build_model(name, shape, 10).eval()
    x = torch.randn(1, *shape)
    if cut in ("channels", "heads"):
        kinds = ("head",) if cut == "heads" else ("channel", "neuron", "recurrent")
        units = find_units(m, x, kinds=kinds)
        assert units, f"{name} has no {kinds} units"
        scores = get_score("l1")(m, units)
        plan = plan_cuts(m, units, scores, example_inputs=x, ratio=0.5)
        m = apply_cuts(m, plan, example_inputs=x)
        if cut == "heads":
            assert all(b.attn.num_heads == 2 for b in m.blocks)
    elif cut == "blocks":
        m = remove_block(m, sorted(_blocks(m), key=lambda b: b.name)[0])
    elif cut == "hyperflows":
        m = install_masks(m, kind="logit", seed=0)
        total = sum(p.numel() for p in mask_logits(m))
        set_global_topk(m, int(0.3 * total))  # 70% weight sparsity, as a Hyperflows run ends
    return m.eval()


def _check_onnx(m: torch.nn.Module, path, shape) -> None:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for b in (1, 7):  # the example batch was 2: both sizes come from the dynamic batch dimension
        x = torch.randn(b, *shape)
        with torch.no_grad():
            ref = m(x).numpy()
        got = sess.run(None, {name: x.numpy()})[0]
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


MATRIX = [(n, c) for n in ZOO for c in CUTS if c != "heads" or n == "vit"]


@pytest.mark.parametrize("name, cut", MATRIX)
def test_every_zoo_model_after_every_cut_runs_in_onnxruntime(name, cut, tmp_path):
    if not _applies(name, cut):
        pytest.skip(f"{name} has no removable block")
    m = cut_model(name, cut)
    res = fp.export(m, tmp_path / "m.onnx", exporter="torchscript")
    assert res.exporter == "torchscript" and res.dynamic_batch and res.max_abs_error < 1e-4
    _check_onnx(m, res.path, _shape(name))
    if cut == "hyperflows":
        assert "baked" in res.note


DYNAMO_CI = [("cnn1d", "channels"), ("vit", "heads"), ("vit", "blocks"), ("lenet300", "hyperflows")]


@pytest.mark.parametrize("name, cut", DYNAMO_CI)
def test_dynamo_exporter_one_model_per_cut_kind(name, cut, tmp_path):
    m = cut_model(name, cut)
    res = fp.export(m, tmp_path / "m.onnx")
    assert res.exporter == "dynamo", res.note
    _check_onnx(m, res.path, _shape(name))


@pytest.mark.slow
@pytest.mark.parametrize("name, cut", MATRIX)
def test_dynamo_exporter_full_matrix(name, cut, tmp_path):
    if not _applies(name, cut):
        pytest.skip(f"{name} has no removable block")
    m = cut_model(name, cut)
    res = fp.export(m, tmp_path / "m.onnx")
    assert res.exporter == "dynamo", res.note
    _check_onnx(m, res.path, _shape(name))


@pytest.mark.parametrize("name", ["lenet300", "vit"])
def test_pt2_program_round_trips_with_dynamic_batch(name, tmp_path):
    m = cut_model(name, "heads" if name == "vit" else "channels")
    res = fp.export(m, tmp_path / "m.pt2")
    assert res.format == "pt2" and res.path.exists()
    ep = torch.export.load(str(res.path))  # a file we just wrote: loading it is the user's call
    for b in (1, 5):
        x = torch.randn(b, 1, 8, 8)
        torch.testing.assert_close(ep.module()(x), m(x), atol=1e-4, rtol=1e-4)


def test_cli_error_is_one_line_in_a_subprocess(tmp_path):
    p = subprocess.run([sys.executable, "-m", "flowprune", "export", str(tmp_path), "--out", str(tmp_path / "m.onnx")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "is not a saved flowprune model" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_saved_model_directory_and_cli(tmp_path, capsys):
    from flowprune.cli import main

    m = cut_model("lenet300", "channels")
    fp.save(m, tmp_path / "light")
    torch.manual_seed(0)
    fp.save(build_model("lenet300", (1, 8, 8), 10), tmp_path / "dense")
    out = tmp_path / "light.onnx"
    assert main(["export", str(tmp_path / "light"), "--format", "onnx", "--out", str(out),
                 "--exporter", "torchscript", "--baseline", str(tmp_path / "dense"), "--speed-batch", "4",
                 "--speed-rounds", "1"]) == 0
    printed = capsys.readouterr().out
    assert "torchscript exporter" in printed and "onnxruntime" in printed and "speed-up b4" in printed
    _check_onnx(m, out, (1, 8, 8))
    # no temp file left; the speed measured after export sits beside the file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "light", "light.onnx", "light.onnx.speed.json"]
    sp = json.loads((tmp_path / "light.onnx.speed.json").read_text())
    assert sp["backend"] == "onnxruntime" and sp["batch_sizes"] == [1, 4]
    for b in ("b1", "b4"):
        assert set(sp[b]["seconds"]) == {"exported onnxruntime", "exported eager", "baseline onnxruntime",
                                         "baseline eager"}
        v = sp[b]["speedup"]["exported"]
        assert v is None or v == pytest.approx(sp[b]["seconds"]["baseline onnxruntime"]
                                               / sp[b]["seconds"]["exported onnxruntime"])
    assert sp["macs"]["baseline"] > sp["macs"]["exported"]


@pytest.mark.parametrize("argv, needle", [
    (["export", "{tmp}/empty", "--out", "{tmp}/m.onnx"], "is not a saved flowprune model"),
    (["export", "{tmp}/nope", "--out", "{tmp}/m.onnx"], "does not exist"),
    (["export", "{model}", "--format", "tflite", "--out", "{tmp}/m.tflite"], "unknown --format 'tflite'"),
    (["export", "{model}", "--out", "{tmp}/m.bin"], "cannot tell the export format"),
    (["export", "{model}", "--format", "onnx", "--out", "{tmp}/m.pt2"], "ends in .pt2 but the format is 'onnx'"),
])
def test_bad_export_input_is_one_clear_error(tmp_path, argv, needle, capsys):
    from flowprune.cli import main

    fp.save(build_model("lenet300", (1, 8, 8), 10), tmp_path / "model")
    (tmp_path / "empty").mkdir()
    argv = [a.format(tmp=tmp_path, model=tmp_path / "model") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("m.*")) and not list(tmp_path.glob(".m.*"))


def test_failed_export_leaves_no_file(tmp_path):
    class Bad(torch.nn.Module):  # runs in PyTorch, but data-dependent Python control flow
        def forward(self, x):
            if float(x.sum()) > 1e9:
                return x
            return torch.nn.functional.relu(x).mean(dim=(2, 3))

    with pytest.raises(FlowpruneError, match="nothing was written"):
        fp.export(Bad(), tmp_path / "bad.pt2", example_inputs=torch.randn(2, 1, 4, 4))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FlowpruneError, match="input shape is unknown"):
        fp.export(torch.nn.Linear(3, 2), tmp_path / "lin.onnx")
    with pytest.raises(FlowpruneError, match="unknown exporter"):
        fp.export(build_model("lenet300", (1, 8, 8), 10), tmp_path / "x.onnx", exporter="tf")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------- cascades

def _cascade(router: str, **kw):
    from flowprune.route.cascade import Cascade
    from flowprune.route.routers import make_router

    torch.manual_seed(1)
    light = cut_model("lenet300", "channels")
    heavy = build_model("lenet300", (1, 8, 8), 10).eval()
    with torch.no_grad():  # sharper logits than a fresh init, so scores spread out
        light.fc.weight.mul_(8)
    if router == "learned":  # an unfitted learned router is still a function of the input
        kw = {"num_classes": 10, "feature_dim": light.fc.in_features, "hidden": 8}
    c = Cascade(light, heavy, make_router(router, **kw), threshold=0.0)
    x = torch.randn(256, 1, 8, 8)
    with torch.no_grad():
        s = c.router(*c.light_outputs(x))
    c.threshold = float(s.median())  # half the inputs escalate
    return c, x


@pytest.mark.parametrize("router, kw", [("confidence", {}), ("entropy", {}), ("l1", {"direction": "low_is_hard"}),
                                        ("learned", {})])
def test_exported_cascade_reproduces_decisions(router, kw, tmp_path):
    from flowprune.export import OnnxCascade

    c, x = _cascade(router, **kw)
    res = fp.export(c, tmp_path / "onnx_cascade", exporter="torchscript")
    rec = json.loads((tmp_path / "onnx_cascade" / "cascade.json").read_text())
    assert rec["router"] == router and rec["threshold"] == c.threshold
    assert {p.name for p in res.files} >= {"light.onnx", "heavy.onnx", "cascade.json"}
    runner = fp.export.OnnxCascade(tmp_path / "onnx_cascade")
    assert isinstance(runner, OnnxCascade)
    with torch.no_grad():
        ref = c.route(x)
    got = runner.route(x.numpy())
    np.testing.assert_allclose(got.score, ref.score.numpy(), atol=1e-5, rtol=1e-5)
    borderline = np.abs(ref.score.numpy() - c.threshold) < 1e-5
    assert np.array_equal(got.expert[~borderline], ref.expert.numpy()[~borderline])
    assert 0.3 < got.heavy_usage < 0.7
    np.testing.assert_allclose(got.logits, ref.logits.numpy(), atol=1e-4, rtol=1e-4)


def test_saved_routed_dir_exports_with_cli_and_random_router_is_refused(tmp_path):
    from flowprune.cli import main
    from flowprune.route.io import save_cascade

    c, x = _cascade("confidence")
    save_cascade(c, tmp_path / "routed" / "cascade")
    assert main(["export", str(tmp_path / "routed"), "--out", str(tmp_path / "onnx"), "--exporter",
                 "torchscript"]) == 0
    got = fp.export.OnnxCascade(tmp_path / "onnx").route(x[:64].numpy())
    with torch.no_grad():
        assert np.array_equal(got.expert, c.route(x[:64]).expert.numpy())
    r, _ = _cascade("random")
    with pytest.raises(FlowpruneError, match="'random' router cannot be exported"):
        fp.export(r, tmp_path / "rnd")
    with pytest.raises(FlowpruneError, match="directory"):
        fp.export(c, tmp_path / "c.onnx")
    from flowprune.route.cascade import EarlyExitCascade, ExitHead
    from flowprune.route.routers import make_router

    ee = EarlyExitCascade(build_model("lenet300", (1, 8, 8), 10).eval(), "body.1", ExitHead(300, 10, 2),
                          make_router("confidence"), 1.0)
    with pytest.raises(FlowpruneError, match="early-exit cascades"):
        fp.export(ee, tmp_path / "ee")
    assert not (tmp_path / "rnd").exists() and not (tmp_path / "ee").exists()
