"""IDAP++ issue 11: the two-split budget, the paired bound, test tracking, score reuse, config, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import flowprune.scores as scores_mod
from flowprune.data import load_dataset
from flowprune.errors import FlowpruneError
from flowprune.models import build_model
from flowprune.pruning.idap import (
    Budget,
    BudgetMeter,
    IdapConfig,
    IdapResult,
    idap,
    paired_drop_se,
    split_validation,
)

SMALL = dict(max_steps=1, recover_epochs=1, recover_batches=1, calib_batches=2, stage2_recover_batches=0)


def test_split_validation_gives_disjoint_stratified_halves():
    y = torch.arange(10).repeat_interleave(21)  # 21 per class
    x = torch.arange(len(y)).float().view(-1, 1)
    a, b = split_validation(TensorDataset(x, y), seed=3)
    ia, ib = set(a.tensors[0].view(-1).tolist()), set(b.tensors[0].view(-1).tolist())
    assert not ia & ib and len(ia | ib) == len(y)
    for c in range(10):  # every class split 11/10 or 10/11
        assert abs(int((a.tensors[1] == c).sum()) - int((b.tensors[1] == c).sum())) <= 1
    a2, _ = split_validation(TensorDataset(x, y), seed=3)
    assert torch.equal(a.tensors[0], a2.tensors[0])  # deterministic from the seed
    a3, _ = split_validation(TensorDataset(x, y), seed=4)
    assert not torch.equal(a.tensors[0], a3.tensors[0])


def test_paired_standard_error_and_confidence_bound():
    ref = torch.tensor([True] * 100)
    same = ref.clone()
    assert paired_drop_se(ref, same) == 0.0
    worse = ref.clone()
    worse[:2] = False  # 2 of 100 flipped to wrong: drop 0.02
    d = torch.zeros(100)
    d[:2] = 1
    assert paired_drop_se(ref, worse) == pytest.approx(float(d.std() / 10))

    class Fixed(nn.Module):  # predicts class 0 except on the first k samples
        def __init__(self, k):
            super().__init__()
            self.k = k
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            out = torch.zeros(len(x), 2)
            out[:, 0] = 1.0
            out[x.view(-1) < self.k, 1] = 2.0
            return out

    x = torch.arange(100).float().view(-1, 1)
    batches = [(x, torch.zeros(100, dtype=torch.long))]
    plain = BudgetMeter(Fixed(0), batches, Budget(max_drop=0.01, confidence_z=0), (1,))
    strict = BudgetMeter(Fixed(0), batches, Budget(max_drop=0.01, confidence_z=2.0), (1,))
    q, qs = plain.quality(Fixed(1)), strict.quality(Fixed(1))  # one sample wrong: drop 0.01
    assert q["drop"] == pytest.approx(0.01) and q["within"]
    assert qs["drop_bound"] > qs["drop"] and not qs["within"]  # the bound rejects what the point estimate accepts
    with pytest.raises(FlowpruneError, match="confidence_z"):
        Budget(confidence_z=-1).validate()


def test_config_resolve_overrides_and_unknown_options():
    cfg = IdapConfig.resolve({"max_drop": 0.02}, {"stages": [2, 1], "kinds": "channel"})
    assert cfg.stages == (2, 1) and cfg.kinds == ("channel",) and cfg.max_drop == 0.02
    assert json.loads(json.dumps(cfg.to_dict()))["val_split"] == "split"
    with pytest.raises(FlowpruneError, match="unknown option 'max_dorp'"):
        IdapConfig.resolve(None, {"max_dorp": 0.01})
    with pytest.raises(FlowpruneError, match="val_split"):
        IdapConfig(val_split="halves").validate()
    with pytest.raises(FlowpruneError, match="track_test"):
        IdapConfig(track_test="yes").validate()
    with pytest.raises(FlowpruneError, match="unknown option"):
        idap(nn.Linear(2, 2), None, recover_batchez=3)


def test_two_splits_decide_on_one_half_and_report_test(trained_resnet20_digits, digits_data, tmp_path, monkeypatch):
    calls = []
    real = scores_mod.get_score

    def counting(name, **kw):
        fn = real(name, **kw)

        def wrapped(*a, **k):
            calls.append(name)
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(scores_mod, "get_score", counting)
    cfg = IdapConfig(stages=(1,), max_drop=None, max_output_error=0.0, p0=0.3, max_retries=2, **SMALL)
    res = idap(trained_resnet20_digits, digits_data, cfg, progress=True)
    assert isinstance(res, IdapResult) and res.model is not None
    assert len(res.steps) == 3 and len(calls) == 1  # both retries reuse the scores of the rolled-back model
    assert all("test_accuracy" in s and "test_drop" in s for s in res.steps)
    # a budget no step can meet: the dense model comes back intact and the reason says so
    assert res.stop_reason.startswith("no step met the budget") and "unchanged" in res.stop_reason
    assert res.final["macs"] == res.dense["macs"] and res.final["test_accuracy"] == res.dense["test_accuracy"]
    assert res.seconds > 0 and json.loads(json.dumps(res.to_dict()))["config"]["max_retries"] == 2
    n_accept = len(split_validation(digits_data.val, 0)[1])
    meter_n = res.to_dict()["dense"]  # accuracies are on the accept half: multiples of 1/n_accept
    assert abs(meter_n["accuracy"] * n_accept - round(meter_n["accuracy"] * n_accept)) < 1e-6


def test_shared_split_and_small_validation_message(trained_resnet20_digits, digits_data):
    with pytest.raises(FlowpruneError, match="val_split='shared'"):
        idap(trained_resnet20_digits, digits_data, max_drop=0.01)  # 179 images: two halves of ~90 are too few
    res = idap(trained_resnet20_digits, digits_data, stages=(1,), max_drop=0.01, val_split="shared",
               track_test=False, **SMALL)
    assert all("test_accuracy" not in s for s in res.steps) and res.final["test_accuracy"] is None


def test_stage2_on_a_model_without_blocks_is_a_message_when_stage1_runs(digits_data):
    torch.manual_seed(0)
    m = build_model("lenet300", digits_data.input_shape, 10)
    res = idap(m, digits_data, stages=(1, 2), max_drop=0.05, **SMALL)
    assert res.stage_reasons["2"].startswith("skipped") and "no removable block" in res.stage_reasons["2"]
    assert "1" in res.stage_reasons and res.removed_blocks == []
    with pytest.raises(FlowpruneError, match="no removable block.*stages=\\(1,\\)"):
        idap(m, digits_data, stages=(2,), max_drop=0.05)


def test_resume_keeps_the_wall_time(trained_resnet20_digits, digits_data, tmp_path):
    kw = dict(stages=(1,), max_drop=0.05, **SMALL)
    res = idap(trained_resnet20_digits, digits_data, checkpoint_dir=tmp_path / "ck", **kw)
    again = idap(trained_resnet20_digits, digits_data, checkpoint_dir=tmp_path / "ck", **kw)
    assert again.seconds >= res.seconds * 0.99 and len(again.steps) == len(res.steps)
    with pytest.raises(FlowpruneError, match="other settings"):
        idap(trained_resnet20_digits, digits_data, checkpoint_dir=tmp_path / "ck", **{**kw, "confidence_z": 2.0})


def test_mnist5k_split_sizes():
    data = load_dataset("mnist5k", seed=0)
    a, b = split_validation(data.val, 0)
    assert len(a) == len(b) == 250


def test_budget_and_config_share_one_confidence_default():
    import dataclasses

    from flowprune.pruning.idap import CONFIDENCE_Z

    assert Budget().confidence_z == IdapConfig().confidence_z == CONFIDENCE_Z == 1.0
    # every Budget field has IdapConfig's default, so Budget() is what IdapConfig().budget() builds
    assert dataclasses.asdict(Budget()) == dataclasses.asdict(IdapConfig().budget())


def test_rejected_stage2_steps_record_the_kept_models_test_accuracy(trained_resnet20_digits, digits_data):
    # an output error of 0 can never be met: every block removal is rejected, the dense model is kept
    res = idap(trained_resnet20_digits, digits_data, stages=(2,), max_drop=None, max_output_error=0.0,
               **SMALL)
    rejected = [s for s in res.steps if s.get("stage") == 2 and not s["accepted"]]
    assert rejected and len(rejected) == len([s for s in res.steps if s.get("stage") == 2])
    for s in rejected:
        # the kept model is the dense one: its test accuracy, like its validation accuracy
        assert s["test_accuracy"] == res.dense["test_accuracy"] and s["test_drop"] == 0.0
        assert s["accuracy"] == res.dense["accuracy"]
        assert 0.0 <= s["rejected_test_accuracy"] <= 1.0 and "rejected_test_drop" in s
