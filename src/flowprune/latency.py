"""A latency model of the user's model on the user's device: per-layer lookup tables (HALP-style).

HALP (Shen et al., "Structural pruning via latency-saliency knapsack", NVlabs/HALP) prunes to a
latency budget with a lookup table of each layer's latency measured on the target device as a
function of its input and output channel counts. flowprune does the same:

* **Layers.** Every conv / linear / norm layer that a prunable unit shrinks (its producers,
  norms and consumers, from :func:`flowprune.units.find_units`) is one :class:`LayerCost`: its
  shape (:class:`LayerSpec`: kind, channels, kernel, stride, groups, the input's spatial / token
  shape, recorded by a forward hook) and how its input and output channel counts follow the units'
  widths (``channels = fixed + sum(per_unit * width)``, which also covers concatenations,
  grouped convs and attention heads).
* **Tables.** Each distinct layer shape is built alone (a fresh ``nn.Conv2d`` / ``nn.Linear`` /
  norm of that shape at reduced channels), on the device, at batch ``batch_size``, and timed at
  a small grid of (input, output) channel counts by the one timing harness
  (:func:`flowprune.timing.time_callables`: warm-up, interleaved rounds, medians). Between grid
  points the time is interpolated bilinearly; the grid is made monotone (fewer channels never
  cost more) so noise cannot make a cut look slower.
* **The rest.** The whole model is timed once at full width. What the tables do not explain is
  split in two: the layers no unit cuts (a ``nn.MultiheadAttention`` flowprune leaves intact,
  an uncut stem) keep their time, estimated as their share of the model's MACs
  (``fixed_s``); the remainder (activations, additions, pooling, per-call overhead: on one CPU
  thread a third of ResNet-18's time at batch 1) is assumed to shrink with the layers around it.
  The prediction is ``fixed_s + scale * sum(layer times at the widths)``, ``scale`` making it
  equal the measured dense time at full width. Where the remainder does not shrink (fixed
  per-call overhead at batch 1) this over-predicts the speed-up, which the planner corrects by
  measuring the cut model (:mod:`flowprune.plan_latency`).
* **Width multiple.** Kernels run some channel counts faster than others (a multiple of 8 or 16
  fills a vector register or a tensor-core tile). :func:`probe_multiple` measures, on a wide
  layer with many MACs, the time per MAC at ``W - m`` channels for each candidate ``m`` (1, 2,
  4, 8, 16, 32; ``W`` a multiple of 64 near half the layer's width, so ``W - m`` is a multiple of
  ``m`` but not of ``2m``) and at ``W`` itself, and picks the smallest ``m`` within 10% of the
  best. Kept widths are then multiples of it.
* **Cache.** Built once per (architecture signature, device name, batch size, backend, torch
  version) and kept as JSON (no pickle) in ``$FLOWPRUNE_CACHE_DIR/latency`` (default
  ``$XDG_CACHE_HOME/flowprune/latency``, i.e. ``~/.cache/flowprune/latency``). A cached table
  is used only when its key matches exactly.

The timing is done through a *timer* object (:class:`DeviceTimer` by default) with two methods,
``layers(points)`` and ``models(models, x)``; a test passes a fake one and gets exact values.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from flowprune.errors import FlowpruneError, check_positive_int

LATENCY_BACKENDS = ("eager",)
CANDIDATE_MULTIPLES = (1, 2, 4, 8, 16, 32)
GRID = (0.25, 0.5, 0.75, 1.0)
FORMAT_VERSION = 1
MULTIPLE_TOLERANCE = 0.10


@dataclass(frozen=True)
class LayerSpec:
    """The shape of one layer, enough to rebuild it alone at other channel counts."""

    kind: str  # conv | linear | bn | ln
    cin: int
    cout: int
    kernel: tuple = ()
    stride: tuple = ()
    padding: tuple | str = ()
    dilation: tuple = ()
    groups: int = 1
    depthwise: bool = False
    bias: bool = True
    shape: tuple = ()  # the input's shape without batch and channels (spatial dims, or tokens for linear/ln)

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    def macs(self, ci: int, co: int) -> float:
        """Multiply-accumulates per sample at ``ci`` input and ``co`` output channels (for the probe)."""
        n = 1
        for s in self.shape:
            n *= int(s)
        if self.kind == "conv":
            k = 1
            for v in self.kernel:
                k *= int(v)
            g = co if self.depthwise else self.groups
            stride = 1
            for v in self.stride:
                stride *= int(v)
            return ci / g * co * k * n / stride
        if self.kind == "linear":
            return ci * co * n
        return co * n

    def build(self, ci: int, co: int, batch_size: int, device) -> tuple[nn.Module, torch.Tensor]:
        """A fresh layer of this shape at ``ci`` -> ``co`` channels, in eval mode, and an input batch."""
        if self.kind == "conv":
            conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(self.kernel)]
            groups = co if self.depthwise else self.groups
            cin = co if self.depthwise else ci
            m = conv(cin, co, self.kernel, stride=self.stride, padding=self.padding, dilation=self.dilation,
                     groups=groups, bias=self.bias)
            x = torch.randn(batch_size, cin, *self.shape)
        elif self.kind == "linear":
            m = nn.Linear(ci, co, bias=self.bias)
            x = torch.randn(batch_size, *self.shape, ci)
        elif self.kind == "bn":
            m = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[len(self.shape)](co)
            x = torch.randn(batch_size, co, *self.shape)
        else:
            m = nn.LayerNorm(co)
            x = torch.randn(batch_size, *self.shape, co)
        return m.to(device).eval(), x.to(device)


def spec_of(m: nn.Module, x: torch.Tensor) -> LayerSpec | None:
    """The :class:`LayerSpec` of module ``m`` seen with input ``x`` (batch first); None for other types."""
    if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.modules.conv._ConvTransposeNd):
        dw = m.groups > 1 and m.groups == m.in_channels == m.out_channels
        return LayerSpec("conv", m.in_channels, m.out_channels, tuple(m.kernel_size), tuple(m.stride),
                         m.padding if isinstance(m.padding, str) else tuple(m.padding), tuple(m.dilation),
                         1 if dw else m.groups, dw, m.bias is not None, tuple(x.shape[2:]))
    if isinstance(m, nn.Linear):
        return LayerSpec("linear", m.in_features, m.out_features, bias=m.bias is not None, shape=tuple(x.shape[1:-1]))
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return LayerSpec("bn", m.num_features, m.num_features, shape=tuple(x.shape[2:]))
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
        c = m.normalized_shape[0]  # channels last (tokens), or first (a LayerNorm2d that permutes: timed channels last)
        return LayerSpec("ln", c, c, shape=tuple(x.shape[1:-1]) if x.shape[-1] == c else tuple(x.shape[2:]))
    return None


def single_count(spec: LayerSpec) -> bool:
    """Whether the layer has one channel count (a depthwise conv, a norm): its table is 1-D in ``co``."""
    return spec.depthwise or spec.kind in ("bn", "ln")


@dataclass
class LayerCost:
    """One layer a unit's width changes: ``channels = fixed + sum(per[u] * width[u])`` on each side."""

    name: str
    spec: LayerSpec
    in_fixed: int
    in_per: dict[str, int] = field(default_factory=dict)
    out_fixed: int = 0
    out_per: dict[str, int] = field(default_factory=dict)

    @property
    def units(self) -> set[str]:
        return set(self.in_per) | set(self.out_per)

    def channels(self, widths: Mapping[str, int], sizes: Mapping[str, int]) -> tuple[int, int]:
        ci = self.in_fixed + sum(p * widths.get(u, sizes[u]) for u, p in self.in_per.items())
        co = self.out_fixed + sum(p * widths.get(u, sizes[u]) for u, p in self.out_per.items())
        return ci, co


