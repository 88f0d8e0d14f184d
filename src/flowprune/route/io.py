"""Save and load a routed model without pickle.

Layout of a saved cascade directory::

    DIR/router.json              format, kind, router name + config, threshold, calibration record
    DIR/light/                   the light expert (flowprune.io.save)        [two experts]
    DIR/heavy/                   the heavy expert (flowprune.io.save)        [two experts]
    DIR/backbone/                the single network (flowprune.io.save)     [early exit]
    DIR/head.safetensors         the exit head's weights                     [early exit]
    DIR/router.safetensors       the router's tensors (``state_dict()``)    [routers with state: learned]

Non-finite thresholds are written as the strings ``"inf"`` / ``"-inf"``. ``router.json`` holds an
``integrity`` record (SHA-256 of the record and of the extra weight files); loading validates the
record before building anything (see docs/robustness.md).

The router is stored as its registry name, its ``config()`` (JSON) and its tensors; loading
rebuilds it from the registry (``Router.from_state``), so a custom router must be registered
(its module imported) before :func:`load_cascade`. No code is ever read from the directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from flowprune.errors import FlowpruneError

FORMAT = "flowprune-cascade"
ROUTER_FILE = "router.json"
KINDS = ("two_experts", "early_exit")


def _digest(rec: dict) -> str:
    core = {k: v for k, v in rec.items() if k not in ("metadata", "integrity")}
    return hashlib.sha256(json.dumps(core, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_cascade(cascade, path: str | os.PathLike, *, metadata: dict | None = None) -> Path:
    """Write ``cascade`` (two experts or early exit) to directory ``path``; returns it.

    ``router.json`` is written last (atomically) and records the SHA-256 of the router record
    and of the extra weight files, so :func:`load_cascade` detects edited or corrupt files.
    """
    from safetensors.torch import save_file

    from flowprune.io import save
    from flowprune.route.calibrate import threshold_to_json

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    r = cascade.router
    rec = {"format": FORMAT, "format_version": 1, "kind": cascade.kind, "router": r.name,
           "router_config": r.config(), "threshold": threshold_to_json(cascade.threshold),
           "metadata": metadata or {}}
    files: dict[str, str] = {}

    def write_tensors(tensors: dict, name: str) -> None:
        tmp = out / (name + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, out / name)
        files[name] = hashlib.sha256((out / name).read_bytes()).hexdigest()

    if cascade.kind == "early_exit":
        save(cascade.backbone, out / "backbone")
        h = cascade.head
        write_tensors(h.state_dict(), "head.safetensors")
        rec["stage"] = cascade.stage
        rec["head"] = {"channels": h.in_features, "num_classes": h.out_features, "ndim": h.ndim}
    else:
        save(cascade.light, out / "light")
        save(cascade.heavy, out / "heavy")
    state = r.state_dict()
    if state:
        write_tensors(state, "router.safetensors")
    rec["integrity"] = {"record_sha256": _digest(rec), "files_sha256": files}
    try:
        text = json.dumps(rec, indent=1)
    except (TypeError, ValueError) as e:
        raise FlowpruneError(f"cascade metadata must be JSON-serialisable: {e}") from None
    tmp = out / (ROUTER_FILE + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out / ROUTER_FILE)
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _ok_option(v) -> bool:
    """A router_config value: a name, a boolean, None, a small integer or a finite float."""
    if isinstance(v, (str, bool)) or v is None or (_is_int(v) and 0 <= v <= 10**6):
        return True
    return isinstance(v, float) and math.isfinite(v)


def _validate(rec: dict, f: Path) -> None:
    from flowprune.route.routers import list_routers

    if rec.get("format") != FORMAT:
        raise FlowpruneError(f"{f} is not a flowprune cascade (format={rec.get('format')!r})")
    if rec.get("format_version") != 1 or not _is_int(rec.get("format_version")):
        raise FlowpruneError(f"{f}: unknown format_version {rec.get('format_version')!r}; this flowprune reads 1")
    if rec.get("kind") not in KINDS:
        raise FlowpruneError(f"{f}: unknown cascade kind {rec.get('kind')!r}; allowed: {', '.join(KINDS)}")
    if rec.get("router") not in list_routers():
        raise FlowpruneError(f"{f}: unknown router {rec.get('router')!r}; allowed: {', '.join(list_routers())} "
                             "(a router of your own must be registered, its module imported, before loading)")
    cfg = rec.get("router_config", {})
    if not isinstance(cfg, dict) or not all(isinstance(k, str) for k in cfg):
        raise FlowpruneError(f"{f}: router_config must be an object, got {cfg!r}")
    for k, v in cfg.items():
        if not _ok_option(v):
            raise FlowpruneError(f"{f}: router_config[{k!r}] must be a small integer, a finite number, a boolean "
                                 f"or a name, got {v!r}")
    t = rec.get("threshold")
    if not ((isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)) or t in ("inf", "-inf")):
        raise FlowpruneError(f"{f}: threshold must be a finite number, 'inf' or '-inf', got {t!r}")
    if rec["kind"] == "early_exit":
        h = rec.get("head")
        if (not isinstance(h, dict) or not all(_is_int(h.get(k)) and 1 <= h.get(k) <= 10**6
                                               for k in ("channels", "num_classes", "ndim"))):
            raise FlowpruneError(f"{f}: head must hold positive integers channels, num_classes, ndim; got {h!r}")
        if not isinstance(rec.get("stage"), str):
            raise FlowpruneError(f"{f}: stage must be a module name, got {rec.get('stage')!r}")
    if not isinstance(rec.get("metadata", {}), dict):
        raise FlowpruneError(f"{f}: metadata must be an object")


def _read_checked(d: Path, name: str, integ: dict | None) -> dict:
    from safetensors.torch import load as st_load

    p = d / name
    if not p.is_file():
        raise FlowpruneError(f"{str(d)!r} is not a complete cascade: {name} is missing")
    data = p.read_bytes()
    if integ is not None:
        want = integ.get("files_sha256", {}).get(name) if isinstance(integ.get("files_sha256"), dict) else None
        if want != hashlib.sha256(data).hexdigest():
            raise FlowpruneError(f"{p} is corrupt, truncated or from another save (SHA-256 does not match "
                                 f"{ROUTER_FILE})")
    try:
        return st_load(data)
    except Exception as e:
        raise FlowpruneError(f"{p} is not a valid safetensors file: {type(e).__name__}: {e}") from None


def load_cascade(path: str | os.PathLike):
    """Load a cascade saved by :func:`save_cascade` (eval mode); nothing is unpickled.

    ``router.json`` is validated (format, kind, router name and options, threshold, head) and
    checked against its recorded SHA-256; each expert is loaded by :func:`flowprune.io.load`
    with its own checks. Every problem is a FlowpruneError naming the file.
    """
    from flowprune.io import load, read_json_file
    from flowprune.route.calibrate import threshold_from_json
    from flowprune.route.cascade import Cascade, EarlyExitCascade, ExitHead
    from flowprune.route.routers import get_router, router_class

    d = Path(path)
    f = d / ROUTER_FILE
    if not f.is_file():
        raise FlowpruneError(f"{str(d)!r} is not a saved cascade: {ROUTER_FILE} is missing "
                             "(write one with `flowprune route --out DIR` or save_cascade)")
    rec = read_json_file(f, "flowprune cascade record")
    _validate(rec, f)
    integ = rec.get("integrity")
    if integ is not None:
        if not isinstance(integ, dict) or integ.get("record_sha256") != _digest(rec):
            raise FlowpruneError(f"{f} was changed after saving (its SHA-256 does not match integrity.record_sha256); "
                                 "save the cascade again")
    try:
        get_router(rec["router"], **rec.get("router_config", {}))  # names a bad option before the tensors are read
        listed = isinstance(integ, dict) and "router.safetensors" in (integ.get("files_sha256") or {})
        has_state = listed or (d / "router.safetensors").is_file()
        tensors = _read_checked(d, "router.safetensors", integ) if has_state else None
        router = router_class(rec["router"]).from_state(rec.get("router_config", {}), tensors)
        thr = threshold_from_json(rec["threshold"])
        if rec["kind"] == "early_exit":
            backbone = load(d / "backbone")
            h = rec["head"]
            head = ExitHead(h["channels"], h["num_classes"], h["ndim"])
            head.load_state_dict(_read_checked(d, "head.safetensors", integ))
            c = EarlyExitCascade(backbone, rec["stage"], head, router, thr)
        else:
            c = Cascade(load(d / "light"), load(d / "heavy"), router, thr)
    except FlowpruneError as e:
        raise FlowpruneError(f"{d}: {e}") from None
    except Exception as e:  # a record that passed the checks but does not fit its weights
        raise FlowpruneError(f"{d}: the cascade does not fit its files: {type(e).__name__}: {str(e)[:300]}") from None
    c.flowprune_metadata = rec.get("metadata", {})
    return c.eval()
