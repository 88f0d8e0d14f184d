"""Issue 23's quiet, polite CLI: warnings once and short (full list kept), thread defaults that do
not oversubscribe a busy machine, ``save`` that infers ``base`` for torchvision / timm models."""

from __future__ import annotations

import argparse
import json
import logging

import pytest
import torch
from torch import nn

import flowprune as fp
from flowprune import notices, threads

LOG = logging.getLogger("flowprune.test_notices")


# ------------------------------------------------------------------------------ warnings


def test_a_warning_is_logged_once_per_run_short_and_kept_in_full(caplog):
    names = [f"layer{i}" for i in range(7)]
    reasons = {n: f"reason {n} " + "x" * 200 for n in names}
    with caplog.at_level(logging.WARNING, logger=LOG.name), notices.collect() as warned:
        for _ in range(5):  # e.g. the unit analysis runs once per prune step
            notices.warn(LOG, "flowprune cannot cut these layers", names, reasons)
        notices.warn(LOG, "flowprune cannot cut these layers", names[:1])  # other names: a new warning
        inner = notices.recorded()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["flowprune cannot cut these layers: 7 (layer0; layer1; layer2; ... 4 more, full list in "
                     "results.json)", "flowprune cannot cut these layers: 1 (layer0)"]
    assert warned == inner and len(warned) == 2
    assert warned[0] == {"message": "flowprune cannot cut these layers", "count": 7, "items": names, "reasons": reasons}
    assert notices.recorded() == []  # outside the run


def test_a_short_reason_follows_its_name_when_every_name_is_shown():
    assert notices.short_text("left intact", ["a", "b"], {"a": "why a", "b": "x" * 101}) == \
        "left intact: 2 (a: why a; b)"
    assert notices.short_text("left intact", []) == "left intact"


def test_nested_collectors_share_the_run(caplog):
    with caplog.at_level(logging.WARNING, logger=LOG.name), notices.collect() as outer:
        with notices.collect() as inner:
            notices.warn(LOG, "left intact", ["a"])
        notices.warn(LOG, "left intact", ["a"])
    assert inner is outer and len(outer) == 1 and len(caplog.records) == 1


class _WithSpares(nn.Module):
    """An MLP with layers its forward never uses: flowprune cannot follow them, so it warns."""

    def __init__(self):
        super().__init__()
        self.spare1, self.spare2, self.spare3 = nn.Linear(32, 32), nn.Linear(16, 16), nn.Linear(8, 8)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                                  nn.Linear(16, 10))  # last: the classifier

    def forward(self, x):
        return self.body(x)


def test_prune_warns_once_and_records_the_full_list(digits_data, caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="flowprune"):
        res = fp.prune(_WithSpares(), digits_data, "l1", ratio=0.5, steps=3, calib_batches=1, calib_batch_size=16,
                       finetune_epochs=0, final_finetune_epochs=0, measure=False)
    cannot = [r.getMessage() for r in caplog.records if "cannot cut" in r.getMessage()]
    (w,) = [w for w in res.warnings if "cannot cut" in w["message"]]
    # 3 steps, each re-analysing the model: one line, short (names, not the reasons)
    assert cannot == [notices.short_text(w["message"], w["items"], w["reasons"])]
    assert w["items"] == ["spare1", "spare2", "spare3"] and w["count"] == 3
    assert all("not reached when tracing" in w["reasons"][n] for n in w["items"])
    assert "not reached" not in cannot[0]
    assert res.to_dict()["warnings"] == res.warnings and res.unsupported == w["items"]
    assert sorted(res.widths) == ["body.1", "body.3"] and sum(res.widths.values()) == 24  # half of 32 + 16, globally


def test_the_cli_adds_the_runs_warnings_to_results_json(tmp_path):
    from flowprune.cli import _record_warnings

    (tmp_path / "results.json").write_text(json.dumps({"accuracy": 0.5, "warnings": [{"message": "old"}]}))
    warned = [{"message": "old"}, {"message": "new", "count": 1, "items": ["a"]}]
    _record_warnings(argparse.Namespace(out=str(tmp_path)), warned)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res == {"accuracy": 0.5, "warnings": warned}


# ------------------------------------------------------------------------------ threads


@pytest.mark.parametrize("load, cpus, want", [(0.0, 2, 2), (0.49, 2, 2), (0.6, 2, 1), (1.0, 2, 1), (7.9, 2, 1),
                                              (3.0, 16, 13), (0.0, 1, 1)])
def test_idle_cores_by_hand(load, cpus, want):
    assert threads.idle_cores(load=load, cpus=cpus) == want


def test_thread_choice_order(monkeypatch):
    monkeypatch.setattr(threads, "idle_cores", lambda: 1)
    assert threads.choose(3, {"FLOWPRUNE_THREADS": "2"}) == (3, "--threads")
    assert threads.choose(None, {"FLOWPRUNE_THREADS": "2", "OMP_NUM_THREADS": "4"}) == (2, "FLOWPRUNE_THREADS")
    assert threads.choose(None, {"OMP_NUM_THREADS": "4"})[0] is None  # torch already follows it
    assert threads.choose(None, {})[0] == 1


def test_the_default_lowers_threads_on_a_busy_machine_and_never_raises_them(monkeypatch):
    import os

    n = torch.get_num_threads()
    monkeypatch.delenv("FLOWPRUNE_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 1.0, 1.0))  # one other busy process
        assert threads.configure() == 1
        monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))  # idle: torch's count, not more
        assert threads.configure() == 1
        torch.set_num_threads(2)
        assert threads.configure() == 2
        assert threads.configure(1) == 1
    finally:
        torch.set_num_threads(n)


# ------------------------------------------------------------------------------ save infers base


@pytest.mark.parametrize("name", ["mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3"])
def test_torchvision_mnasnet_round_trips_without_base(name, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = torchvision.models.get_model(name, weights=None, num_classes=5).eval()
    fp.save(m, tmp_path / "m")
    back = fp.load(tmp_path / "m")
    assert back.flowprune_base == {"name": f"tv:{name}", "input_shape": [3, 224, 224], "num_classes": 5,
                                   "kwargs": {}}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(m(x), back(x))


def test_a_loaded_mnasnet_still_loads_after_flowprune_builds_it(tmp_path):
    pytest.importorskip("torchvision")
    m = fp.build_model("tv:mnasnet0_5", (3, 32, 32), 4)
    fp.save(m, tmp_path / "m")
    assert isinstance(fp.load(tmp_path / "m"), nn.Module)


def test_timm_model_with_its_own_image_size_round_trips_without_base(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32).eval()
    fp.save(m, tmp_path / "m")
    back = fp.load(tmp_path / "m")
    assert back.flowprune_base == {"name": "timm:vit_tiny_patch16_224", "input_shape": [3, 32, 32],
                                   "num_classes": 3, "kwargs": {"img_size": 32}}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), back(x))
