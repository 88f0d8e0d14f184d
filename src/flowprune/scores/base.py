"""The score interface, the registry, helpers shared by the scores, and the Torch-Pruning adapter.

A score is an object made by ``get_score(name, **options)``; calling it,
``score(model, units, batches)``, returns ``{unit.name: Tensor(unit.size)}`` (float32, CPU),
higher = more important = keep. A score never changes the model's weights, ``requires_grad``
flags or train/eval modes (they are restored on return), and never writes ``.grad``.

Using a flowprune score inside Torch-Pruning's own pruners::

    imp = get_score("agf").as_tp_importance(batches=calib, example_inputs=torch.randn(1, 3, 32, 32))
    pruner = tp.pruner.MetaPruner(model, example_inputs, importance=imp, pruning_ratio=0.5,
                                  ignored_layers=[model.fc])
    pruner.step()

The adapter finds flowprune's units on the model Torch-Pruning hands it (``group._DG.model``),
scores them once per architecture (it rescoring after every cut of an iterative pruner) and
returns, for a Torch-Pruning group, the score of the flowprune unit that owns the group's root
layer, indexed by the group's root indices. Groups flowprune does not score get ``None``
(Torch-Pruning then skips them).
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable, Sequence

import torch
from torch import nn

from flowprune.backend import safe_conv_backward
from flowprune.errors import FlowpruneError, bad_choice

_REGISTRY: dict[str, type[Score]] = {}

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


def register_score(name: str) -> Callable[[type[Score]], type[Score]]:
    """Class decorator: register a :class:`Score` subclass under ``name``."""

    def deco(cls: type[Score]) -> type[Score]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_scores() -> list[str]:
    """Registered score names, sorted."""
    return sorted(_REGISTRY)


def get_score(name: str, **options) -> Score:
    """A score object by name; ``options`` are the score's own (see each class's ``OPTIONS``)."""
    if name not in _REGISTRY:
        raise bad_choice("score", name, list_scores())
    return _REGISTRY[name](**options)


class Score:
    """Base class. Subclasses set ``OPTIONS`` (name -> default) and implement :meth:`compute`.

    ``needs_data``: whether calibration batches are used (magnitude scores do not need them).
    ``needs_labels``: whether the batches must carry class labels (loss-based scores).
    """

    name = "base"
    OPTIONS: dict[str, object] = {}
    needs_data = True
    needs_labels = False

    def __init__(self, **options):
        unknown = set(options) - set(self.OPTIONS)
        if unknown:
            raise FlowpruneError(f"unknown option(s) {sorted(unknown)} for score {self.name!r}; "
                                 f"allowed: {', '.join(sorted(self.OPTIONS)) or 'none'}")
        self.options = {**self.OPTIONS, **options}
        self.validate()

    def validate(self) -> None:
        """Check ``self.options``; raise FlowpruneError naming the bad value."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options.items())})"

    def __call__(self, model: nn.Module, units, batches: Batches | None = None) -> dict[str, torch.Tensor]:
        if self.needs_data and not batches:
            raise FlowpruneError(f"score {self.name!r} needs calibration batches [(x, y), ...]; got none")
        if self.needs_labels and batches:
            check_labels(model, batches)
        with preserved(model), safe_conv_backward(model):
            out = self.compute(model, list(units), list(batches or []))
        return {u.name: out[u.name].detach().float().cpu().reshape(u.size) for u in units}

    def compute(self, model: nn.Module, units: list, batches: list) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def as_tp_importance(self, batches: Batches | None = None, example_inputs: torch.Tensor | None = None,
                         model: nn.Module | None = None):
        """This score as a ``torch_pruning.importance.Importance`` (see the module docstring)."""
        return TPImportance(self, batches, example_inputs, model)


class preserved:
    """Context manager: restore every module's train flag, ``inplace`` flags and ``requires_grad``."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.inplace = [(m, m.inplace) for m in self.model.modules() if isinstance(getattr(m, "inplace", None), bool)]
        self.rg = [(p, p.requires_grad) for p in self.model.parameters()]
        for m, _ in self.inplace:
            m.inplace = False  # in-place activations would overwrite captured features
        return self.model

    def __exit__(self, *exc):
        for m, f in self.flags:
            m.training = f
        for m, f in self.inplace:
            m.inplace = f
        for p, f in self.rg:
            p.requires_grad_(f)


def check_labels(model: nn.Module, batches: Batches) -> None:
    """Raise if a calibration label does not fit the model's classifier."""
    from flowprune.models import classifier_layer

    try:
        n = classifier_layer(model).out_features
    except FlowpruneError:
        return
    for i, b in enumerate(batches):
        if not (isinstance(b, (tuple, list)) and len(b) == 2):
            raise FlowpruneError(f"calibration batch {i} must be a pair (x, y), got {type(b).__name__}")
        y = b[1]
        if y.numel() and (int(y.max()) >= n or int(y.min()) < 0):
            raise FlowpruneError(f"calibration labels must lie in [0, {n - 1}] for a model with {n} classes; "
                                 f"batch {i} has labels in [{int(y.min())}, {int(y.max())}]")


