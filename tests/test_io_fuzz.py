"""Fuzzing the loaders: a mutated model or cascade directory loads with the same outputs, or raises FlowpruneError.

Mutations of saved recipes (JSON values, keys, types, raw bytes) and of weight files (truncation,
flipped bytes, edited safetensors headers). Every load must either succeed with exactly the
original outputs or raise :class:`FlowpruneError`, never anything else; it must not open a
socket, read a file outside the model directory, or write anything.
"""

from __future__ import annotations

import builtins
import contextlib
import io as _io
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowprune import io
from flowprune.errors import FlowpruneError
from flowprune.models import build_model

SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_ROOT = Path(tempfile.mkdtemp(prefix="flowprune_fuzz_"))
X = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _make_original():
    torch.manual_seed(0)
    m = build_model("lenet300", (1, 8, 8), 10, hidden=[8, 6])
    d = io.save(m, _ROOT / "orig", metadata={"note": "fuzz"})
    m.eval()
    with torch.no_grad():
        return d, m(X)


ORIG, REF = _make_original()
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.sampled_from([0, 1, -1, 2**31, 10**9])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["", "x", "/etc/passwd", "https://example.com/w.bin", "resnet20", "Identity", "timm:resnet18",
                       "tv:resnet18", "../../model.safetensors", "inf", "nan"])
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["pretrained", "weights", "file", "hidden", "__tuple__", "forward", "out_features", "x"])
        | st.text(max_size=6), children, max_size=3),
    max_leaves=6)
KEYS = st.sampled_from(["pretrained", "pretrained_cfg_overlay", "weights", "checkpoint_path", "forward", "__class__",
                        "out_features", "in_features", "hidden", "num_classes", "scale", "groups", "name", "kwargs",
                        "integrity", "format_version", "x"])


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


@contextlib.contextmanager
def _guard(allowed_dir: Path):
    """Record socket use, file opens outside ``allowed_dir`` and any writes."""
    events: list[str] = []
    real_open, real_io_open = builtins.open, _io.open
    real_connect, real_create = socket.socket.connect, socket.create_connection
    allowed = str(allowed_dir.resolve())

    def check_open(file, mode="r", *a, **k):
        if isinstance(file, (str, bytes, os.PathLike)):
            p = os.path.realpath(os.fsdecode(file))
            if not p.startswith(allowed) and not p.endswith(".py"):
                events.append(f"open {p}")
            if any(c in mode for c in "wax+"):
                events.append(f"write {p}")
        return real_open(file, mode, *a, **k)

    def no_connect(*a, **k):
        events.append("socket")
        raise OSError("network disabled in the fuzz test")

    builtins.open = check_open
    _io.open = check_open
    socket.socket.connect = no_connect
    socket.create_connection = no_connect
    try:
        yield events
    finally:
        builtins.open, _io.open = real_open, real_io_open
        socket.socket.connect, socket.create_connection = real_connect, real_create


def _snapshot(d: Path):
    return {p.name: p.read_bytes() for p in d.iterdir()}


def _check_load(d: Path, *, strict_outputs: bool = True):
    before = _snapshot(d)
    with _guard(d) as events:
        try:
            m = io.load(d)
        except FlowpruneError:
            m = None
    assert not events, events
    assert _snapshot(d) == before, "load wrote into the model directory"
    if m is not None and strict_outputs:
        with torch.no_grad():
            out = m(X)
        assert torch.equal(out, REF), "a mutated model loaded with different outputs"
    return m


def _fresh(name: str) -> Path:
    d = _ROOT / name
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(ORIG, d)
    return d


def _mutate_json(rec, data):
    paths = list(_paths(rec))
    path = data.draw(st.sampled_from(paths), label="path")
    kind = data.draw(st.sampled_from(["replace", "delete", "add_key", "stringify", "wrap"]), label="kind")
    if kind == "replace" or not path:
        if not path:
            return data.draw(JSON_VALUES, label="whole")
        parent = _get(rec, path[:-1])
        parent[path[-1]] = data.draw(JSON_VALUES, label="value")
    elif kind == "delete":
        parent = _get(rec, path[:-1])
        del parent[path[-1]]
    elif kind == "add_key":
        target = _get(rec, path)
        if isinstance(target, dict):
            target[data.draw(KEYS, label="key")] = data.draw(JSON_VALUES, label="value")
    else:
        parent = _get(rec, path[:-1])
        v = parent[path[-1]]
        parent[path[-1]] = str(v) if kind == "stringify" else [v]
    return rec