def _input_shapes(model: nn.Module, names: set[str], example: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input tensor of each named module on one forward of ``example`` (first call only)."""
    from flowprune.measure import eval_mode

    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for n, m in model.named_modules():
        if n in names:
            hooks.append(m.register_forward_pre_hook(
                lambda mod, inp, n=n: seen.setdefault(n, inp[0].detach()) if inp and torch.is_tensor(inp[0]) else None))
    try:
        with eval_mode(model), torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return seen


def layer_costs(model: nn.Module, units: Sequence, example: torch.Tensor) -> list[LayerCost]:
    """The :class:`LayerCost` of every conv / linear / norm layer that some unit shrinks, in module order."""
    per: dict[str, dict[str, dict[str, int]]] = {}
    for u in units:
        for role, members in (("out", u.producers + u.norms), ("in", u.consumers)):
            for m in members:
                side = per.setdefault(m.module_name, {"in": {}, "out": {}})[role]
                side[u.name] = side.get(u.name, 0) + max(1, round(len(m.idxs) / max(u.size, 1)))
    sizes = {u.name: u.size for u in units}
    seen = _input_shapes(model, set(per), example[:1])
    out = []
    for name, m in model.named_modules():
        if name not in per or name not in seen:
            continue
        spec = spec_of(m, seen[name])
        if spec is None:
            continue
        p = per[name]
        if single_count(spec):  # one channel count (depthwise conv, norm): whichever unit cuts either side
            merged = {**p["in"], **p["out"]}
            p = {"in": merged, "out": merged}
        in_fixed = spec.cin - sum(v * sizes[k] for k, v in p["in"].items())
        out_fixed = spec.cout - sum(v * sizes[k] for k, v in p["out"].items())
        out.append(LayerCost(name, spec, max(0, in_fixed), dict(p["in"]), max(0, out_fixed), dict(p["out"])))
    return out


# ----------------------------------------------------------------------------------------- timing


class DeviceTimer:
    """Times layers and models on ``device`` at ``batch_size`` with :mod:`flowprune.timing`."""

    def __init__(self, device, batch_size: int, backend: str = "eager", *, rounds: int = 3, warmup: int = 1,
                 min_round_s: float | None = None, model_rounds: int = 7):
        self.device, self.batch_size, self.backend = torch.device(device), batch_size, backend
        if min_round_s is None:  # a GPU kernel takes microseconds: shorter rounds suffice
            min_round_s = 0.02 if self.device.type == "cpu" else 0.002
        self.rounds, self.warmup, self.min_round_s, self.model_rounds = rounds, warmup, min_round_s, model_rounds

    def layers(self, points: Mapping[str, tuple[LayerSpec, int, int]]) -> dict[str, float]:
        """Median seconds of one forward of each ``(spec, ci, co)`` layer, built alone, interleaved."""
        from flowprune.timing import time_callables

        fns = {}
        for k, (spec, ci, co) in points.items():
            m, x = spec.build(ci, co, self.batch_size, self.device)
            fns[k] = (lambda f, z: (lambda: f(z)))(m, x)
        dev = self.device if self.device.type != "cpu" else None
        with torch.no_grad():
            t = time_callables(fns, device=dev, rounds=self.rounds, warmup=self.warmup,
                               min_round_s=self.min_round_s, backend=self.backend)
        return dict(t.median)

    def models(self, models: Mapping[str, nn.Module], x: torch.Tensor):
        """The harness's :class:`~flowprune.timing.Timings` of one forward of each model on ``x``."""
        from flowprune.timing import time_models

        return time_models(models, x.to(self.device), device=self.device, backend=self.backend,
                           rounds=self.model_rounds, warmup=1)


def _grid(full: int, floor: int, step: int, fractions: Sequence[float] = GRID) -> list[int]:
    """Channel counts at which a layer side is timed: the floor and each fraction of ``full``,
    rounded to multiples of ``step`` (never below the floor, never above ``full``)."""
    pts = {full, max(1, floor)}
    for f in fractions:
        v = int(round(f * full / step)) * step if step > 1 else int(round(f * full))
        pts.add(min(full, max(max(1, floor), v)))
    return sorted(pts)


def _monotone(t: list[list[float]]) -> list[list[float]]:
    """Cumulative maximum along both axes: a layer with fewer channels never costs more."""
    out = [list(r) for r in t]
    for i in range(len(out)):
        for j in range(len(out[i])):
            best = out[i][j]
            if i:
                best = max(best, out[i - 1][j])
            if j:
                best = max(best, out[i][j - 1])
            out[i][j] = best
    return out


def _interp1(xs: Sequence[int], x: float) -> tuple[int, int, float]:
    """Bracketing indices of ``x`` in ``xs`` and its weight towards the upper one (clamped)."""
    if len(xs) == 1 or x <= xs[0]:
        return 0, 0, 0.0
    if x >= xs[-1]:
        n = len(xs) - 1
        return n, n, 0.0
    j = bisect.bisect_right(xs, x)
    i = j - 1
    return i, j, (x - xs[i]) / (xs[j] - xs[i])


@dataclass
class Table:
    """Seconds of one layer shape at a grid of input (``ci``) and output (``co``) channel counts."""

    ci: list[int]
    co: list[int]
    t: list[list[float]]  # t[i][j] at ci[i], co[j]

    def __call__(self, ci: float, co: float) -> float:
        i0, i1, a = _interp1(self.ci, ci)
        j0, j1, b = _interp1(self.co, co)
        t = self.t
        low = t[i0][j0] * (1 - b) + t[i0][j1] * b
        high = t[i1][j0] * (1 - b) + t[i1][j1] * b
        return low * (1 - a) + high * a


# ----------------------------------------------------------------------------------------- the model


def parse_speedup(value, what: str = "target_speedup") -> float:
    """A speed-up factor from ``3``, ``3.0``, ``"3x"``; must be a finite number > 1."""
    v = value
    if isinstance(v, str):
        try:
            v = float(v.strip().lower().rstrip("x"))
        except ValueError:
            raise FlowpruneError(f"{what} must be a speed-up factor such as 3 or '3x', got {value!r}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (1.0 < v < float("inf")):
        raise FlowpruneError(f"{what} must be a speed-up factor > 1 (e.g. 3.0 = 3x faster), got {value!r}")
    return float(v)


def check_latency_args(batch_size, backend) -> None:
    """``batch_size`` a positive integer, ``backend`` one the latency model can time (raises FlowpruneError)."""
    check_positive_int("batch_size", batch_size)
    if backend not in LATENCY_BACKENDS:
        raise FlowpruneError(f"backend {backend!r} cannot time a latency model (its per-layer tables are measured "
                             f"in eager PyTorch); allowed: {', '.join(LATENCY_BACKENDS)}")


def unit_rules(units: Sequence, multiple: int, min_width: int) -> tuple[dict[str, int], dict[str, int]]:
    """``(step, floor)`` per unit: kept widths are multiples of ``multiple`` (heads: of 1; a unit
    narrower than ``multiple``: of 1), never below ``min_width`` (rounded up to the step)."""
    step, floor = {}, {}
    for u in units:
        s = multiple if (u.kind != "head" and u.size >= multiple) else 1
        f = min(min_width, u.size)
        f = max(s, -(-f // s) * s)
        step[u.name], floor[u.name] = s, min(f, u.size)
    return step, floor


@dataclass
class LatencyModel:
    """Predicted seconds of one forward at batch ``key["batch_size"]`` as a function of unit widths.

    ``latency(widths)`` = ``fixed_s`` + ``scale`` times the layers' table times at the channel counts the
    widths give (``fixed_s``: the share of the dense time in layers no unit cuts, by their MACs);
    ``speedup(widths)`` = ``latency({}) / latency(widths)`` (``{}``: every unit at full width).
    ``multiple``: kept widths are multiples of it; ``probe``: how it was chosen.
    """

    key: dict
    multiple: int
    sizes: dict[str, int]
    steps: dict[str, int]
    floors: dict[str, int]
    layers: list[LayerCost]
    tables: dict[str, Table]
    full_s: float
    scale: float
    fixed_s: float = 0.0
    probe: dict = field(default_factory=dict)
    timer: object = field(default=None, repr=False)
    cache_file: str | None = None

    def layer_time(self, layer: LayerCost, widths: Mapping[str, int]) -> float:
        ci, co = layer.channels(widths, self.sizes)
        return self.tables[layer.spec.key()](ci, co)

    def latency(self, widths: Mapping[str, int]) -> float:
        return self.fixed_s + self.scale * sum(self.layer_time(lay, widths) for lay in self.layers)

    def speedup(self, widths: Mapping[str, int]) -> float:
        return self.latency({}) / max(self.latency(widths), 1e-12)

    def max_speedup(self) -> float:
        """The predicted speed-up with every unit at its floor (the most this model can reach)."""
        return self.speedup(self.floors)

    def to_json(self) -> dict:
        return {"format": FORMAT_VERSION, "key": self.key, "multiple": self.multiple, "probe": self.probe,
                "full_s": self.full_s, "tables": {k: asdict(t) for k, t in self.tables.items()}}

    def summary(self) -> dict:
        return {"key": self.key, "multiple": self.multiple, "probe": self.probe, "full_s": self.full_s,
                "scale": self.scale, "fixed_s": self.fixed_s, "layers": len(self.layers), "tables": len(self.tables),
                "cache_file": self.cache_file}


def device_name(device: torch.device) -> str:
    """A name of the device that identifies its speed: the GPU's name, or the CPU model and threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        return f"{name} ({torch.get_num_threads()} threads)"
    return device.type


def architecture_signature(model: nn.Module, input_shape: Sequence[int]) -> str:
    """A hash of every module's type and parameter shapes and of the input shape."""
    parts = [list(input_shape)]
    for n, m in model.named_modules():
        parts.append([n, type(m).__name__, [list(p.shape) for p in m.parameters(recurse=False)]])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Where latency tables are cached: ``path``, else ``$FLOWPRUNE_CACHE_DIR/latency``, else
    ``$XDG_CACHE_HOME/flowprune/latency`` (default ``~/.cache/flowprune/latency``)."""
    if path is not None:
        return Path(path)
    if os.environ.get("FLOWPRUNE_CACHE_DIR"):
        return Path(os.environ["FLOWPRUNE_CACHE_DIR"]) / "latency"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flowprune" / "latency"


def _cache_file(key: dict, directory: Path) -> Path:
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return directory / f"{h}.json"


def _read_cache(path: Path, key: dict) -> dict | None:
    """The cached JSON at ``path`` if it is ours and its key matches exactly (else None)."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or d.get("format") != FORMAT_VERSION or d.get("key") != key:
        return None
    return d


def _write_cache(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


def _side_grid(fixed: int, per: Mapping[str, int], steps, floors, sizes, full: int) -> list[int]:
    """The channel counts one side of a layer is timed at (its own count when no unit cuts it)."""
    if not per:
        return [full]
    floor = fixed + sum(p * floors[u] for u, p in per.items())
    step = min(p * steps[u] for u, p in per.items())
    return _grid(full, floor, step)


def _needed_grids(lm_parts: dict, layers: Sequence[LayerCost]) -> dict[str, tuple[LayerSpec, list[int], list[int]]]:
    """Per distinct layer shape: the (ci, co) grid its table needs (the union over its layers)."""
    steps, floors, sizes = lm_parts["steps"], lm_parts["floors"], lm_parts["sizes"]
    out: dict[str, tuple[LayerSpec, set, set]] = {}
    for lay in layers:
        s = lay.spec
        co = _side_grid(lay.out_fixed, lay.out_per, steps, floors, sizes, s.cout)
        ci = [s.cin] if single_count(s) else _side_grid(lay.in_fixed, lay.in_per, steps, floors, sizes, s.cin)
        k = s.key()
        spec, a, b = out.setdefault(k, (s, set(), set()))
        a.update(ci)
        b.update(co)
    return {k: (s, sorted(a), sorted(b)) for k, (s, a, b) in out.items()}


def _measure_table(timer, spec: LayerSpec, ci: list[int], co: list[int]) -> Table:
    points = {f"{i}x{j}": (spec, i, j) for i in ci for j in co}
    t = timer.layers(points)
    return Table(list(ci), list(co), _monotone([[float(t[f"{i}x{j}"]) for j in co] for i in ci]))


def probe_multiple(timer, layers: Sequence[LayerCost], candidates: Sequence[int] = CANDIDATE_MULTIPLES,
                   tolerance: float = MULTIPLE_TOLERANCE) -> tuple[int, dict]:
    """The width multiple this device runs fast, chosen by measurement (see the module docstring).

    The representative layer: the conv / linear with the most MACs among those whose output a
    unit cuts and which are at least 256 (else 128) wide (square ones, whose input is cut alike, first).
    Returns ``(m, record)``; the record holds the widths, seconds and time per MAC relative to the best.
    """
    cands = [lay for lay in layers if lay.out_per and not single_count(lay.spec) and lay.spec.kind in ("conv", "linear")]
    if not cands:
        return 1, {"note": "no conv / linear layer to probe; multiple 1", "chosen": 1}
    wide = ([lay for lay in cands if lay.spec.cout >= 256] or [lay for lay in cands if lay.spec.cout >= 128]
            or cands)
    square = [lay for lay in wide if lay.in_per and lay.spec.cin == lay.spec.cout]
    rep = max(square or wide, key=lambda lay: lay.spec.macs(lay.spec.cin, lay.spec.cout))
    s = rep.spec
    top = max(64, 64 * int(round(s.cout / 2 / 64)))
    widths = {m: top - m for m in candidates if 0 < top - m <= s.cout}
    widths[2 * max(candidates)] = min(top, s.cout)
    points = {str(m): (s, w if (rep.in_per and s.cin == s.cout) else s.cin, w) for m, w in widths.items()}
    t = timer.layers(points)
    per_mac = {m: float(t[str(m)]) / max(s.macs(*points[str(m)][1:]), 1e-12) for m in widths}
    best = min(per_mac.values())
    chosen = min(m for m, v in per_mac.items() if v <= best * (1 + tolerance))
    return chosen, {"layer": rep.name, "widths": {str(m): w for m, w in widths.items()},
                    "seconds": {str(m): float(t[str(m)]) for m in widths},
                    "per_mac_vs_best": {str(m): v / best for m, v in per_mac.items()}, "chosen": chosen,
                    "tolerance": tolerance}


def build_latency_model(model: nn.Module, units: Sequence, example: torch.Tensor, *, batch_size: int = 1,
                        device=None, backend: str = "eager", min_width: int = 1, multiple: int | None = None,
                        cache: str | os.PathLike | bool | None = None, timer=None) -> LatencyModel:
    """Measure (or load from the cache) the :class:`LatencyModel` of ``model`` on ``device``.

    Args:
        model: the dense model (read only); ``units`` its units; ``example`` one input (batch 1).
        batch_size: the batch the latency is for. ``device``: where to time (default: the model's).
        backend: ``eager``. ``min_width``: the floor of every unit. ``multiple``: the width
            multiple (default: cached, else :func:`probe_multiple`).
        cache: a directory, ``None`` (the default directory, see :func:`cache_dir`) or ``False`` (no cache).
        timer: an object with ``layers(points)`` and ``models(models, x)`` (default :class:`DeviceTimer`).
    """
    from flowprune.device import model_device, resolve_device

    check_latency_args(batch_size, backend)
    dev = resolve_device(device, model) if device is not None else (model_device(model) or torch.device("cpu"))
    timer = timer or DeviceTimer(dev, batch_size, backend)
    key = {"architecture": architecture_signature(model, tuple(example.shape[1:])), "device": device_name(dev),
           "batch_size": int(batch_size), "backend": backend, "torch": torch.__version__}
    path = _cache_file(key, cache_dir(None if cache is True else cache)) if cache is not False else None
    cached = _read_cache(path, key) if path is not None else None
    layers = layer_costs(model, units, example.to(model_device(model) or dev))
    if multiple is None:
        multiple, probe = ((int(cached["multiple"]), cached["probe"]) if cached and cached.get("probe", {}).get("chosen")
                           else probe_multiple(timer, layers))
    else:
        probe = {"chosen": check_positive_int("multiple", multiple), "note": "given"}
    steps, floors = unit_rules(units, multiple, min_width)
    sizes = {u.name: u.size for u in units}
    tables = _tables(timer, layers, {"steps": steps, "floors": floors, "sizes": sizes}, cached)
    full_s = float(cached["full_s"]) if cached and cached.get("full_s") else _full_seconds(timer, model, example,
                                                                                           batch_size, dev)
    lm = LatencyModel(key, multiple, sizes, steps, floors, layers, tables, full_s, 1.0, probe=probe, timer=timer,
                      cache_file=str(path) if path is not None else None)
    _fit_rest(lm, model, units, example)
    if path is not None:
        data = lm.to_json()
        if cached and cached.get("multiple") != multiple and cached.get("probe", {}).get("chosen"):
            data["multiple"], data["probe"] = cached["multiple"], cached["probe"]  # keep the probed choice
        _write_cache(path, data)
    return lm


def _fit_rest(lm: LatencyModel, model: nn.Module, units: Sequence, example: torch.Tensor) -> None:
    """``fixed_s`` and ``scale`` of ``lm``: the dense time not in the tables is split into the part of
    layers no unit cuts (by their share of the MACs, Torch-Pruning's counter: fixed) and the rest
    (activations, additions, overhead: shrinks with the tables' layers)."""
    from flowprune.device import model_device
    from flowprune.plan import MacsModel

    modelled = sum(lm.layer_time(lay, {}) for lay in lm.layers)
    mm = MacsModel(model, units, example.to(model_device(model) or example.device))
    untouched = mm.rest / mm.total if mm.total > 0 else 0.0
    lm.fixed_s = max(0.0, min(untouched * lm.full_s, lm.full_s - modelled))
    lm.scale = (lm.full_s - lm.fixed_s) / modelled if modelled > 0 else 1.0


def _tables(timer, layers, parts: dict, cached: dict | None) -> dict[str, Table]:
    """Every layer shape's table: the cached one when its grid covers what is needed, else measured."""
    old = (cached or {}).get("tables", {})
    tables = {}
    for k, (spec, ci, co) in _needed_grids(parts, layers).items():
        c = old.get(k)
        if c and set(ci) <= set(c["ci"]) and set(co) <= set(c["co"]):
            tables[k] = Table(list(c["ci"]), list(c["co"]), [list(r) for r in c["t"]])
        else:
            tables[k] = _measure_table(timer, spec, ci, co)
    return tables


def _full_seconds(timer, model: nn.Module, example: torch.Tensor, batch_size: int, dev) -> float:
    x = torch.randn(batch_size, *example.shape[1:])
    return float(timer.models({"model": model}, x).median["model"])
