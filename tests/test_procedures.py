"""Every registered pruning procedure, through the one interface compare uses (parametrised, timm-style)."""

from __future__ import annotations

import copy

import pytest
import torch

import flowprune as fp
from flowprune.procedures import CutContext, get_procedure, list_procedures


@pytest.fixture(scope="module")
def dense(digits_data):
    torch.manual_seed(0)
    m = fp.build_model("lenet300", digits_data.input_shape, digits_data.num_classes, hidden=(48, 24))
    fp.fit(m, digits_data, fp.TrainConfig(epochs=1, lr=0.05), progress=False)
    return m.eval()


@pytest.mark.parametrize("name", list_procedures())
def test_procedure_cuts_a_copy_to_the_target(name, dense, digits_data):
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    calib = digits_data.calibration_batches(32, 2, seed=0)
    ctx = CutContext(input_shape=digits_data.input_shape, batches=calib, seed=0)
    out = get_procedure(name).cut(dense, 2.0, ctx)
    dense_macs, _ = fp.count_macs_params(dense, digits_data.input_shape)
    macs, _ = fp.count_macs_params(out.model, digits_data.input_shape)
    # near 2x, or the procedure says it could not get there (tp-bn-scale: an MLP has no BatchNorm to rank)
    assert 1.5 < dense_macs / macs < 2.7 or out.info.get("within_tol") is False
    assert out.model is not dense and isinstance(out.info, dict)
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())  # the caller's model is intact
    y = out.model(digits_data.test.tensors[0][:4])
    assert y.shape == (4, digits_data.num_classes) and torch.isfinite(y).all()


def test_unknown_procedure_names_the_choices():
    with pytest.raises(fp.FlowpruneError, match="unknown method 'nope'.*tp-magnitude"):
        get_procedure("nope")


def test_registered_name_wins_and_must_return_a_procedure():
    from flowprune.procedures import base

    @fp.register_procedure("test-not-a-procedure")
    def factory():
        return object()

    try:
        with pytest.raises(fp.FlowpruneError, match="PruningProcedure"):
            get_procedure("test-not-a-procedure")
    finally:
        base._REGISTRY.pop("test-not-a-procedure")
    assert "test-not-a-procedure" not in list_procedures()
    assert copy.copy(list_procedures()) == list_procedures()
