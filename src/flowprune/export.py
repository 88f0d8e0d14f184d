"""Export a (pruned) model so that it runs outside PyTorch: ONNX files and ``torch.export`` programs.

    import flowprune as fp
    info = fp.export(light, "light.onnx")              # ONNX, dynamic batch size, checked with onnxruntime
    info = fp.export("runs/agf4x", "agf4x.pt2")         # a saved model directory; torch.export program
    info = fp.export("runs/routed/cascade", "onnx_cascade/")   # a routed model: two experts + router.json
    runner = fp.export.OnnxCascade("onnx_cascade/")     # numpy + onnxruntime only

Formats:

* ``onnx``: :func:`torch.onnx.export`. ``exporter="auto"`` (default) tries the dynamo exporter
  (``torch.export`` + onnxscript) first and falls back to the TorchScript exporter when the dynamo
  exporter fails or its file does not reproduce the model; :attr:`ExportResult.exporter` says
  which one wrote the file and :attr:`ExportResult.note` why a fallback happened. Weights are
  stored inside the one ``.onnx`` file (no external data file).
* ``pt2``: :func:`torch.export.export` saved with :func:`torch.export.save`. Loading a ``.pt2``
  (``torch.export.load``) unpickles parts of the archive: do that only for files you made;
  flowprune itself never loads one.

The batch dimension is dynamic by default (``dynamic_batch=True``; the example batch is made at
least 2 wide because ``torch.export`` specialises a size-1 dimension). Masked models
(Hyperflows/magnitude parametrizations) are baked first (pruned weights become exact zeros).
Every file is written to a temporary file in the destination directory, checked (``verify=True``:
onnxruntime or the exported program against PyTorch at the example batch size and at another
one, to ``atol + rtol * |reference|`` with both 1e-4) and only then renamed into place, so a
failed export leaves no partial file.

A routed model (:class:`flowprune.route.cascade.Cascade`, or a directory written by
``flowprune route``) exports as a directory: ``light.onnx``, ``heavy.onnx`` (and ``router.onnx``
for the learned router) plus ``cascade.json`` (router name and config, threshold, what each file
outputs). :class:`OnnxCascade` reproduces the cascade's decisions from those files with numpy and
onnxruntime only. What a router needs is read from its class: a router with a numpy formula
(``Router.score_numpy``: ``confidence``, ``entropy``, ``l1``) is computed by the runner from its
name and config; any other router (``learned``, or one of your own) is traced to ``router.onnx``
(inputs ``logits`` and, when it ``needs_features``, ``features``). Routers with
``exportable = False`` (``random``: not a function of the input) and early-exit cascades raise
FlowpruneError.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import tempfile
import types
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flowprune.errors import FlowpruneError, bad_choice

FORMATS = ("onnx", "pt2")
EXPORTERS = ("auto", "dynamo", "torchscript")
CASCADE_FORMAT = "flowprune-onnx-cascade"
CASCADE_FILE = "cascade.json"
#: the built-in routers that export (the registry decides: ``Router.exportable``; kept for old imports)
CASCADE_ROUTERS = ("confidence", "entropy", "l1", "learned")
ATOL = 1e-4
RTOL = 1e-4
_INSTALL = "pip install 'flowprune[export]'"


@dataclass
class ExportResult:
    """What :func:`export` wrote.

    path: the file (or, for a cascade, the ``cascade.json``) written.
    format: ``onnx`` | ``pt2`` | ``onnx-cascade``.
    exporter: ``dynamo`` | ``torchscript`` (ONNX) or ``torch.export`` (pt2).
    dynamic_batch: whether the batch dimension is dynamic.
    input_shape: one sample's shape (without the batch dimension).
    opset: the ONNX opset (None for pt2 or when ``onnx`` is not installed).
    max_abs_error: the largest |exported - PyTorch| seen by the check (None when not checked).
    checked_batches: the batch sizes the check ran at.
    note: why the TorchScript exporter was used, what was baked, what was not checked.
    files: every file written (cascades write several).
    """

    path: Path
    format: str
    exporter: str
    dynamic_batch: bool
    input_shape: tuple[int, ...]
    opset: int | None = None
    max_abs_error: float | None = None
    checked_batches: tuple[int, ...] = ()
    note: str = ""
    files: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["files"] = [str(f) for f in self.files]
        d["input_shape"] = list(self.input_shape)
        d["checked_batches"] = list(self.checked_batches)
        return d

    def describe(self) -> str:
        parts = [self.format, f"{self.exporter} exporter" if self.format != "pt2" else "torch.export"]
        if self.opset:
            parts.append(f"opset {self.opset}")
        parts.append("dynamic batch" if self.dynamic_batch else "fixed batch")
        if self.max_abs_error is not None:
            parts.append(f"max |exported - torch| = {self.max_abs_error:.1e} at batch "
                         f"{' and '.join(str(b) for b in self.checked_batches)}")
        s = f"{self.path} ({', '.join(parts)})"
        return s + (f"; {self.note}" if self.note else "")


# ----------------------------------------------------------------------------------------- checks

def _check_format(fmt: str | None, path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    if fmt is None:
        if suffix not in FORMATS:
            raise FlowpruneError(f"cannot tell the export format from {str(path)!r}; name the file *.onnx or *.pt2 "
                                 f"or pass format= one of: {', '.join(FORMATS)}")
        return suffix
    if not isinstance(fmt, str) or fmt.lower() not in FORMATS:
        raise bad_choice("export format", fmt, FORMATS)
    fmt = fmt.lower()
    if suffix in FORMATS and suffix != fmt:
        raise FlowpruneError(f"output {str(path)!r} ends in .{suffix} but the format is {fmt!r}; "
                             f"name the file *.{fmt} or pass format={suffix!r}")
    return fmt


def _check_out_file(path: str | os.PathLike, fmt: str | None) -> tuple[Path, str]:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise FlowpruneError(f"export path must be a file path such as 'model.onnx', got {path!r}")
    p = Path(path)
    if p.is_dir():
        raise FlowpruneError(f"export path {str(p)!r} is a directory; give a file path such as {str(p / 'model.onnx')!r}")
    fmt = _check_format(fmt, p)
    if p.suffix.lower() != f".{fmt}":
        p = p.with_name(p.name + f".{fmt}")
    if p.parent.exists() and not p.parent.is_dir():
        raise FlowpruneError(f"cannot write {str(p)!r}: {str(p.parent)!r} is not a directory")
    return p, fmt


def _input_shape(model: nn.Module, example_inputs) -> tuple[int, ...]:
    if example_inputs is not None:
        if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() < 2:
            raise FlowpruneError("example_inputs must be one input batch, a tensor of shape (B, *input_shape), "
                                 f"got {type(example_inputs).__name__}"
                                 + (f" of shape {tuple(example_inputs.shape)}" if isinstance(example_inputs, torch.Tensor)
                                    else ""))
        return tuple(int(s) for s in example_inputs.shape[1:])
    base = getattr(model, "flowprune_base", None) or {}
    if "input_shape" not in base:
        raise FlowpruneError("the model was not built by flowprune.build_model, so its input shape is unknown; "
                             "pass example_inputs=torch.randn(2, C, H, W)")
    return tuple(int(s) for s in base["input_shape"])


def _example(shape: tuple[int, ...], example_inputs, batch: int) -> torch.Tensor:
    if example_inputs is None:
        g = torch.Generator().manual_seed(0)
        return torch.randn(batch, *shape, generator=g)
    x = example_inputs.detach().float().cpu()
    if len(x) < batch:  # torch.export specialises a batch of 1; repeat the rows
        x = x.repeat(math.ceil(batch / len(x)), *([1] * (x.dim() - 1)))[:batch]
    return x


def _prepare(model: nn.Module) -> tuple[nn.Module, str]:
    """An eval-mode copy on the CPU with any weight parametrization (mask) baked in."""
    from torch.nn.utils import parametrize

    net = copy.deepcopy(model).cpu().eval()
    note = ""
    if any(parametrize.is_parametrized(m) for m in net.modules()):
        from flowprune.sparse import bake

        net = bake(net, inplace=True)
        note = "weight masks baked in (pruned weights are exact zeros)"
    for p in net.parameters():
        p.requires_grad_(False)
    return net, note


def _close(a: np.ndarray, b: np.ndarray) -> tuple[bool, float]:
    if a.shape != b.shape:
        return False, math.inf
    if not np.all(np.isfinite(a) == np.isfinite(b)):
        return False, math.inf
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    diff = np.where(np.isfinite(diff), diff, 0.0)
    ok = bool(np.all(diff <= ATOL + RTOL * np.abs(b.astype(np.float64))))
    return ok, float(diff.max()) if diff.size else 0.0


def _outputs(out) -> list[np.ndarray]:
    if isinstance(out, torch.Tensor):
        return [out.detach().cpu().numpy()]
    return [o.detach().cpu().numpy() for o in out]


# ----------------------------------------------------------------------------------------- onnx

def _onnx_session(path: str | os.PathLike):
    try:
        import onnxruntime as ort
    except ImportError:
        raise FlowpruneError(f"onnxruntime is not installed; {_INSTALL}") from None
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _check_onnx(file: str, net: nn.Module, x: torch.Tensor, dynamic: bool) -> tuple[bool, float, tuple[int, ...], str]:
    try:
        sess = _onnx_session(file)
    except FlowpruneError:
        return True, math.nan, (), "not checked: onnxruntime is not installed"
    batches = [x] + ([_example(tuple(x.shape[1:]), None, len(x) + 3)] if dynamic else [])
    worst, sizes = 0.0, []
    name = sess.get_inputs()[0].name
    for xb in batches:
        with torch.no_grad():
            ref = _outputs(net(xb))
        got = sess.run(None, {name: xb.numpy()})
        if len(got) != len(ref):
            return False, math.inf, tuple(sizes), f"the ONNX file has {len(got)} outputs, the model {len(ref)}"
        for g, r in zip(got, ref):
            ok, err = _close(g, r)
            worst = max(worst, err)
            if not ok:
                return False, worst, tuple(sizes + [len(xb)]), (f"onnxruntime output differs from PyTorch by "
                                                                f"{err:.2e} at batch {len(xb)}")
        sizes.append(len(xb))
    return True, worst, tuple(sizes), ""


def _opset(file: str) -> int | None:
    try:
        import onnx
    except ImportError:
        return None
    m = onnx.load(file, load_external_data=False)
    return next((int(o.version) for o in m.opset_import if o.domain in ("", "ai.onnx")), None)


def _export_onnx_file(net: nn.Module, x: torch.Tensor, file: str, exporter: str, dynamic: bool,
                      input_names: list[str], output_names: list[str], opset: int | None) -> None:
    if exporter == "dynamo":
        try:
            import onnxscript  # noqa: F401
        except ImportError:
            raise FlowpruneError(f"the dynamo ONNX exporter needs onnxscript and onnx; {_INSTALL}") from None
        ds = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
        kw: dict[str, Any] = {"opset_version": opset} if opset else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(net, (x,), None, dynamo=True, dynamic_shapes=ds, input_names=input_names,
                                     output_names=output_names, verbose=False, **kw)
        prog.save(file, external_data=False)
    else:
        axes = {n: {0: "batch"} for n in input_names + output_names} if dynamic else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (x,), file, dynamo=False, input_names=input_names, output_names=output_names,
                              dynamic_axes=axes, opset_version=opset or 17, do_constant_folding=True)


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _write_onnx(net: nn.Module, x: torch.Tensor, out: Path, *, exporter: str, dynamic: bool, verify: bool,
                opset: int | None, input_names: list[str], output_names: list[str]) -> dict:
    order = ["dynamo", "torchscript"] if exporter == "auto" else [exporter]
    failures: list[str] = []
    for ex in order:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp.onnx", dir=out.parent)
        os.close(fd)
        try:
            try:
                _export_onnx_file(net, x, tmp, ex, dynamic, input_names, output_names, opset)
            except FlowpruneError as e:
                if exporter != "auto":
                    raise
                failures.append(f"{ex} exporter: {e}")
                continue
            except Exception as e:  # noqa: BLE001 -- any exporter failure: try the next exporter
                failures.append(f"{ex} exporter failed ({_short(e)})")
                continue
            ok, err, sizes, why = (_check_onnx(tmp, net, x, dynamic) if verify else (True, math.nan, (), "not checked"))
            if not ok:
                failures.append(f"{ex} exporter: {why}")
                continue
            info = {"exporter": ex, "opset": _opset(tmp), "max_abs_error": None if math.isnan(err) else err,
                    "checked_batches": sizes,
                    "note": "; ".join(failures + ([why] if why else []))}
            os.replace(tmp, out)
            return info
        finally:
            for f in (tmp, tmp + ".data"):
                if os.path.exists(f):
                    os.unlink(f)
    raise FlowpruneError(f"could not export to ONNX ({'; '.join(failures)}); nothing was written to {str(out)!r}. "
                         "Try the other exporter (exporter='dynamo'/'torchscript') or format='pt2'")


# ----------------------------------------------------------------------------------------- pt2

def _write_pt2(net: nn.Module, x: torch.Tensor, out: Path, *, dynamic: bool, verify: bool) -> dict:
    ds = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp.pt2", dir=out.parent)
    os.close(fd)
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ep = torch.export.export(net, (x,), dynamic_shapes=ds)
        except Exception as e:  # noqa: BLE001
            raise FlowpruneError(f"torch.export could not capture the model ({_short(e)}); nothing was written to "
                                 f"{str(out)!r}; try format='onnx'") from None
        worst, sizes = 0.0, []
        if verify:
            run = ep.module()
            for xb in [x] + ([_example(tuple(x.shape[1:]), None, len(x) + 3)] if dynamic else []):
                with torch.no_grad():
                    ref, got = _outputs(net(xb)), _outputs(run(xb))
                for g, r in zip(got, ref):
                    ok, err = _close(g, r)
                    worst = max(worst, err)
                    if not ok:
                        raise FlowpruneError(f"the exported program differs from the model by {err:.2e} at batch "
                                             f"{len(xb)}; nothing was written to {str(out)!r}")
                sizes.append(len(xb))
        torch.export.save(ep, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"exporter": "torch.export", "opset": None, "max_abs_error": worst if verify else None,
            "checked_batches": tuple(sizes), "note": ""}


# ----------------------------------------------------------------------------------------- public

def _is_saved_cascade(p: Path) -> bool:
    from flowprune.route.io import ROUTER_FILE

    return p.is_dir() and (p / ROUTER_FILE).exists()


def _load_source(src: str | os.PathLike) -> Any:
    from flowprune.io import RECIPE_FILE, WEIGHTS_FILE, load
    from flowprune.route.io import load_cascade

    p = Path(src)
    if not p.exists():
        raise FlowpruneError(f"{str(p)!r} does not exist; pass a model directory written by flowprune "
                             "(`flowprune train/prune/... --out DIR`) or a routed model directory (`flowprune route`)")
    if _is_saved_cascade(p):
        return load_cascade(p)
    if (p / "cascade" / "router.json").exists():  # the output directory of `flowprune route`
        return load_cascade(p / "cascade")
    if p.is_dir() and not (p / RECIPE_FILE).exists() and (p / "model" / RECIPE_FILE).exists():  # `flowprune idap`
        p = p / "model"
    if p.is_dir() and not ((p / RECIPE_FILE).exists() and (p / WEIGHTS_FILE).exists()):
        raise FlowpruneError(f"{str(p)!r} is not a saved flowprune model: it holds no {RECIPE_FILE} + {WEIGHTS_FILE} "
                             "(written by `flowprune train/prune/idap/hyperflows --out DIR`) and no cascade/router.json "
                             "(written by `flowprune route`)")
    return load(p)


def export(model: nn.Module | str | os.PathLike, path: str | os.PathLike, format: str | None = None, *,
           example_inputs: torch.Tensor | None = None, dynamic_batch: bool = True, exporter: str = "auto",
           opset: int | None = None, verify: bool = True) -> ExportResult:
    """Export ``model`` to ``path`` as ONNX or a ``torch.export`` program (see the module docstring).

    Args:
        model: a model (not changed: a copy is exported in eval mode), a saved model directory, or
            a routed model (:class:`~flowprune.route.cascade.Cascade` or its saved directory; then
            ``path`` is a directory, see :func:`export_cascade`).
        path: the file to write (``*.onnx`` / ``*.pt2``); its directory is created.
        format: ``onnx`` or ``pt2``; default: from the file name.
        example_inputs: one input batch ``(B, *input_shape)``; default: random, from
            ``model.flowprune_base``.
        dynamic_batch: make the batch dimension dynamic (default True).
        exporter: ONNX only: ``auto`` (dynamo, falling back to TorchScript), ``dynamo`` or ``torchscript``.
        opset: ONNX opset (default: the exporter's own; 17 for TorchScript).
        verify: check the written file against PyTorch before renaming it into place.

    Returns:
        an :class:`ExportResult` (``.exporter`` says which exporter wrote the file).

    Raises:
        FlowpruneError: a path that is not a saved model, an unknown format or exporter, or a failed
            export (then no file is left behind).
    """
    from flowprune.route.cascade import Cascade, EarlyExitCascade

    if isinstance(model, (str, os.PathLike)):
        model = _load_source(model)
    if isinstance(model, (Cascade, EarlyExitCascade)):
        if format not in (None, "onnx"):
            raise FlowpruneError(f"a routed model exports only as ONNX (format='onnx'), got format={format!r}")
        return export_cascade(model, path, exporter=exporter, opset=opset, verify=verify)
    if not isinstance(model, nn.Module):
        raise FlowpruneError(f"model must be a torch.nn.Module or a saved model directory, got {type(model).__name__}")
    if exporter not in EXPORTERS:
        raise bad_choice("exporter", exporter, EXPORTERS)
    if not isinstance(dynamic_batch, bool):
        raise FlowpruneError(f"dynamic_batch must be True or False, got {dynamic_batch!r}")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or not 9 <= opset <= 30):
        raise FlowpruneError(f"opset must be an ONNX opset number such as 17 or 18, got {opset!r}")
    out, fmt = _check_out_file(path, format)
    if fmt == "pt2" and exporter != "auto":
        raise FlowpruneError(f"exporter={exporter!r} applies to ONNX only; format 'pt2' always uses torch.export")
    shape = _input_shape(model, example_inputs)
    net, note = _prepare(model)
    x = _example(shape, example_inputs, 2 if dynamic_batch else 1)
    try:
        with torch.no_grad():
            net(x)
    except Exception as e:  # noqa: BLE001
        raise FlowpruneError(f"the model does not run on an input of shape {tuple(x.shape)} ({_short(e)}); "
                             "pass example_inputs that it takes") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        info = _write_onnx(net, x, out, exporter=exporter, dynamic=dynamic_batch, verify=verify, opset=opset,
                           input_names=["input"], output_names=["logits"])
    else:
        info = _write_pt2(net, x, out, dynamic=dynamic_batch, verify=verify)
    info["note"] = "; ".join(n for n in (note, info["note"]) if n)
    return ExportResult(path=out, format=fmt, dynamic_batch=dynamic_batch, input_shape=shape, files=[out], **info)


# ----------------------------------------------------------------------------------------- cascades

class _LogitsAndFeatures(nn.Module):
    """``x -> (logits, penultimate features)`` (the input of the last ``nn.Linear``, flattened)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        from flowprune.models import classifier_layer

        self.model = model
        self._store: dict[str, torch.Tensor] = {}
        classifier_layer(model).register_forward_hook(self._hook)

    def _hook(self, _m, inp, _out):
        self._store["f"] = inp[0]

    def forward(self, x):
        logits = self.model(x)
        f = self._store.pop("f")
        return logits, f.flatten(1)


class _RouterNet(nn.Module):
    """A router as a traceable module: ``(logits[, features]) -> score``."""

    def __init__(self, router):
        super().__init__()
        self.router = router

    def forward(self, logits, feats=None):
        return self.router(logits, feats)


def _has_numpy_score(router) -> bool:
    """Whether a router (class or instance) has a numpy formula the ONNX runner can compute."""
    from flowprune.route.routers import Router

    cls = router if isinstance(router, type) else type(router)
    return cls.score_numpy is not Router.score_numpy


def _check_router_exports(r) -> None:
    """Raise unless the cascade's router can be exported now (exportable, fitted or resolved)."""
    from flowprune.route.routers import list_routers, router_class

    if not getattr(r, "exportable", False):
        ok = [n for n in list_routers() if router_class(n).exportable]
        raise FlowpruneError(f"the {r.name!r} router cannot be exported: its decisions are not a function of the input "
                             f"(seeded random draws); routers that export: {', '.join(ok)}")
    r.check_ready()  # e.g. an l1 direction still 'auto': calibrate the cascade first


def export_cascade(cascade, path: str | os.PathLike, *, exporter: str = "auto", opset: int | None = None,
                   verify: bool = True) -> ExportResult:
    """Export a two-expert routed model to directory ``path`` (see the module docstring).

    Writes ``light.onnx`` (outputs ``logits``, plus ``features`` for the l1 and learned routers),
    ``heavy.onnx``, ``router.onnx`` (learned router only) and ``cascade.json``. Files are written
    to temporary names and renamed; ``cascade.json`` is written last.
    """
    from flowprune.route.calibrate import threshold_to_json
    from flowprune.route.cascade import Cascade, EarlyExitCascade

    if isinstance(cascade, (str, os.PathLike)):
        cascade = _load_source(cascade)
    if isinstance(cascade, EarlyExitCascade):
        raise FlowpruneError("early-exit cascades share one network and cannot be split into two ONNX experts yet; "
                             "export the backbone alone with flowprune.export(cascade.backbone, 'model.onnx')")
    if not isinstance(cascade, Cascade):
        raise FlowpruneError(f"expected a routed model (flowprune.route Cascade) or its directory, "
                             f"got {type(cascade).__name__}")
    r = cascade.router
    _check_router_exports(r)
    if exporter not in EXPORTERS:
        raise bad_choice("exporter", exporter, EXPORTERS)
    out = Path(path)
    if out.suffix.lower() in (".onnx", ".pt2") or (out.exists() and not out.is_dir()):
        raise FlowpruneError(f"a routed model exports to a directory (light.onnx, heavy.onnx, {CASCADE_FILE}); "
                             f"{str(out)!r} looks like a file: give a directory path")
    out.mkdir(parents=True, exist_ok=True)
    shape = tuple(int(s) for s in cascade.input_shape)
    x = _example(shape, None, 2)
    light, note_l = _prepare(cascade.light)
    heavy, note_h = _prepare(cascade.heavy)
    with_feats = r.needs_features
    files, notes, errs, exporters = [], [], [], []
    light_net = _LogitsAndFeatures(light).eval() if with_feats else light
    light_out = ["logits", "features"] if with_feats else ["logits"]
    for name, net, outs in (("light", light_net, light_out), ("heavy", heavy, ["logits"])):
        f = out / f"{name}.onnx"
        info = _write_onnx(net, x, f, exporter=exporter, dynamic=True, verify=verify, opset=opset,
                           input_names=["input"], output_names=outs)
        files.append(f)
        exporters.append(info["exporter"])
        if info["max_abs_error"] is not None:
            errs.append(info["max_abs_error"])
        if info["note"]:
            notes.append(f"{name}: {info['note']}")
    rec: dict[str, Any] = {"format": CASCADE_FORMAT, "format_version": 1, "kind": cascade.kind, "router": r.name,
                           "router_config": r.config(), "threshold": threshold_to_json(cascade.threshold),
                           "rule": "escalate iff score > threshold",
                           "input_shape": list(shape), "num_classes": int(cascade.num_classes),
                           "light": {"file": "light.onnx", "outputs": light_out},
                           "heavy": {"file": "heavy.onnx", "outputs": ["logits"]},
                           "exporters": {"light": exporters[0], "heavy": exporters[1]},
                           "metadata": getattr(cascade, "flowprune_metadata", {}) or {}}
    if not _has_numpy_score(r):
        rec["router_file"] = _export_router(r, light_net, x, out, exporter, opset)
        files.append(out / "router.onnx")
    tmp = out / (CASCADE_FILE + ".tmp")
    try:
        json.dumps(rec)
    except TypeError:
        rec["metadata"] = {}
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, out / CASCADE_FILE)
    files.append(out / CASCADE_FILE)
    if verify:
        _check_cascade(cascade, out)
    for n in (note_l, note_h):
        if n:
            notes.append(n)
    return ExportResult(path=out / CASCADE_FILE, format="onnx-cascade", exporter="+".join(sorted(set(exporters))),
                        dynamic_batch=True, input_shape=shape, max_abs_error=max(errs) if errs else None,
                        checked_batches=(2, 5) if errs else (), note="; ".join(notes), files=files)


