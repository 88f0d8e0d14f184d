"""The transformers coverage sweep on a handful of families (the full sweep: benchmarks/bench_transformers.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from flowprune.errors import FlowpruneError  # noqa: E402
from flowprune.hf.coverage import FAMILIES, run_transformers_sweep  # noqa: E402


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "vit", "bart"])
def test_family_prunes_runs_and_round_trips(family):
    (rec,) = run_transformers_sweep([family], torch_pruning=False)
    assert rec["status"] == "pass", rec.get("error")
    assert rec["heads"] >= 2 and rec["mlps"] >= 2 and rec["round_trip_max_diff"] == 0.0
    assert rec["params_cut"] < rec["params"]
    if FAMILIES[family][3] in ("lm", "seq2seq"):
        assert rec["generated"] == 12 + 3 if FAMILIES[family][3] == "lm" else rec["generated"] >= 3


def test_t5_heads_are_left_intact_with_the_reason_and_its_mlps_cut():
    (rec,) = run_transformers_sweep(["t5"], torch_pruning=False)
    assert rec["status"] == "partial" and rec["heads"] == 0 and rec["mlps"] == 4
    assert all("relative-position bias" in why for why in rec["left_intact"].values())


def test_unknown_family_is_refused_before_work():
    with pytest.raises(FlowpruneError, match="no_such_family"):
        run_transformers_sweep(["no_such_family"])
