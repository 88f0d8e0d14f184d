"""Every registered router, the timm way: the tests are parametrised over ``list_routers()``, so a
router added with ``@register_router`` (one file) is fitted, calibrated, routed, saved, loaded and
exported here without a new test. Plus the router registry, ``--router-option``, ``RouteConfig``
and the early-exit cascade on models that are not flowprune's (torchvision ResNet-18, timm ViT)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from flowprune.errors import FlowpruneError
from flowprune.models import build_model
from flowprune.route import (
    Cascade,
    EarlyExitCascade,
    RouteConfig,
    build_early_exit,
    calibrate,
    collect_outputs,
    get_router,
    list_routers,
    load_cascade,
    route_experts,
    save_cascade,
)
from flowprune.route.cascade import ExitHead, check_exit, default_exit_stage, pipeline, split_at
from flowprune.route.cost import mac_costs
from flowprune.route.routers import FIT_ON, Router, parse_option_value, parse_router_options, router_class
from flowprune.train import TrainConfig, fit

_PAIR: dict = {}


@pytest.fixture
def pair(digits_data):
    """(light, heavy) LeNets on 8x8 digits: a 16-unit light expert (1 epoch) and a 300-100 heavy one."""
    if not _PAIR:
        torch.manual_seed(0)
        heavy = build_model("lenet300", digits_data.input_shape, 10)
        fit(heavy, digits_data, TrainConfig(epochs=3, lr=0.05, augment=False), progress=False)
        torch.manual_seed(1)
        light = build_model("lenet300", digits_data.input_shape, 10, hidden=(16,))
        fit(light, digits_data, TrainConfig(epochs=1, lr=0.05, augment=False), progress=False)
        _PAIR.update(light=light.eval(), heavy=heavy.eval())
    return copy.deepcopy(_PAIR["light"]), copy.deepcopy(_PAIR["heavy"])


def _fitted(name: str, light, heavy, data) -> Cascade:
    """A cascade with router ``name``, fitted the way route_experts does, calibrated for 40% heavy usage."""
    c = Cascade(light, heavy, get_router(name), math.inf)
    val = collect_outputs(c, data.val)
    if c.router.fit_on == "held_out":
        half = torch.arange(len(val)) % 2 == 0
        c.router.fit(val.subset(half))
        val = val.subset(~half)
    calibrate(c, val, heavy_budget=0.4, tolerance=0.1)
    return c


# ------------------------------------------------------------------------------- every router


@pytest.mark.parametrize("name", list_routers())
def test_router_contract(name):
    cls = router_class(name)
    assert issubclass(cls, Router) and cls.name == name and cls.fit_on in FIT_ON
    r = get_router(name)
    assert r.name == name and r.needs_fit == (cls.fit_on is not None)
    json.dumps(r.config())  # what router.json stores must be JSON
    with pytest.raises(FlowpruneError, match=r"unknown option\(s\) \['no_such_option'\].*accepted"):
        get_router(name, no_such_option=1)


@pytest.mark.parametrize("name", list_routers())
def test_every_router_fits_routes_and_round_trips(name, pair, digits_data, tmp_path):
    light, heavy = pair
    c = _fitted(name, light, heavy, digits_data)
    assert c.router.is_ready()
    x = digits_data.test.tensors[0]
    a = c.route(x)
    assert a.score.shape == (len(x),) and bool(torch.isfinite(a.score).all())
    assert 0.2 < a.heavy_usage < 0.6
    c.router.reset()
    save_cascade(c, tmp_path / "c")
    back = load_cascade(tmp_path / "c")
    assert type(back.router) is type(c.router) and back.router.config() == c.router.config()
    assert back.threshold == c.threshold
    b = back.route(x)
    assert torch.equal(a.expert, b.expert)
    torch.testing.assert_close(a.logits, b.logits)
    assert not any(p.suffix in (".pt", ".pkl") for p in (tmp_path / "c").rglob("*"))


@pytest.mark.parametrize("name", list_routers())
def test_every_router_through_route_experts(name, pair, digits_data, tmp_path):
    light, heavy = pair
    res = route_experts(light, heavy, digits_data, router=name, heavy_budget=0.4, tolerance=0.1, measure=False,
                        sweep=False, diagnostic=False, out_dir=tmp_path / "run")
    r = res.to_dict()
    assert r["router"] == name and 0.2 < r["heavy_usage"] < 0.6
    json.dumps(r)
    if router_class(name).fit_on == "held_out":
        assert r[f"{name}_router"]["fit_samples"] + r[f"{name}_router"]["calibration_samples"] == len(digits_data.val)
    back = load_cascade(tmp_path / "run" / "cascade")
    x = digits_data.test.tensors[0]
    res.cascade.router.reset()
    assert torch.equal(back.route(x).expert, res.cascade.route(x).expert)


@pytest.mark.parametrize("name", list_routers())
def test_every_router_exports_or_refuses(name, pair, digits_data, tmp_path):
    import flowprune as fp

    light, heavy = pair
    c = _fitted(name, light, heavy, digits_data)
    if not router_class(name).exportable:
        with pytest.raises(FlowpruneError, match="cannot be exported"):
            fp.export(c, tmp_path / "onnx")
        return
    fp.export(c, tmp_path / "onnx", exporter="torchscript")
    x = digits_data.test.tensors[0][:128]
    got = fp.export.OnnxCascade(tmp_path / "onnx").route(x.numpy())
    with torch.no_grad():
        ref = c.route(x)
    np.testing.assert_allclose(got.score, ref.score.numpy(), atol=1e-5, rtol=1e-5)
    borderline = np.abs(ref.score.numpy() - c.threshold) < 1e-5
    assert np.array_equal(got.expert[~borderline], ref.expert.numpy()[~borderline])


# ------------------------------------------------------------------------------- registry, options


def test_register_router_takes_a_router_class_only():
    from flowprune.route import register_router

    with pytest.raises(FlowpruneError, match="Router subclass"):
        register_router("not_a_router")(object)
    assert "not_a_router" not in list_routers()


def test_option_values_are_parsed_without_eval():
    assert parse_option_value("3") == 3 and parse_option_value("-2") == -2
    assert parse_option_value("0.5") == 0.5 and parse_option_value("1e-3") == 1e-3
    assert parse_option_value("true") is True and parse_option_value("False") is False
    assert parse_option_value("none") is None and parse_option_value("low_is_hard") == "low_is_hard"
    assert parse_option_value("__import__('os')") == "__import__('os')"  # a string, never run
    assert parse_router_options(["seed=4", "direction=low_is_hard"]) == {"seed": 4, "direction": "low_is_hard"}
    with pytest.raises(FlowpruneError, match="key=value"):
        parse_router_options(["seed"])
    with pytest.raises(FlowpruneError, match="twice"):
        parse_router_options(["seed=1", "seed=2"])
    with pytest.raises(FlowpruneError, match=r"unknown option 'hiden' for router 'learned'; accepted: .*hidden"):
        parse_router_options(["hiden=8"], "learned")


def test_make_router_alias_warns():
    from flowprune.route import make_router

    with pytest.warns(DeprecationWarning, match="get_router"):
        r = make_router("random", seed=3)
    assert r.seed == 3


def test_cli_router_options(pair, digits_data, tmp_path, capsys):
    from flowprune.cli import main
    from flowprune.io import save

    light, heavy = pair
    save(light, tmp_path / "light")
    save(heavy, tmp_path / "heavy")
    base = ["route", "--light", str(tmp_path / "light"), "--heavy", str(tmp_path / "heavy"), "--data", "digits",
            "--heavy-budget", "0.4", "--tolerance", "0.1", "--no-speed", "--no-sweep", "--no-diagnostic"]
    rc = main(base + ["--router", "l1", "--router-option", "direction=low_is_hard", "--out", str(tmp_path / "l1")])
    assert rc == 0
    r = json.loads((tmp_path / "l1" / "results.json").read_text())
    assert r["router"] == "l1" and r["calibration"]["extra"]["l1"]["direction"] == "low_is_hard"
    assert load_cascade(tmp_path / "l1" / "cascade").router.direction == "low_is_hard"
    rc = main(base + ["--router", "learned", "--router-option", "hidden=8", "--router-option", "epochs=20",
                      "--out", str(tmp_path / "learned")])
    assert rc == 0 and load_cascade(tmp_path / "learned" / "cascade").router.hidden == 8
    capsys.readouterr()
    rc = main(base + ["--router", "random", "--router-option", "sed=1", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert rc == 2 and "'sed'" in err and "accepted: seed" in err
    assert not (tmp_path / "bad" / "results.json").exists()
    rc = main(base + ["--router", "l1", "--router-option", "direction=sideways", "--out", str(tmp_path / "bad2")])
    assert rc == 2 and "sideways" in capsys.readouterr().err


# ------------------------------------------------------------------------------- RouteConfig


def test_route_config_equals_keywords(pair, digits_data):
    light, heavy = pair
    kw = {"router": "entropy", "heavy_budget": 0.4, "tolerance": 0.1, "measure": False, "sweep": False,
          "diagnostic": False}
    a = route_experts(light, heavy, digits_data, **kw).to_dict()
    b = route_experts(light, heavy, digits_data, RouteConfig(**kw)).to_dict()
    c = route_experts(light, heavy, digits_data, {**kw, "heavy_budget": 0.9}, heavy_budget=0.4).to_dict()
    assert a == b == c
    with pytest.raises(FlowpruneError, match="unknown option 'budget' for RouteConfig"):
        route_experts(light, heavy, digits_data, budget=0.4)
    with pytest.raises(FlowpruneError, match="unknown router"):
        RouteConfig(router="nope").validate()
    with pytest.raises(FlowpruneError, match="exactly one"):
        RouteConfig.resolve(None, {"heavy_budget": 0.5, "max_drop": 0.1})
    assert json.loads(json.dumps(RouteConfig().to_dict()))["router"] == "confidence"


def test_route_experts_takes_a_router_instance(pair, digits_data):
    light, heavy = pair
    r = get_router("l1", direction="high_is_hard")
    res = route_experts(light, heavy, digits_data, router=r, heavy_budget=0.4, tolerance=0.1, measure=False,
                        sweep=False, diagnostic=False)
    assert res.model.router is not r and res.results["router"] == "l1"  # the cascade holds a copy
    assert res.results["calibration"]["extra"]["l1"]["direction"] == "high_is_hard"
    with pytest.raises(FlowpruneError, match="router_kwargs"):
        route_experts(light, heavy, digits_data, router=r, router_kwargs={"direction": "auto"})


# ------------------------------------------------------------------------------- early exit, any model


def _images(n_train=64, n_val=100, n_test=48, shape=(3, 32, 32)):
    from flowprune.data import DataSplits

    g = torch.Generator().manual_seed(0)

    def split(n):
        return TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g))

    return DataSplits("random-images", split(n_train), split(n_val), split(n_test), 10, shape, 0)


def _check_dispatch(ee: EarlyExitCascade, model, x):
    with torch.no_grad():
        full = model.eval()(x)
        exit_logits = ee.head(ee.prefix(x))
        s = ee.router(exit_logits, ee.head.features(ee.prefix(x)))
    ee.threshold = float(s.median())
    o = ee.route(x)
    esc = o.expert.bool()
    assert 0 < int(esc.sum()) < len(x)
    torch.testing.assert_close(o.logits[~esc], exit_logits[~esc])
    torch.testing.assert_close(o.logits[esc], full[esc], rtol=1e-4, atol=1e-4)


def test_early_exit_on_torchvision_resnet18():
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    data = _images()
    assert default_exit_stage(model) == "layer1"
    ee = build_early_exit(model, data, epochs=1)
    assert ee.stage == "layer1" and ee.continues_from_exit and ee.input_shape == (3, 32, 32)
    x = data.test.tensors[0]
    _check_dispatch(ee, model, x)
    costs = mac_costs(ee)
    assert 0 < costs["c_l"] < 0.5 and 0 < costs["c_rest"] < 1
    ee2 = build_early_exit(model, data, stage="layer3", epochs=1)
    assert ee2.head.in_features == 256
    _check_dispatch(ee2, model, x)
    cal = calibrate(ee2, collect_outputs(ee2, data.val), heavy_budget=0.5, tolerance=0.1)
    assert abs(cal.calib_heavy_usage - 0.5) <= 0.02


def test_early_exit_bad_module_names():
    from torchvision.models import resnet18

    model = resnet18(num_classes=10)
    with pytest.raises(FlowpruneError, match="unknown exit module 'layer9'.*layer1, layer2"):
        check_exit(model, "layer9")
    with pytest.raises(FlowpruneError, match="classifier"):
        check_exit(model, "fc")
    with pytest.raises(FlowpruneError, match="unknown exit module"):
        EarlyExitCascade(model, "", ExitHead(64, 10, 4), get_router("confidence"), 0.0, input_shape=(3, 32, 32))


@pytest.mark.parametrize("name, shape", [("resnet20", (3, 16, 16)), ("wrn16_2", (3, 16, 16)), ("vgg8", (3, 32, 32)),
                                         ("lenet300", (1, 8, 8)), ("cnn1d", (1, 40))])
def test_zoo_default_exits_and_continuation_unchanged(name, shape):
    """The hook-based exit picks the exit the zoo-class rule picked, and continues exactly as the old split did."""
    torch.manual_seed(0)
    model = build_model(name, shape, 10).eval()
    names = [n for n, _ in pipeline(model)]
    relus = [n for n, m in pipeline(model) if n.startswith("body.") and isinstance(m, torch.nn.ReLU)]
    old = "layer1" if "layer1" in names else relus[max(0, (len(relus) - 1) // 2)]
    assert default_exit_stage(model) == old
    ee = EarlyExitCascade(model, old, ExitHead(1, 10, 2), get_router("confidence"), 0.0)
    prefix, suffix = split_at(model, old)
    x = torch.randn(5, *shape)
    with torch.no_grad():
        h = prefix(x)
        assert torch.equal(ee.prefix(x), h)
        assert ee.continues_from_exit and torch.equal(ee.heavy_part(h), suffix(h))
    n_prefix = sum(p.numel() for p in prefix.parameters())
    assert sum(p.numel() for m in ee.prefix_modules() for p in m.parameters(recurse=False)) == n_prefix


def test_early_exit_reruns_a_model_fx_cannot_cut(digits_data):
    """A timm ViT: fx cannot cut its forward after a block, so escalated samples rerun the whole model."""
    torch.manual_seed(0)
    model = build_model("vit", digits_data.input_shape, 10).eval()
    assert default_exit_stage(model) == "blocks.1"
    ee = build_early_exit(model, digits_data, epochs=1)
    x = digits_data.test.tensors[0][:64]
    _check_dispatch(ee, model, x)
    assert not ee.continues_from_exit  # the rerun path: escalated samples run the whole ViT