@pytest.mark.parametrize("keep_integrity", [True, False], ids=["integrity", "legacy"])
def test_fuzz_recipe_json(keep_integrity):
    @SETTINGS
    @given(st.data())
    def run(data):
        d = _fresh("recipe")
        rec = json.loads((d / "model.json").read_text())
        if not keep_integrity:
            rec.pop("integrity")
        rec = _mutate_json(rec, data)
        (d / "model.json").write_text(json.dumps(rec))
        # legacy recipes (no integrity record) are validated but cannot notice a consistent edit
        # of an attribute value, so only "FlowpruneError or a model" is required of them
        _check_load(d, strict_outputs=keep_integrity)

    run()


def test_fuzz_recipe_bytes():
    @SETTINGS
    @given(st.data())
    def run(data):
        d = _fresh("recipe_bytes")
        raw = bytearray((d / "model.json").read_bytes())
        kind = data.draw(st.sampled_from(["truncate", "flip", "insert"]))
        i = data.draw(st.integers(0, len(raw) - 1))
        if kind == "truncate":
            raw = raw[:i]
        elif kind == "flip":
            raw[i] ^= data.draw(st.integers(1, 255))
        else:
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=4))
        (d / "model.json").write_bytes(bytes(raw))
        _check_load(d)

    run()


def _header(raw: bytes) -> tuple[int, dict]:
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8:8 + n])


@pytest.mark.parametrize("keep_integrity", [True, False], ids=["integrity", "legacy"])
def test_fuzz_weights(keep_integrity):
    @SETTINGS
    @given(st.data())
    def run(data):
        d = _fresh("weights")
        if not keep_integrity:
            rec = json.loads((d / "model.json").read_text())
            rec.pop("integrity")
            (d / "model.json").write_text(json.dumps(rec))
        raw = bytearray((d / "model.safetensors").read_bytes())
        n, header = _header(bytes(raw))
        kind = data.draw(st.sampled_from(["truncate", "flip", "header_value", "header_len", "header_bytes"]))
        data_changed = False
        if kind == "truncate":
            raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
        elif kind == "flip":
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= data.draw(st.integers(1, 255))
            data_changed = i >= 8 + n
        elif kind == "header_len":
            raw[:8] = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
        elif kind == "header_bytes":
            i = data.draw(st.integers(8, 8 + n - 1))
            raw[i] = data.draw(st.integers(0, 255))
        else:
            _mutate_json(header, data)
            text = json.dumps(header).encode()
            text += b" " * ((8 - len(text) % 8) % 8)
            raw = bytearray(len(text).to_bytes(8, "little") + text + raw[8 + n:])
            data_changed = True  # a consistent edit of offsets/dtypes can reinterpret the data
        (d / "model.safetensors").write_bytes(bytes(raw))
        _check_load(d, strict_outputs=keep_integrity or not data_changed)

    run()


def test_interrupted_save_leaves_previous_model_loadable(monkeypatch):
    d = _fresh("interrupted")
    torch.manual_seed(1)
    other = build_model("lenet300", (1, 8, 8), 10, hidden=[8, 6])
    real_replace = os.replace
    calls = []

    def dying_replace(src, dst):
        calls.append(dst)
        if str(dst).endswith("model.json"):  # killed after the weights moved in, before the recipe
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        io.save(other, d)
    monkeypatch.setattr(os, "replace", real_replace)
    assert any(str(c).endswith("model.safetensors") for c in calls)
    m = io.load(d)  # the old recipe finds the old weights in model.safetensors.prev
    with torch.no_grad():
        assert torch.equal(m(X), REF)

    # a save that dies while writing the weights file leaves the old pair untouched
    from safetensors import torch as st_torch

    def dying_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(st_torch, "save_file", dying_save_file)
    d2 = _fresh("interrupted2")
    with pytest.raises(OSError):
        io.save(other, d2)
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(io.load(d2)(X), REF)
    # and a later complete save replaces everything and removes the backup
    io.save(other, d)
    assert not (d / "model.safetensors.prev").exists()
    other.eval()
    with torch.no_grad():
        assert torch.equal(io.load(d)(X), other(X))


# ------------------------------------------------------------------------------ cascades


