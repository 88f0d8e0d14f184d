"""IDAP++: the divergence score, the schedule, the budget with rollback, stage 2, the CLI, bad input."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from flowprune import io
from flowprune.cli import main
from flowprune.data import load_dataset
from flowprune.errors import FlowpruneError
from flowprune.models import build_model
from flowprune.pruning.idap import Budget, idap, min_val_samples, schedule_fraction
from flowprune.scores import get_score, list_scores
from flowprune.scores.divergence import (
    conv_filter_divergence,
    divergence_scores,
    head_divergence,
    neuron_divergence,
)


def _conv_unit(conv: nn.Conv2d) -> SimpleNamespace:
    return SimpleNamespace(name="0", kind="channel", module=conv, size=conv.out_channels, producers=[])


def test_conv_filter_divergence_matches_hand_calculation():
    conv = nn.Conv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([2.0, -1.0]).view(2, 1, 1, 1))
    x1 = torch.tensor([[1.0, -2.0], [3.0, 0.0]]).view(1, 1, 2, 2)
    x = torch.cat([x1, 2 * x1])  # the second sample is twice the first
    model = nn.Sequential(conv)
    # filter 0: Y = 2x -> ReLU -> (2, 0, 6, 0), norm sqrt(40) (sample 1) and 2 sqrt(40) (sample 2); ||W0|| = 2
    # filter 1: Y = -x -> ReLU -> (0, 2, 0, 0), norm 2 and 4; ||W1|| = 1;  C*H*W = 2*2*2 = 8
    expected = torch.tensor([1.5 * math.sqrt(40) * 2 / 8, 3.0 * 1 / 8])
    scores = divergence_scores(model, [_conv_unit(conv)], [(x, torch.zeros(2))])
    torch.testing.assert_close(scores["0"], expected)
    # the registered score gives the same numbers
    assert "divergence" in list_scores()
    torch.testing.assert_close(get_score("divergence")(model, [_conv_unit(conv)], [(x, torch.zeros(2))])["0"],
                               expected)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 3), st.floats(0.1, 10.0), st.integers(0, 10_000))
def test_conv_divergence_scales_with_the_square_of_a_filter_scale(c, k, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(3, 4, 5, 5, generator=g)
    w = torch.randn(4, 2, 3, 3, generator=g)
    base = conv_filter_divergence(y, w)
    y2, w2 = y.clone(), w.clone()
    y2[:, c] *= k  # scaling filter c by k > 0 scales its output by k
    w2[c] *= k
    got = conv_filter_divergence(y2, w2)
    assert torch.allclose(got[c], base[c] * k * k, rtol=1e-4)
    others = [i for i in range(4) if i != c]
    assert torch.allclose(got[others], base[others])


def test_neuron_and_head_divergence_shapes_and_sum():
    y = torch.randn(2, 5, 6)  # batch, tokens, neurons
    w = torch.randn(6, 3)
    s = neuron_divergence(y, w)
    n0 = torch.relu(y[..., 0]).norm(dim=1).mean() * w[0].norm() / (6 * 5)
    assert s.shape == (6,) and torch.allclose(s[0], n0)
    o = torch.randn(2, 5, 4 * 3)  # 4 heads of dim 3
    h = head_divergence(o, torch.randn(3 * 12, 8), num_heads=4)
    assert h.shape == (4,) and (h > 0).all()


def test_schedule_gives_the_published_fractions():
    assert schedule_fraction(0) == pytest.approx(0.050)
    assert schedule_fraction(9) == pytest.approx(0.131, abs=5e-4)
    assert schedule_fraction(10) == pytest.approx(0.05 * 2 ** 1.5)
    fr = [schedule_fraction(t) for t in range(10)]
    assert fr == sorted(fr)


def test_bad_inputs_raise_before_work(digits_data):
    m = build_model("resnet20", digits_data.input_shape, 10)
    with pytest.raises(FlowpruneError, match="below zero"):
        idap(m, digits_data, max_drop=-0.01)
    with pytest.raises(FlowpruneError, match="stages"):
        idap(m, digits_data, stages=(3,))
    with pytest.raises(FlowpruneError, match="reduction factor"):
        idap(m, digits_data, target_macs=0.5)
    small = load_dataset("digits", seed=0, val_fraction=0.03)
    assert len(small.val) < min_val_samples(Budget(max_drop=0.01))
    with pytest.raises(FlowpruneError, match="validation split"):
        idap(m, small, max_drop=0.01)
    with pytest.raises(FlowpruneError, match="no removable block"):
        idap(build_model("lenet300", digits_data.input_shape, 10), digits_data, stages=(2,), max_drop=0.05)
    assert main(["idap", "--checkpoint", "nowhere", "--out", "/tmp/x", "--stages", "3"]) == 2


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_rollback_restores_exact_previous_weights(trained_resnet20_digits, digits_data):
    model = trained_resnet20_digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # a huge first cut with zero tolerance must violate the budget and roll back
    res = idap(model, digits_data, stages=(1,), max_drop=0.0, p0=0.8, max_steps=1, recover_epochs=1,
               recover_batches=1, calib_batches=2, max_retries=0)
    assert res.steps and res.steps[0]["accepted"] is False and len(res.steps) == 1
    assert "budget violated" in res.stop_reason and "rolled back" in res.stop_reason
    _assert_same_weights(res.model, model)
    assert res.final["macs"] == res.dense["macs"]
    for k, v in model.state_dict().items():  # the caller's model was not changed
        assert torch.equal(v, before[k])



def test_violation_is_retried_with_half_the_fraction_then_rolled_back(trained_resnet20_digits, digits_data):
    model = trained_resnet20_digits
    # an output error of exactly 0 is violated by every cut: each try fails, so both retries happen
    res = idap(model, digits_data, stages=(1,), max_drop=None, max_output_error=0.0, p0=0.4, max_steps=1,
               recover_epochs=1, recover_batches=1, calib_batches=2, max_retries=2)
    assert [s["retry"] for s in res.steps] == [0, 1, 2]
    assert [s["accepted"] for s in res.steps] == [False] * 3
    assert [s["step"] for s in res.steps] == [0, 0, 0]
    fr = [s["fraction"] for s in res.steps]
    assert fr[1] == pytest.approx(fr[0] / 2) and fr[2] == pytest.approx(fr[0] / 4)
    assert res.steps[0]["units_cut"] > res.steps[1]["units_cut"] > res.steps[2]["units_cut"] > 0
    assert "after 2 retries" in res.stop_reason and "rolled back" in res.stop_reason
    _assert_same_weights(res.model, model)  # every try was rolled back exactly
    with pytest.raises(FlowpruneError, match="max_retries"):
        idap(model, digits_data, max_retries=-1)
    with pytest.raises(FlowpruneError, match="retry_factor"):
        idap(model, digits_data, retry_factor=1.0)

def test_stage1_prunes_within_budget_and_stage2_removes_blocks(trained_resnet20_digits, digits_data, tmp_path):
    res = idap(trained_resnet20_digits, digits_data, stages=(1, 2), max_drop=0.03, max_steps=1, recover_epochs=1,
               recover_batches=3, stage2_recover_batches=0, calib_batches=2, checkpoint_dir=tmp_path / "ck")
    acc = [s for s in res.steps if s["stage"] == 1 and s["accepted"]]
    assert acc, res.steps
    assert acc[-1]["macs"] < res.dense["macs"]
    assert res.final["drop"] <= 0.03 + 1e-9
    # stage 2 never touches a shape-changing block; removed blocks are identities
    assert not {"layer2.0", "layer3.0"} & set(res.removed_blocks + res.essential_blocks)
    for b in res.removed_blocks:
        assert isinstance(res.model.get_submodule(b), nn.Identity)
    assert set(res.stage_reasons) == {"1", "2"}
    # resume: the same call finds the finished state and returns the same model without new steps
    again = idap(trained_resnet20_digits, digits_data, stages=(1, 2), max_drop=0.03, max_steps=1, recover_epochs=1,
                 recover_batches=3, stage2_recover_batches=0, calib_batches=2, checkpoint_dir=tmp_path / "ck")
    assert again.removed_blocks == res.removed_blocks and len(again.steps) == len(res.steps)
    _assert_same_weights(again.model, res.model)


def test_cli_stage2_writes_results_and_model(digits_data, tmp_path, capsys):
    torch.manual_seed(0)
    dense = io.save(build_model("vit", digits_data.input_shape, 10), tmp_path / "dense")  # cheap: 4 blocks
    out = tmp_path / "out"
    rc = main(["idap", "--model", "vit", "--checkpoint", str(dense), "--data", "digits", "--max-drop", "0.05",
               "--stages", "2", "--stage2-recover-batches", "0", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["stages"] == [2] and res["stop_reason"]
    assert all("macs" in s and "accuracy" in s for s in res["steps"])
    assert len(res["removed_blocks"]) + len(res["essential_blocks"]) == 4
    back = io.load(out / "model")
    assert sorted(n for n, m in back.named_modules() if isinstance(m, nn.Identity) and n.startswith("blocks.")
                  and n.count(".") == 1) == sorted(res["removed_blocks"])
    assert res["final"]["macs"] <= res["dense"]["macs"]
    # speed next to the MACs reduction: dense and pruned timed together (issue 21); a value or refused
    assert {"speed", "speedup_b1", "speedup_b64", "speed_backend", "macs_reduction"} <= set(res)
    assert res["speed"]["macs_reduction"]["pruned"] == pytest.approx(res["macs_reduction"])
    printed = capsys.readouterr().out
    assert "stopped:" in printed and "timed together, interleaved" in printed