def device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def modules_of(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def channel_sums(t: torch.Tensor, module: nn.Module, *, absolute: bool) -> torch.Tensor:
    """Per-sample, per-channel sum over positions: (B, C) from a conv (B, C, *S) or linear (B, ..., C) tensor."""
    if absolute:
        t = t.abs()
    if isinstance(module, nn.modules.conv._ConvNd):
        return t.flatten(2).sum(2) if t.dim() > 2 else t
    if t.dim() == 1:
        return t.unsqueeze(0)
    return t.reshape(t.shape[0], -1, t.shape[-1]).sum(1)


def input_channel_sq(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Sum of squares of an input batch per input channel: (I,)."""
    x = x.detach().float()
    if isinstance(module, nn.modules.conv._ConvNd):
        return (x ** 2).transpose(0, 1).reshape(x.shape[1], -1).sum(1)
    return (x ** 2).reshape(-1, x.shape[-1]).sum(0)


def weight_rows(w: torch.Tensor, idxs: torch.Tensor) -> torch.Tensor:
    """Rows ``idxs`` of a weight along its output dim, flattened: (len(idxs), fan_in)."""
    return w.detach()[idxs].flatten(1)


def grouped_input_index(module: nn.Module) -> torch.Tensor | None:
    """For a conv with groups: (O, I/g) index of the input channel each weight slot reads; None for linear."""
    if not isinstance(module, nn.modules.conv._ConvNd):
        return None
    o, g, i = module.out_channels, module.groups, module.in_channels
    base = (torch.arange(o) // (o // g)) * (i // g)
    return base[:, None] + torch.arange(i // g)[None, :]


def unit_generator(seed: int, name: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed) * 1_000_003 + zlib.crc32(name.encode()))
    return g


def cross_entropy_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if logits.dim() > 2:  # e.g. token outputs: average over the extra dims
        logits = logits.flatten(2).mean(2)
    return torch.nn.functional.cross_entropy(logits, y, reduction="sum")


def _param_signature(model: nn.Module) -> tuple:
    return tuple((n, tuple(p.shape)) for n, p in model.named_parameters())


class TPImportance:
    """A flowprune :class:`Score` wrapped as a Torch-Pruning ``Importance`` (subclass made lazily)."""

    def __new__(cls, score: Score, batches, example_inputs, model):
        import torch_pruning as tp

        class _Imp(tp.importance.Importance):
            def __init__(self):
                self.score, self.batches, self.example_inputs, self.model = score, batches, example_inputs, model
                self._sig = None
                self._map: dict[nn.Module, tuple[torch.Tensor, dict[int, int]]] = {}

            def _refresh(self, model: nn.Module) -> None:
                from flowprune.units import find_units

                sig = (id(model), _param_signature(model))
                if sig == self._sig:
                    return
                x = self.example_inputs
                if x is None:
                    base = getattr(model, "flowprune_base", None)
                    if base is None:
                        raise FlowpruneError("as_tp_importance needs example_inputs for a model not built by flowprune")
                    x = torch.randn(1, *base["input_shape"])
                units = find_units(model, x)
                scores = self.score(model, units, self.batches)
                mods = modules_of(model)
                self._map = {}
                for u in units:
                    for p in u.producers:
                        m = mods[p.module_name]
                        self._map[m] = (scores[u.name], dict(zip(p.idxs.tolist(), p.root_idxs.tolist())))
                self._sig = sig

            @torch.no_grad()
            def __call__(self, group):
                model = self.model if self.model is not None else group._DG.model
                with torch.enable_grad():
                    self._refresh(model)
                root = group[0].dep.target.module
                if root not in self._map:
                    return None
                s, idx_map = self._map[root]
                idxs = [int(i) for i in group[0].idxs]
                try:
                    return torch.stack([s[idx_map[i]] for i in idxs])
                except KeyError:
                    return None

        return _Imp()


def work_copy(model: nn.Module) -> nn.Module:
    """A deep copy for scores that must take optimizer steps (trajectory calibration)."""
    return copy.deepcopy(model)