def _make_cascade():
    from flowprune.route.cascade import Cascade
    from flowprune.route.io import save_cascade
    from flowprune.route.routers import make_router

    torch.manual_seed(2)
    light = build_model("lenet300", (1, 8, 8), 10, hidden=[4])
    heavy = build_model("lenet300", (1, 8, 8), 10, hidden=[8, 6])
    r = make_router("learned", num_classes=10, feature_dim=4, hidden=3)
    torch.nn.init.normal_(r.net[0].weight)
    c = Cascade(light, heavy, r, 0.5).eval()
    d = save_cascade(c, _ROOT / "cascade_orig")
    with torch.no_grad():
        return d, c(X)


def test_fuzz_cascade_record():
    from flowprune.route.io import load_cascade

    orig, ref = _make_cascade()

    @settings(max_examples=80, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def run(data):
        d = _ROOT / "cascade"
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(orig, d)
        target = data.draw(st.sampled_from(["record", "router_weights"]))
        if target == "record":
            rec = json.loads((d / "router.json").read_text())
            (d / "router.json").write_text(json.dumps(_mutate_json(rec, data)))
        else:
            raw = bytearray((d / "router.safetensors").read_bytes())
            i = data.draw(st.integers(0, len(raw) - 1))
            raw = raw[:i] if data.draw(st.booleans()) else raw[:i] + bytes([raw[i] ^ 0x5A]) + raw[i + 1:]
            (d / "router.safetensors").write_bytes(bytes(raw))
        with _guard(d) as events:
            try:
                c = load_cascade(d)
            except FlowpruneError:
                c = None
        assert not events, events
        if c is not None:
            with torch.no_grad():
                assert torch.equal(c(X), ref)

    run()


# ------------------------------------------------------------------------------ constructor options


def _with_kwargs(tmp: Path, name: str, shape, kwargs: dict) -> Path:
    m = build_model(name, shape, 10)
    d = io.save(m, tmp / "k")
    rec = json.loads((d / "model.json").read_text())
    rec.pop("integrity")
    rec["base"]["kwargs"] = kwargs
    (d / "model.json").write_text(json.dumps(rec))
    return d


@pytest.mark.parametrize("name, shape, kwargs, match", [
    ("wrn16_2", (3, 8, 8), {"depth": 15}, "cannot be built with base.kwargs"),
    ("vit", (3, 8, 8), {"num_heads": 3}, "cannot be built with base.kwargs"),
    ("resnet20", (3, 8, 8), {"width": 0}, r"base.kwargs\['width'\] .* must be an integer in \[1, 100000\]"),
    ("resnet20", (3, 8, 8), {"width": 1.5}, "must be an integer"),
    ("resnet20", (3, 8, 8), {"depth": 20}, "not an allowed option"),
    ("lenet300", (1, 8, 8), {"hidden": [8, "x"]}, "list of 1..64 integers"),
    ("lenet300", (1, 8, 8), {"hidden": [10**5] * 3}, "parameters; at most"),
    ("tv:mobilenet_v3_small", (3, 32, 32), {"weights": "DEFAULT"}, "not an allowed option"),
    ("tv:mobilenet_v3_small", (3, 32, 32), {"progress": True}, "not an allowed option"),
    ("timm:resnet10t", (3, 32, 32), {"pretrained": True}, "not an allowed option"),
    ("timm:resnet10t", (3, 32, 32), {"pretrained_cfg_overlay": {"file": "/etc/passwd"}}, "not an allowed option"),
    ("timm:resnet10t", (3, 32, 32), {"checkpoint_path": "/tmp/evil.pth"}, "not an allowed option"),
    ("timm:resnet10t", (3, 32, 32), {"drop_rate": "https://example.com"}, "must be"),
])
def test_constructor_options_are_checked(tmp_path, name, shape, kwargs, match):
    d = _with_kwargs(tmp_path, name, shape, kwargs)
    with _guard(d) as events, pytest.raises(FlowpruneError, match=match):
        io.load(d)
    assert not events


def test_tv_and_timm_models_round_trip_with_allowed_options(tmp_path):
    for name, kw in (("tv:mobilenet_v3_small", {}), ("timm:resnet10t", {"drop_rate": 0.1})):
        m = build_model(name, (3, 32, 32), 10, **kw).eval()
        d = io.save(m, tmp_path / name.replace(":", "_"))
        x = torch.randn(2, 3, 32, 32)
        with _guard(d) as events:
            back = io.load(d)
        assert not events
        with torch.no_grad():
            assert torch.equal(m(x), back(x))
