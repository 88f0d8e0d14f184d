"""Save and load a routed model without pickle.

Layout of a saved cascade directory::

    DIR/router.json              format, kind, router name + config, threshold, calibration record
    DIR/light/                   the light expert (flowprune.io.save)        [two experts]
    DIR/heavy/                   the heavy expert (flowprune.io.save)        [two experts]
    DIR/backbone/                the single network (flowprune.io.save)     [early exit]
    DIR/head.safetensors         the exit head's weights                     [early exit]
    DIR/router.safetensors       the learned router's weights                [learned router]

Non-finite thresholds are written as the strings ``"inf"`` / ``"-inf"``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flowprune.errors import FlowpruneError

FORMAT = "flowprune-cascade"
ROUTER_FILE = "router.json"


def save_cascade(cascade, path: str | os.PathLike, *, metadata: dict | None = None) -> Path:
    """Write ``cascade`` (two experts or early exit) to directory ``path``; returns it."""
    from safetensors.torch import save_file

    from flowprune.io import save
    from flowprune.route.calibrate import threshold_to_json

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    r = cascade.router
    rec = {"format": FORMAT, "format_version": 1, "kind": cascade.kind, "router": r.name,
           "router_config": r.config(), "threshold": threshold_to_json(cascade.threshold),
           "metadata": metadata or {}}
    if cascade.kind == "early_exit":
        save(cascade.backbone, out / "backbone")
        h = cascade.head
        save_file({k: v.detach().cpu().contiguous() for k, v in h.state_dict().items()}, str(out / "head.safetensors"))
        rec["stage"] = cascade.stage
        rec["head"] = {"channels": h.in_features, "num_classes": h.out_features, "ndim": h.ndim}
    else:
        save(cascade.light, out / "light")
        save(cascade.heavy, out / "heavy")
    if r.name == "learned":
        save_file({k: v.detach().cpu().contiguous() for k, v in r.state_dict().items()},
                  str(out / "router.safetensors"))
    try:
        text = json.dumps(rec, indent=1)
    except TypeError as e:
        raise FlowpruneError(f"cascade metadata must be JSON-serialisable: {e}") from None
    tmp = out / (ROUTER_FILE + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out / ROUTER_FILE)
    return out


def load_cascade(path: str | os.PathLike):
    """Load a cascade saved by :func:`save_cascade` (eval mode); nothing is unpickled."""
    from safetensors.torch import load_file

    from flowprune.io import load
    from flowprune.route.calibrate import threshold_from_json
    from flowprune.route.cascade import Cascade, EarlyExitCascade, ExitHead
    from flowprune.route.routers import make_router

    d = Path(path)
    f = d / ROUTER_FILE
    if not f.exists():
        raise FlowpruneError(f"{str(d)!r} is not a saved cascade: {ROUTER_FILE} is missing "
                             "(write one with `flowprune route --out DIR` or save_cascade)")
    rec = json.loads(f.read_text())
    if rec.get("format") != FORMAT:
        raise FlowpruneError(f"{f} is not a flowprune cascade (format={rec.get('format')!r})")
    router = make_router(rec["router"], **rec.get("router_config", {}))
    if rec["router"] == "learned":
        router.load_state_dict(load_file(str(d / "router.safetensors")))
        router.fitted = True
    router.eval()
    thr = threshold_from_json(rec["threshold"])
    if rec["kind"] == "early_exit":
        backbone = load(d / "backbone")
        h = rec["head"]
        head = ExitHead(h["channels"], h["num_classes"], h["ndim"])
        head.load_state_dict(load_file(str(d / "head.safetensors")))
        c = EarlyExitCascade(backbone, rec["stage"], head, router, thr)
    else:
        c = Cascade(load(d / "light"), load(d / "heavy"), router, thr)
    c.flowprune_metadata = rec.get("metadata", {})
    return c.eval()
