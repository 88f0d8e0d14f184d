"""Budgets: per-layer top-k, global ranking, MACs targets, validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowprune.errors import FlowpruneError
from flowprune.models import build_model
from flowprune.plan import MacsModel, parse_target, plan_cuts
from flowprune.scores import get_score
from flowprune.units import find_units

X = torch.randn(1, 1, 8, 8)


@pytest.fixture(scope="module")
def cnn():
    m = build_model("resnet20", (1, 8, 8), 10)
    units = find_units(m, X)
    scores = get_score("l1")(m, units)
    return m, units, scores, MacsModel(m, units, X)


def test_zero_ratio_cuts_nothing(cnn):
    m, units, scores, mm = cnn
    plan = plan_cuts(m, units, scores, example_inputs=X, ratio=0.0, macs_model=mm)
    assert all(len(v) == 0 for v in plan.values())


@settings(max_examples=15, deadline=None)
@given(ratio=st.floats(0.0, 0.95), budget=st.sampled_from(["layer", "global"]), min_width=st.integers(1, 6),
       round_to=st.sampled_from([1, 2, 4]))
def test_widths_respect_min_width_round_to_and_lowest_scores(cnn, ratio, budget, min_width, round_to):
    m, units, scores, mm = cnn
    plan = plan_cuts(m, units, scores, example_inputs=X, ratio=ratio, budget=budget, min_width=min_width,
                     round_to=round_to, macs_model=mm)
    for u in units:
        k = plan.widths[u.name]
        assert min(min_width, u.size) <= k <= u.size
        assert k % round_to == 0 or k == u.size
        removed = plan[u.name]
        assert len(removed) == u.size - k and len(set(removed.tolist())) == len(removed)
        if len(removed) and k:
            kept = torch.ones(u.size, dtype=torch.bool)
            kept[removed] = False
            assert scores[u.name][removed].max() <= scores[u.name][kept].min()


def test_layer_ratio_is_uniform(cnn):
    m, units, scores, mm = cnn
    plan = plan_cuts(m, units, scores, example_inputs=X, ratio=0.5, macs_model=mm)
    assert all(plan.widths[u.name] == u.size // 2 for u in units)
    plan = plan_cuts(m, units, scores, example_inputs=X, width=4, macs_model=mm)
    assert set(plan.widths.values()) == {4}


@pytest.mark.parametrize("budget", ["layer", "global"])
@pytest.mark.parametrize("target", [2.0, "4x", 8.0])
def test_macs_target_within_three_percent(cnn, budget, target):
    m, units, scores, mm = cnn
    plan = plan_cuts(m, units, scores, example_inputs=X, target_macs=target, budget=budget, macs_model=mm)
    assert plan.within_tolerance, plan.note
    assert abs(plan.reduction / parse_target(target) - 1) <= 0.03


def test_bad_budgets_raise_before_work(cnn):
    m, units, scores, mm = cnn
    for kw, msg in [({"target_macs": 1000.0}, "cannot be reached"), ({"ratio": 1.0}, r"ratio must lie in \[0"),
                    ({"ratio": -0.1}, "ratio"), ({"target_macs": 0.5}, "> 1"), ({"ratio": 0.5, "budget": "tree"},
                                                                                  "allowed: global, layer"),
                    ({}, "exactly one"), ({"ratio": 0.5, "min_width": 0}, "min_width"),
                    ({"width": {"nope": 3}}, "unknown unit")]:
        with pytest.raises(FlowpruneError, match=msg):
            plan_cuts(m, units, scores, example_inputs=X, macs_model=mm, **kw)
    with pytest.raises(FlowpruneError, match="no score"):
        plan_cuts(m, units, {}, example_inputs=X, ratio=0.5, macs_model=mm)


@pytest.mark.parametrize("normalize", ["unit", "block", "none"])
def test_global_normalisation_options(cnn, normalize):
    m, units, scores, mm = cnn
    plan = plan_cuts(m, units, scores, example_inputs=X, ratio=0.5, budget="global", normalize=normalize,
                     macs_model=mm)
    total = sum(u.size for u in units)
    assert sum(plan.widths.values()) == pytest.approx(total / 2, abs=1)
    if normalize == "none":  # raw scores: one threshold over every unit (but each unit keeps its best one)
        kept = torch.cat([scores[u.name][[i for i in range(u.size) if i not in set(plan[u.name].tolist())
                                          and i != int(scores[u.name].argmax())]] for u in units])
        removed = torch.cat([scores[u.name][plan[u.name]] for u in units])
        assert removed.max() <= kept.min()