def _export_router(r, light_net: nn.Module, x: torch.Tensor, out: Path, exporter: str, opset: int | None) -> dict:
    """A router without a numpy formula as ``router.onnx``; returns its ``router_file`` record."""
    router = copy.deepcopy(r).cpu().eval()
    with torch.no_grad():
        lo = light_net(x)
    inputs = tuple(lo) if isinstance(lo, tuple) else (lo,)
    names = ["logits", "features"][:len(inputs)]
    info = _write_onnx_router(_RouterNet(router).eval(), inputs, out / "router.onnx", exporter, opset, names)
    return {"file": "router.onnx", "inputs": names, "outputs": ["score"], "exporter": info}


def _write_onnx_router(net: nn.Module, inputs: tuple, out: Path, exporter: str, opset: int | None,
                       names: list[str]) -> str:
    """A router as ONNX: ``names`` (logits[, features]) -> score; TorchScript exporter (a small function)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp.onnx", dir=out.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, inputs, tmp, dynamo=False, input_names=names, output_names=["score"],
                              opset_version=opset or 17,
                              dynamic_axes={**{n: {0: "batch"} for n in names}, "score": {0: "batch"}})
        os.replace(tmp, out)
    except Exception as e:  # noqa: BLE001
        raise FlowpruneError(f"could not export the {getattr(net, 'router', net).name!r} router ({_short(e)})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return "torchscript"


def _check_cascade(cascade, out: Path) -> None:
    """The ONNX runner must take the same decisions as the cascade (borderline scores aside)."""
    runner = OnnxCascade(out)
    x = _example(tuple(runner.input_shape), None, 16)
    with torch.no_grad():
        ref = cascade.route(x)
    got = runner.route(x.numpy())
    differ = got.expert != ref.expert.numpy()
    borderline = np.abs(ref.score.numpy() - cascade.threshold) <= 1e-4 * max(1.0, abs(cascade.threshold))
    if np.any(differ & ~borderline):
        raise FlowpruneError(f"the exported cascade in {str(out)!r} routes {int(differ.sum())} of {len(x)} check inputs "
                             "differently from the PyTorch cascade; do not use these files")


# ----------------------------------------------------------------------------------------- runner

class RoutedOutput(types.SimpleNamespace):
    """``logits (B, K)``, ``expert (B,)`` (0 light, 1 heavy), ``score (B,)``; ``predictions``, ``heavy_usage``."""

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    @property
    def heavy_usage(self) -> float:
        return float(self.expert.mean()) if self.expert.size else 0.0


def _runner_router(rec: dict):
    """The router of an exported record without ``router.onnx``: rebuilt from the registry by name + config."""
    from flowprune.route.routers import get_router, list_routers, router_class

    ok = [n for n in list_routers() if _has_numpy_score(router_class(n))]
    name = rec.get("router")
    if name not in ok:
        raise bad_choice("exported router", name, ok)
    cfg = rec.get("router_config", {})
    if not isinstance(cfg, dict):
        raise FlowpruneError(f"router_config of the exported cascade must be an object, got {cfg!r}")
    return get_router(name, **cfg)


class OnnxCascade:
    """Run an exported routed model with numpy and onnxruntime only (no PyTorch needed).

    ``route(x)`` runs the light expert on the whole batch, scores every sample with the router,
    runs the heavy expert once on the escalated rows (``score > threshold``) and puts their
    answers back, exactly as :class:`flowprune.route.cascade.Cascade` does. ``x`` is a float32
    array ``(B, *input_shape)``. Nothing but JSON and ONNX is read from the directory.
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None):
        d = Path(path)
        if d.is_file() and d.name == CASCADE_FILE:
            d = d.parent
        f = d / CASCADE_FILE
        if not f.exists():
            raise FlowpruneError(f"{str(d)!r} is not an exported cascade: {CASCADE_FILE} is missing "
                                 "(write one with flowprune.export(cascade, DIR) or `flowprune export ROUTED_DIR --out DIR`)")
        rec = json.loads(f.read_text())
        if rec.get("format") != CASCADE_FORMAT:
            raise FlowpruneError(f"{f} is not an exported flowprune cascade (format={rec.get('format')!r})")
        formula = None if isinstance(rec.get("router_file"), dict) else _runner_router(rec)
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads is not None:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1

        def sess(name: str):
            return ort.InferenceSession(str(d / name), sess_options=so, providers=["CPUExecutionProvider"])

        self.record = rec
        self.router = rec["router"]
        self.router_config = rec.get("router_config", {})
        self.threshold = float(rec["threshold"])
        self.input_shape = tuple(rec["input_shape"])
        self.light = sess(rec["light"]["file"])
        self.heavy = sess(rec["heavy"]["file"])
        self.formula = formula  # a Router rebuilt from the registry (numpy formula), or None
        self.router_session = sess(rec["router_file"]["file"]) if formula is None else None

    def scores(self, logits: np.ndarray, feats: np.ndarray | None) -> np.ndarray:
        """The router's difficulty score per sample (higher = escalate)."""
        if self.formula is not None:
            return self.formula.score_numpy(logits, feats)
        names = self.record["router_file"].get("inputs", ["logits", "features"])
        arrays = {"logits": logits, "features": feats}
        return self.router_session.run(None, {n: arrays[n].astype(np.float32) for n in names})[0].reshape(-1)

    def route(self, x: np.ndarray, threshold: float | None = None) -> RoutedOutput:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise FlowpruneError(f"input must have shape (B, {', '.join(map(str, self.input_shape))}), got {x.shape}")
        thr = self.threshold if threshold is None else float(threshold)
        outs = self.light.run(None, {"input": x})
        logits, feats = outs[0], (outs[1] if len(outs) > 1 else None)
        score = self.scores(logits, feats)
        mask = score > thr
        logits = logits.copy()
        if mask.any():
            idx = np.nonzero(mask)[0]
            logits[idx] = self.heavy.run(None, {"input": x[idx]})[0]
        return RoutedOutput(logits=logits, expert=mask.astype(np.int64), score=score)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.route(x).logits


# ``flowprune.export`` is both this module and the function: ``fp.export(model, "m.onnx")`` and
# ``fp.export.OnnxCascade(dir)`` both work (the module is callable).
class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs) -> ExportResult:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
