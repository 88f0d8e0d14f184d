"""Recovery recipes (flowprune.recover): KD loss, the epoch budget, the warm-up schedule, bad input,
a KD prune end to end with resume, and Torch-Pruning's Hessian accumulation."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from flowprune.errors import FlowpruneError
from flowprune.models import build_model
from flowprune.pruning.structural import PruneConfig, prune
from flowprune.recover import RECOVERIES, kd_loss, make_recipe, recover, split_epochs
from flowprune.train import TrainConfig, lr_factor


def _small(data, n_train=256, n_test=128):
    def sub(ds, n):
        return TensorDataset(*(t[:n] for t in ds.tensors))

    return replace(data, train=sub(data.train, n_train), val=sub(data.val, 64), test=sub(data.test, n_test))


def test_kd_loss_matches_a_hand_computed_value():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    # T = 2: p_t = softmax([0, .5]), p_s = softmax([.5, 0]); KL = sum p_t log(p_t / p_s), times T^2
    a = 1 / (1 + math.exp(0.5))  # p_t[0] = p_s[1]
    b = 1 - a
    kl = a * math.log(a / b) + b * math.log(b / a)
    assert kd_loss(s, t, 2.0).item() == pytest.approx(4 * kl, rel=1e-5)
    assert kd_loss(t, t, 3.0).item() == pytest.approx(0.0, abs=1e-7)
    # batchmean: two rows, one identical, one as above -> half the value
    assert kd_loss(torch.cat([s, t]), torch.cat([t, t]), 2.0).item() == pytest.approx(2 * kl, rel=1e-5)


@pytest.mark.parametrize("total,steps,expected", [(5, 1, [5]), (5, 2, [2, 3]), (5, 3, [1, 1, 3]), (4, 4, [1, 1, 1, 1]),
                                                  (30, 4, [7, 7, 7, 9]), (0, 3, [0, 0, 0])])
def test_epoch_budget_is_shared_by_the_steps(total, steps, expected):
    got = split_epochs(total, steps)
    assert got == expected and sum(got) == total


def test_warmup_then_cosine_by_hand():
    # 10 steps, 2 warm-up: 0.5, 1.0, then cosine over the 8 remaining steps
    f = [lr_factor(s, 10, 2) for s in range(10)]
    assert f[:2] == [0.5, 1.0]
    assert f[2] == pytest.approx(1.0) and f[6] == pytest.approx(0.5) and f[9] == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert [lr_factor(s, 10, 0) for s in (0, 5)] == [1.0, pytest.approx(0.5)]  # no warm-up: the old cosine


def test_recovery_bad_input_is_one_clear_error_before_work(digits_data):
    m = build_model("resnet20", (1, 8, 8), 10)
    base = {"target_macs": 2.0}
    cases = [({"recovery": "magic"}, r"unknown recovery 'magic'; allowed: finetune, kd"),
             ({"recovery_options": {"tau": 2}}, r"unknown recovery option 'tau'; allowed: "),
             ({"recovery": "finetune", "recovery_options": {"alpha": 0.5}}, "applies to recovery='kd' only"),
             ({"recovery_options": {"alpha": 1.5}}, r"alpha must lie in \[0"),
             ({"recovery_epochs": 2, "steps": 3}, r"recovery_epochs=2 cannot be shared by steps=3"),
             ({"recovery_epochs": 2, "final_finetune_epochs": 1}, "not both")]
    for kw, msg in cases:
        with pytest.raises(FlowpruneError, match=msg):
            PruneConfig.resolve(None, {**base, **kw})
        with pytest.raises(FlowpruneError, match=msg):
            prune(m, digits_data, **base, **kw)
    teacher = build_model("resnet20", (1, 8, 8), 7)
    calls = []
    with pytest.raises(FlowpruneError, match="teacher gives 7 output classes but the student 10"):
        prune(m, digits_data, target_macs=2.0, recovery_epochs=1, teacher=teacher, on_step=lambda *a: calls.append(1))
    assert calls == []  # refused before any step
    with pytest.raises(FlowpruneError, match="teacher gives 7 output classes"):
        recover(m, digits_data, 1, make_recipe("kd"), teacher=teacher)
    with pytest.raises(FlowpruneError, match="needs a teacher"):
        recover(m, digits_data, 1, make_recipe("kd"))
    assert set(RECOVERIES) == {"finetune", "kd"}


def test_recover_counts_teacher_passes_and_trains(digits_data):
    data = _small(digits_data)
    student = build_model("resnet20", (1, 8, 8), 10)
    teacher = build_model("resnet20", (1, 8, 8), 10).eval()
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    s_before = [p.detach().clone() for p in student.parameters()]
    cfg = TrainConfig(batch_size=64, augment=False)
    rec = recover(student, data, 2, make_recipe("kd"), teacher=teacher, train_config=cfg)
    assert rec["teacher_forwards"] == 2 * 256  # 4 batches of 64 per epoch, 2 epochs
    assert rec["teacher_params"] == sum(p.numel() for p in teacher.parameters())
    assert all(torch.equal(v, t_before[k]) for k, v in teacher.state_dict().items())  # never changed
    assert any(not torch.equal(a, b) for a, b in zip(s_before, student.parameters()))
    plain = recover(build_model("resnet20", (1, 8, 8), 10), data, 1, make_recipe("finetune"), train_config=cfg)
    assert plain["teacher_forwards"] == 0 and plain["recovery"] == {"name": "finetune", "lr": 0.01}


def test_prune_with_kd_in_a_shared_budget_cuts_trains_and_resumes(tmp_path, trained_resnet20_digits, digits_data):
    data = _small(digits_data, n_train=256)
    m = trained_resnet20_digits
    kw = dict(target_macs=3.0, steps=2, recovery_epochs=3, calib_batches=2, calib_batch_size=32,
              finetune_config=TrainConfig(lr=0.01, batch_size=128, augment=False))
    res = prune(m, data, checkpoint_dir=tmp_path / "ck", **kw)
    assert abs(res.reduction / 3.0 - 1) <= 0.03
    assert [h["recovery_epochs"] for h in res.history] == [1, 2]
    assert [h["teacher_forwards"] for h in res.history] == [256, 512]  # 2 batches of 128 per epoch
    assert res.config["recovery"]["name"] == "kd" and res.config["recovery_epochs"] == 3
    # without recovery the first cut is the same (the second step scores the recovered model)
    cut = prune(m, data, target_macs=3.0, steps=2, calib_batches=2, calib_batch_size=32)
    assert cut.history[0]["widths"] == res.history[0]["widths"]
    state = json.loads((tmp_path / "ck" / "state.json").read_text())
    assert state["step"] == 2
    again = prune(m, data, checkpoint_dir=tmp_path / "ck", **kw)  # resumes: nothing left to do
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(again.model.eval()(x), res.model.eval()(x))
    with pytest.raises(FlowpruneError, match="other arguments"):
        prune(m, data, checkpoint_dir=tmp_path / "ck", **{**kw, "recovery": "finetune"})


def test_tp_hessian_accumulates_mean_squared_per_sample_gradients():
    from flowprune.procedures.torch_pruning import accumulate_hessian

    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 1])
    accumulate_hessian(lin, [(x, y)])
    # zero weights: p = (.5, .5); dCE/dlogits = p - onehot = (-.5, .5) / (.5, -.5); grad = outer(that, x)
    g1 = torch.tensor([[-0.5, 0.0], [0.5, 0.0]])
    g2 = torch.tensor([[0.0, 1.0], [0.0, -1.0]])
    torch.testing.assert_close(lin.weight.grad, (g1 ** 2 + g2 ** 2) / 2)


def test_compare_takes_a_recovery_and_picks_best_tp_on_validation_after_recovery():
    from flowprune.compare import CompareConfig, summarise

    with pytest.raises(FlowpruneError, match="unknown recovery 'x'; allowed: finetune, kd"):
        CompareConfig.resolve(None, {"recovery": "x"})
    assert CompareConfig.resolve(None, {"recovery": "kd", "finetune_lr": 0.02}).recipe().lr == 0.02
    runs = []
    # tp-a is better on test after recovery, tp-b on validation: the reference after recovery is tp-b
    for seed in range(2):
        for method, test, val in (("agf", 0.90, 0.90), ("tp-a", 0.95, 0.80), ("tp-b", 0.85, 0.85)):
            runs.append({"method": method, "target": 4.0, "seed": seed, "acc_raw": 0.1, "acc_bn": test,
                         "acc_ft": test, "val_ft": val, "achieved": 4.0, "macs": 1, "params": 1, "prune_seconds": 0})
    rows = {r["method"]: r for r in summarise(runs, ["agf", "tp-a", "tp-b"], [4.0])}
    assert rows["agf"]["ref_acc_ft"] == "tp-b" and rows["agf"]["d_acc_ft"] == pytest.approx(0.05)
    assert rows["agf"]["ref_acc_bn"] == "tp-a"  # one-shot: the strongest one-shot configuration
