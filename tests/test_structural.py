"""Cuts through Torch-Pruning, the iterative procedure, checkpoints and save/load."""

from __future__ import annotations

import json

import pytest
import torch

from flowprune import io
from flowprune.errors import FlowpruneError
from flowprune.measure import count_macs_params
from flowprune.models import build_model
from flowprune.plan import plan_cuts
from flowprune.pruning.structural import apply_cuts, prune
from flowprune.scores import get_score, list_scores
from flowprune.train import TrainConfig
from flowprune.units import find_units


def test_zero_cut_leaves_outputs_unchanged():
    m = build_model("resnet20", (1, 8, 8), 10).eval()
    x = torch.randn(4, 1, 8, 8)
    units = find_units(m, x[:1])
    new = apply_cuts(m, {u.name: [] for u in units}, example_inputs=x[:1]).eval()
    torch.testing.assert_close(new(x), m(x))


def test_residual_coupled_channels_cut_consistently():
    m = build_model("resnet20", (1, 8, 8), 10).eval()
    x = torch.randn(1, 1, 8, 8)
    drop = [1, 5, 6, 11]
    new = apply_cuts(m, {"conv1": drop}, example_inputs=x)
    keep = [i for i in range(16) if i not in drop]
    assert new.conv1.out_channels == 12 and new.bn1.num_features == 12
    for b in range(3):  # every block writing into the stream lost the same channels
        torch.testing.assert_close(new.layer1[b].conv2.weight, m.layer1[b].conv2.weight[keep])
        torch.testing.assert_close(new.layer1[b].conv1.weight, m.layer1[b].conv1.weight[:, keep])
        torch.testing.assert_close(new.layer1[b].bn2.running_mean, m.layer1[b].bn2.running_mean[keep])
    torch.testing.assert_close(new.layer2[0].shortcut[0].weight, m.layer2[0].shortcut[0].weight[:, keep])
    assert m.conv1.out_channels == 16  # caller untouched
    assert new(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_cut_vit_runs_and_round_trips(tmp_path, digits_data):
    m = build_model("vit", (1, 8, 8), 10).eval()
    x = torch.randn(1, 1, 8, 8)
    units = find_units(m, x)
    scores = get_score("agf")(m, units, digits_data.calibration_batches(16, 2))
    plan = plan_cuts(m, units, scores, example_inputs=x, ratio=0.5)
    new = apply_cuts(m, plan, example_inputs=x).eval()
    attn = new.blocks[0].attn
    assert attn.num_heads == 2 and attn.head_dim == 16 and attn.attn_dim == 32 and attn.qkv.out_features == 96
    assert new.blocks[0].mlp.fc1.out_features == 64
    xb = torch.randn(3, 1, 8, 8)
    out = new(xb)
    out.sum().backward()
    io.save(new, tmp_path / "vit")
    torch.testing.assert_close(io.load(tmp_path / "vit")(xb), new(xb))


@pytest.mark.parametrize("name", list_scores())
@pytest.mark.parametrize("budget", ["layer", "global"])
def test_every_score_in_every_budget_prunes_and_runs(name, budget, digits_data):
    m = build_model("lenet300", (1, 8, 8), 10)
    x = torch.randn(1, 1, 8, 8)
    units = find_units(m, x)
    scores = get_score(name)(m, units, digits_data.calibration_batches(32, 2))
    plan = plan_cuts(m, units, scores, example_inputs=x, target_macs=3.0, budget=budget)
    new = apply_cuts(m, plan, example_inputs=x)
    assert new(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    ratio = count_macs_params(m)[0] / count_macs_params(new)[0]
    assert abs(ratio / 3.0 - 1) <= 0.03


def _half(name, shape):
    m = build_model(name, shape, 10)
    x = torch.randn(2, *shape)
    units = find_units(m, x[:1])
    scores = get_score("l1")(m, units)
    new = apply_cuts(m, plan_cuts(m, units, scores, example_inputs=x[:1], ratio=0.5), example_inputs=x[:1])
    new(x).sum().backward()
    assert count_macs_params(new)[0] < 0.6 * count_macs_params(m)[0]
    return new


@pytest.mark.parametrize("name,shape", [("tv:resnet18", (3, 32, 32)), ("timm:deit_tiny_patch16_224", (3, 32, 32))])
def test_external_models_prune_half_fast(name, shape):
    _half(name, shape)


@pytest.mark.slow
@pytest.mark.parametrize("name,shape", [("tv:resnet50", (3, 64, 64)), ("tv:mobilenet_v2", (3, 64, 64)),
                                        ("timm:vit_tiny_patch16_224", (3, 64, 64)), ("resnet56", (3, 32, 32)),
                                        ("wrn16_2", (3, 32, 32)), ("vgg11", (3, 32, 32)), ("cnn1d", (1, 40))])
def test_more_models_prune_half(name, shape):
    _half(name, shape)


def _small(data, n_train=256, n_test=128):
    """The digits splits cut down so the procedure test stays fast on a shared CPU."""
    from dataclasses import replace

    from torch.utils.data import TensorDataset

    def sub(ds, n):
        return TensorDataset(*(t[:n] for t in ds.tensors))

    return replace(data, train=sub(data.train, n_train), val=sub(data.val, 64), test=sub(data.test, n_test))


def test_prune_procedure_checkpoints_and_resumes(tmp_path, digits_data):
    digits_data = _small(digits_data)
    m = build_model("resnet20", (1, 8, 8), 10)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cfg = TrainConfig(lr=0.01, batch_size=256, augment=False)
    res = prune(m, digits_data, "agf", target_macs=3.0, steps=2, calib_batches=2, calib_batch_size=32,
                checkpoint_dir=tmp_path / "ck", final_finetune_epochs=1, finetune_config=cfg)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert len(res.history) == 2 and abs(res.reduction / 3.0 - 1) <= 0.03
    assert {"acc_cut", "acc_bn", "acc_ft", "macs", "params"} <= set(res.history[-1])
    assert res.history[0]["reduction"] == pytest.approx(3.0 ** 0.5, rel=0.05)
    state = json.loads((tmp_path / "ck" / "state.json").read_text())
    assert state["step"] == 2
    again = prune(m, digits_data, "agf", target_macs=3.0, steps=2, calib_batches=2, calib_batch_size=32,
                  checkpoint_dir=tmp_path / "ck", final_finetune_epochs=1, finetune_config=cfg)  # resumes: nothing left to do
    x = torch.randn(2, 1, 8, 8)
    loaded = io.load(tmp_path / "ck" / "step_2")
    torch.testing.assert_close(again.model.eval()(x), loaded(x))
    assert res.to_dict()["widths"] == again.widths


def test_prune_resumes_after_a_crash_with_the_same_result(tmp_path, digits_data):
    digits_data = _small(digits_data)
    m = build_model("resnet20", (1, 8, 8), 10)
    kw = dict(ratio=0.6, steps=2, budget="global", calib_batches=2, calib_batch_size=32)
    whole = prune(m, digits_data, "taylor", **kw)

    def crash(rec, model):
        if rec["step"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prune(m, digits_data, "taylor", checkpoint_dir=tmp_path / "ck", on_step=crash, **kw)
    assert json.loads((tmp_path / "ck" / "state.json").read_text())["step"] == 1
    resumed = prune(m, digits_data, "taylor", checkpoint_dir=tmp_path / "ck", **kw)
    assert [h["step"] for h in resumed.history] == [1, 2] and resumed.widths == whole.widths
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(resumed.model.eval()(x), whole.model.eval()(x))
    assert sum(whole.widths.values()) == pytest.approx(0.4 * sum(u.size for u in find_units(m, x[:1])), abs=3)
    with pytest.raises(FlowpruneError, match="other arguments"):
        prune(m, digits_data, "l1", checkpoint_dir=tmp_path / "ck", **kw)


def test_prune_validates_before_work(digits_data):
    m = build_model("resnet20", (1, 8, 8), 10)
    cases = [({"method": "magic", "ratio": 0.5}, "allowed: agf"), ({"ratio": 1.5}, r"ratio must lie in \[0"),
             ({"target_macs": 1000.0}, "cannot be reached"), ({}, "target_macs"),
             ({"ratio": 0.5, "steps": 0}, "steps"), ({"ratio": 0.5, "schedule": "cubic"}, "schedule")]
    for kw, msg in cases:
        with pytest.raises(FlowpruneError, match=msg):
            prune(m, digits_data, **kw)
    bad = [(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 12]))]
    with pytest.raises(FlowpruneError, match="labels"):
        prune(m, bad, "agf", ratio=0.5)


def test_prune_with_plain_batches_and_heads_only(digits_data):
    m = build_model("vit", (1, 8, 8), 10)
    batches = digits_data.calibration_batches(16, 2)
    res = prune(m, batches, "agf", ratio=0.5, kinds=("head",), budget="layer")
    assert set(res.widths) == {f"blocks.{i}.attn" for i in range(4)} and set(res.widths.values()) == {2}
    assert res.model.blocks[0].attn.num_heads == 2 and m.blocks[0].attn.num_heads == 4
    assert res.model(batches[0][0]).shape == (16, 10)
    assert res.to_dict()["unsupported_layers"] == []


class _Cat(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(1, 6, 3, padding=1)
        self.dw = torch.nn.Conv2d(10, 10, 3, padding=1, groups=10)
        self.c = torch.nn.Conv2d(10, 5, 1)
        self.fc = torch.nn.Linear(5, 3)

    def forward(self, x):
        y = torch.cat([self.a(x).relu(), self.b(x).relu()], 1)
        return self.fc(self.c(self.dw(y).relu()).mean((2, 3)))


def test_concat_and_depthwise_channels_cut_together():
    m = _Cat().eval()
    x = torch.randn(2, 1, 6, 6)
    units = find_units(m, x[:1]).by_name()
    assert set(units) == {"dw", "c"}  # a, b and the depthwise conv share the concatenated channels
    assert {p.module_name for p in units["dw"].producers} == {"a", "b", "dw"}
    new = apply_cuts(m, {"dw": [0, 3, 9]}, example_inputs=x[:1]).eval()
    assert new.a.out_channels == 2 and new.b.out_channels == 5
    assert new.dw.in_channels == new.dw.out_channels == new.dw.groups == 7 and new.c.in_channels == 7
    keep = [1, 2, 4, 5, 6, 7, 8]  # concat positions kept: a's 1, 2 and b's 0..4 (offset 4)
    torch.testing.assert_close(new.dw.weight, m.dw.weight[keep])
    torch.testing.assert_close(new.c.weight, m.c.weight[:, keep])
    assert new(x).shape == (2, 3)
