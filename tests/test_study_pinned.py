"""The structural study pins every option of every configuration (issue 20).

A configuration that leaves an option to the library's default changes meaning when the default
changes (the study's ``agfc-global`` became ``agfc-as-global`` when agf's ``abs_mode`` default did,
and every configuration without ``-mc`` gained mean compensation), so the command in the results
table's header stopped reproducing it. Here every configuration must name every option.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds benchmarks/
from benchmarks import study_structural as study  # noqa: E402

from flowprune.procedures.torch_pruning import tp_prune_to_target  # noqa: E402
from flowprune.pruning.structural import PruneConfig  # noqa: E402
from flowprune.scores import get_score  # noqa: E402

PRUNE_OPTIONS = {f.name for f in dataclasses.fields(PruneConfig)} - set(study.RUN_FIELDS)
TP_OPTIONS = set(inspect.signature(tp_prune_to_target).parameters) - set(study.TP_RUN_FIELDS) | {"method", "steps"}


def test_run_fields_are_real_fields():
    assert set(study.RUN_FIELDS) <= {f.name for f in dataclasses.fields(PruneConfig)}
    assert set(study.TP_RUN_FIELDS) - {"method"} <= set(inspect.signature(tp_prune_to_target).parameters)


@pytest.mark.parametrize("name", sorted(study.CONFIGS))
def test_every_config_names_every_option(name):
    kind, kw = study.CONFIGS[name]
    if kind == "fp":
        assert set(kw) == PRUNE_OPTIONS, f"{name}: missing {PRUNE_OPTIONS - set(kw)}, unknown {set(kw) - PRUNE_OPTIONS}"
        score = get_score(kw["method"], **kw["score_options"])  # the options are the score's own
        assert set(kw["score_options"]) == set(type(score).OPTIONS), f"{name}: score options not all pinned"
        PruneConfig.resolve(None, {**kw, "target_macs": 2.0}).validate()  # and valid as they stand
    else:
        assert kind == "tp"
        assert set(kw) == TP_OPTIONS, f"{name}: missing {TP_OPTIONS - set(kw)}, unknown {set(kw) - TP_OPTIONS}"


def test_names_follow_the_convention():
    """The name says the options that differ: -mc = compensation, -as / -sq = abs mode, -sN = steps."""
    for name, (kind, kw) in study.CONFIGS.items():
        if kind != "fp":
            continue
        assert kw["compensate"] == ("-mc" in name), name
        steps = next((int(p[1:]) for p in name.split("-") if p[:1] == "s" and p[1:].isdigit()), None)
        assert kw["steps"] == (steps or ("auto" if name.endswith("-auto") else 1)), name
        if kw["method"] in ("agf", "agf-paper"):
            o = kw["score_options"]
            assert o["center"] == name.startswith("agfc"), name
            want = "after_sum" if "-as-" in name else "squared" if "-sq-" in name else "elementwise"
            assert o["abs_mode"] == want, name
            assert o["feature"] == ("raw" if "-raw-" in name else "post"), name
            assert kw["budget"] == ("layer" if "-layer" in name or name == "agf-paper" else
                                    "macs" if "-macs" in name else "global"), name
            assert kw["normalize"] == ("block" if "-block" in name else "unit"), name


def test_distinct_names_are_distinct_configurations():
    seen: dict[str, str] = {}
    for name, cfg in study.CONFIGS.items():
        key = repr(cfg)
        assert key not in seen or {name, seen[key]} == {"agf-paper", "agf-layer"}, (name, seen.get(key))
        seen[key] = name
