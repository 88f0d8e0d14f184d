"""Training (resume gives identical weights), BN re-estimation, and pickle-free save/load."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from flowprune.data import make_loader
from flowprune.errors import FlowpruneError
from flowprune.io import load, read_recipe, save
from flowprune.measure import accuracy, latency, throughput
from flowprune.models import build_model
from flowprune.train import TrainConfig, fit, reestimate_bn


def _small(digits_data):
    torch.manual_seed(0)
    return build_model("lenet300", digits_data.input_shape, 10, hidden=[32, 16])


def test_fit_learns_and_is_deterministic(digits_data):
    cfg = TrainConfig(epochs=3, lr=0.1, batch_size=64, seed=1)
    a, b = _small(digits_data), _small(digits_data)
    fit(a, digits_data, cfg, progress=False)
    fit(b, digits_data, cfg, progress=False)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    # learns: measured 91.1% on the 359 test digits; 0.75 is 10 standard errors below (chance: 0.1)
    assert accuracy(a, make_loader(digits_data.test, 256)) > 0.75


def test_resume_after_interruption_gives_identical_weights(digits_data, tmp_path):
    cfg = TrainConfig(epochs=4, lr=0.1, batch_size=64, seed=2, augment=True)
    ref = _small(digits_data)
    fit(ref, digits_data, cfg, progress=False)

    class Crash(Exception):
        pass

    def crash_after_2(epoch, model, hist):
        if epoch == 2:
            raise Crash

    run = _small(digits_data)
    with pytest.raises(Crash):
        fit(run, digits_data, cfg, checkpoint_dir=tmp_path, on_epoch_end=crash_after_2, progress=False)
    # the crash happened before epoch 2's checkpoint: epoch 1 is on disk; a new process resumes
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    resumed = _small(digits_data)
    hist = fit(resumed, digits_data, cfg, checkpoint_dir=tmp_path, progress=False)
    assert [e["epoch"] for e in hist["epochs"]] == [1, 2, 3, 4]
    for pa, pb in zip(ref.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(pa, pb)


def test_resume_refuses_a_different_config(digits_data, tmp_path):
    fit(_small(digits_data), digits_data, TrainConfig(epochs=1, batch_size=64), checkpoint_dir=tmp_path,
        progress=False)
    with pytest.raises(FlowpruneError, match="another training config"):
        fit(_small(digits_data), digits_data, TrainConfig(epochs=2, batch_size=64), checkpoint_dir=tmp_path,
            progress=False)


@pytest.mark.parametrize("bad, match", [({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"),
                                        ({"optimizer": "lion"}, "allowed: adamw, sgd")])
def test_fit_validates(digits_data, bad, match):
    with pytest.raises(FlowpruneError, match=match):
        fit(_small(digits_data), digits_data, TrainConfig(), progress=False, **bad)


def test_reestimate_bn_uses_exact_batch_statistics(trained_resnet20_digits, digits_data):
    m = trained_resnet20_digits
    batches = digits_data.calibration_batches(batch_size=64, num_batches=3)
    before = {k: v.clone() for k, v in m.state_dict().items() if "running" not in k and "num_batches" not in k}
    reestimate_bn(m, batches)
    assert not m.training
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        first = m.bn1(m.conv1(x))  # conv1 feeds bn1 directly: its stats are the data's
    assert torch.allclose(m.bn1.running_mean, m.conv1(x).mean((0, 2, 3)), atol=1e-4)
    assert first.shape[0] == x.shape[0]
    for k, v in m.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k])  # no weight changed


def test_save_load_round_trip_without_pickle(trained_resnet20_digits, tmp_path):
    m = trained_resnet20_digits
    save(m, tmp_path / "m", metadata={"note": "dense"})
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["model.json", "model.safetensors"]
    recipe = read_recipe(tmp_path / "m")
    assert recipe["base"]["name"] == "resnet20" and recipe["metadata"] == {"note": "dense"}
    m2 = load(tmp_path / "m")
    x = torch.randn(5, 1, 8, 8)
    m.eval()
    assert torch.equal(m(x), m2(x))


def test_load_rebuilds_a_structurally_cut_model(tmp_path):
    import torch_pruning as tp

    m = build_model("resnet20", (1, 8, 8), 10)
    pruner = tp.pruner.MetaPruner(m, torch.randn(1, 1, 8, 8), importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=0.5, ignored_layers=[m.fc])
    pruner.step()
    m.layer3[2] = torch.nn.Identity()  # a removed block
    save(m, tmp_path / "cut")
    m2 = load(tmp_path / "cut")
    assert isinstance(m2.layer3[2], torch.nn.Identity)
    assert m2.layer1[0].conv1.out_channels == m.layer1[0].conv1.out_channels < 16
    m.eval()
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(m(x), m2(x))


def test_load_rejects_non_model_paths(tmp_path):
    with pytest.raises(FlowpruneError, match="not a saved flowprune model"):
        load(tmp_path / "nothing.pt")
    (tmp_path / "model.json").write_text(json.dumps({"format": "other"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FlowpruneError, match="not a flowprune model recipe"):
        load(tmp_path)


def test_measurement_leaves_mode_alone(trained_lenet_mnist):
    m = trained_lenet_mnist.train()
    snapshot = copy.deepcopy(m.state_dict())
    assert latency(m, batch_size=1, repeats=3, warmup=1) > 0
    assert throughput(m, batch_size=8, repeats=2, warmup=1) > 0
    assert m.training
    for k, v in m.state_dict().items():
        assert torch.equal(v, snapshot[k])


def test_oneDNN_guard_only_for_irregular_conv_widths(monkeypatch):
    from flowprune.backend import has_irregular_convs, safe_conv_backward

    dense = build_model("resnet20", (1, 8, 8), 10)
    assert not has_irregular_convs(dense)
    cut = build_model("resnet20", (1, 8, 8), 10)
    cut.layer1[0].conv1 = torch.nn.Conv2d(16, 9, 3, padding=1, bias=False)
    assert has_irregular_convs(cut)
    with safe_conv_backward(dense):
        assert torch.backends.mkldnn.enabled
    with safe_conv_backward(cut):
        assert not torch.backends.mkldnn.enabled
    assert torch.backends.mkldnn.enabled
    monkeypatch.setenv("FLOWPRUNE_MKLDNN", "1")
    with safe_conv_backward(cut):
        assert torch.backends.mkldnn.enabled
