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
scores them once per set of weights (keyed by a content fingerprint, so the deep copies of a
ratio search and the repeated calls of one pruning step reuse one scoring, while an iterative
pruner's cut model is rescored) and returns, for a Torch-Pruning group, the score of the flowprune
unit that owns the group's root layer, indexed by the group's root indices and normalised per
group (``normalizer="mean"`` as Torch-Pruning's own importances, so ``global_pruning=True``
compares layers on one scale). Groups flowprune does not score get ``None`` (Torch-Pruning then
skips them).
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

    #: how the calibration work is split under torchrun (:mod:`flowprune.distributed`):
    #: ``"batch_mean"`` (the score is a mean over batches of per-batch terms: ranks' results are
    #: combined weighted by their batch counts), ``"sample_mean"`` (a mean over samples: weighted by
    #: sample counts) or ``"replicate"`` (every rank scores every batch). None: by registered name
    #: (:data:`SHARD_MODES`), else ``"replicate"``.
    shard: str | None = None

    def shard_mode(self) -> str:
        """How this score's batches are shared by the ranks of a torchrun job (see :attr:`shard`)."""
        if not self.needs_data or self.options.get("calibration", "frozen") != "frozen":
            return "replicate"  # no data, or a trajectory: each batch depends on the steps before it
        return self.shard or SHARD_MODES.get(self.name, "replicate")

    def __call__(self, model: nn.Module, units, batches: Batches | None = None) -> dict[str, torch.Tensor]:
        if self.needs_data and not batches:
            raise FlowpruneError(f"score {self.name!r} needs calibration batches [(x, y), ...]; got none")
        from flowprune.hf.adapter import as_tensor_model

        model = as_tensor_model(model)  # a Hugging Face model: x in, logits out (same module names)
        if self.needs_labels and batches:
            check_labels(model, batches)
        from flowprune import distributed

        units, batches = list(units), list(batches or [])
        mode = self.shard_mode() if distributed.active() else "replicate"
        mine = distributed.shard(batches) if mode != "replicate" else batches
        from flowprune.mha import pruned_forward

        with preserved(model), safe_conv_backward(model), pruned_forward(model):  # MHA out_proj called as a module
            out = self.compute(model, units, mine)
        out = {u.name: out[u.name].detach().cpu().reshape(u.size) for u in units}
        if distributed.active():
            out = _combine_ranks(out, units, mode, mine)
        return {u.name: out[u.name].float() for u in units}

    def compute(self, model: nn.Module, units: list, batches: list) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def as_tp_importance(self, batches: Batches | None = None, example_inputs: torch.Tensor | None = None,
                         model: nn.Module | None = None, normalizer: str = "mean"):
        """This score as a ``torch_pruning.importance.Importance`` (see the module docstring).

        ``normalizer``: how each group's scores are put on one scale (Torch-Pruning's names:
        ``mean`` (default), ``max``, ``sum``, ``gaussian``, ``standarization``, or ``none``).
        """
        return TPImportance(self, batches, example_inputs, model, normalizer=normalizer)


SHARD_MODES = {"agf": "batch_mean", "agf-paper": "batch_mean", "taylor": "batch_mean", "divergence": "sample_mean"}


def _combine_ranks(out: dict[str, torch.Tensor], units: list, mode: str, mine: list) -> dict[str, torch.Tensor]:
    """Every rank's per-unit scores -> the scores on the union of the ranks' batches (see ``Score.shard``).

    A rank's result is a mean over its batches (or samples); it is weighted by that count, summed
    over the ranks in float64 and divided by the total count. The result is broadcast from rank 0,
    so every rank holds bit-identical scores and plans the same cuts.
    """
    from flowprune import distributed

    flat = torch.cat([out[u.name].double().reshape(-1) for u in units]) if units else torch.zeros(0)
    if mode != "replicate":
        if mode == "sample_mean":
            w = float(sum(int((b[0] if isinstance(b, (tuple, list)) else b).shape[0]) for b in mine))
        else:
            w = float(len(mine))
        flat = distributed.all_reduce_sum(torch.cat([flat * w, torch.tensor([w], dtype=torch.float64)]))
        flat = flat[:-1] / flat[-1]
    flat = distributed.broadcast_tensor(flat)
    res, i = {}, 0
    for u in units:
        n = out[u.name].numel()
        res[u.name] = flat[i:i + n].reshape(out[u.name].shape)
        i += n
    return res


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


def linear_weight(module: nn.Module) -> torch.Tensor:
    """A layer's weight with output rows first: ``weight`` of a Linear / conv, the transpose of
    transformers' ``Conv1D`` (stored ``(in, out)``), the packed ``in_proj_weight`` of an
    ``nn.MultiheadAttention`` (its q, k, v rows)."""
    if isinstance(module, nn.MultiheadAttention):
        return module.in_proj_weight
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.t()
    return module.weight


def linear_weight_like(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``t`` (shaped like ``module.weight``) with output rows first, as :func:`linear_weight` reads it."""
    return t.t() if type(module).__name__ == "Conv1D" and hasattr(module, "nf") else t


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
    if logits.dim() > 2 and y.dim() == logits.dim() - 1 and y.shape == logits.shape[:-1] and not y.is_floating_point():
        # token labels (a language model's next tokens, (B, T)) for token logits (B, T, V): every token counts
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
    if logits.dim() > 2:  # e.g. token outputs: average over the extra dims
        logits = logits.flatten(2).mean(2)
    return torch.nn.functional.cross_entropy(logits, y, reduction="sum")


NORMALIZERS = ("mean", "max", "sum", "gaussian", "standarization", "none")


def weights_fingerprint(model: nn.Module) -> tuple:
    """A content key of the model's parameters and buffers: names, shapes and two float64 sums each.

    Two deep copies of the same weights share it, so a score wrapped for Torch-Pruning is computed
    once per set of weights however many copies Torch-Pruning's ratio search makes.
    """
    key = []
    with torch.no_grad():
        for n, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not torch.is_floating_point(t):
                key.append((n, tuple(t.shape), int(t.sum())))
                continue
            d = t.detach().double()
            key.append((n, tuple(t.shape), float(d.sum()), float(d.abs().sum())))
    return tuple(key)


def normalize_group(imp: torch.Tensor, normalizer: str) -> torch.Tensor:
    """Torch-Pruning's per-group normalisation (``GroupMagnitudeImportance._normalize``), by name."""
    if normalizer == "none":
        return imp
    if normalizer == "mean":
        return imp / imp.mean()
    if normalizer == "max":
        return imp / imp.max()
    if normalizer == "sum":
        return imp / imp.sum()
    if normalizer == "gaussian":
        return (imp - imp.mean()) / (imp.std() + 1e-8)
    return (imp - imp.min()) / (imp.max() - imp.min() + 1e-8)  # "standarization", as Torch-Pruning spells it


class TPImportance:
    """A flowprune :class:`Score` wrapped as a Torch-Pruning ``Importance`` (subclass made lazily).

    ``normalizer`` (default ``"mean"``, Torch-Pruning's own default): each group's scores are divided
    by their mean (or ``max``/``sum``/``gaussian``/``standarization``/``none``), so that raw scores of
    different layers are on one scale for ``global_pruning=True``. Scores are cached by the
    :func:`weights_fingerprint` of the model (the last ``cache_size`` sets of weights).
    """

    def __new__(cls, score: Score, batches, example_inputs, model, normalizer: str = "mean", cache_size: int = 4):
        import torch_pruning as tp

        if normalizer not in NORMALIZERS:
            raise bad_choice("normalizer", normalizer, NORMALIZERS)

        class _Imp(tp.importance.Importance):
            def __init__(self):
                self.score, self.batches, self.example_inputs, self.model = score, batches, example_inputs, model
                self.normalizer = normalizer
                self.calls = 0  # how many times the wrapped score actually ran
                self._cache: dict[tuple, dict[str, tuple[torch.Tensor, dict[int, int]]]] = {}
                self._names: tuple[int, dict[nn.Module, str]] | None = None
                self._fp: tuple[tuple, tuple] | None = None

            def _scores_by_producer(self, model: nn.Module) -> dict[str, tuple[torch.Tensor, dict[int, int]]]:
                from flowprune.units import find_units

                # the full content fingerprint only when a tensor was replaced or changed in place (Torch-Pruning
                # calls the importance once per group: the whole model is not summed again for every group)
                cheap = (id(model), tuple((t.data_ptr(), t._version) for t in model.state_dict().values()))
                if self._fp is None or self._fp[0] != cheap:
                    self._fp = (cheap, weights_fingerprint(model))
                key = self._fp[1]
                hit = self._cache.get(key)
                if hit is not None:
                    return hit
                x = self.example_inputs
                if x is None:
                    base = getattr(model, "flowprune_base", None)
                    if base is None:
                        raise FlowpruneError("as_tp_importance needs example_inputs for a model not built by flowprune")
                    x = torch.randn(1, *base["input_shape"])
                units = find_units(model, x)
                scores = self.score(model, units, self.batches)
                self.calls += 1
                table = {}
                for u in units:
                    for p in u.producers:
                        table[p.module_name] = (scores[u.name], dict(zip(p.idxs.tolist(), p.root_idxs.tolist())))
                if len(self._cache) >= cache_size:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[key] = table
                return table

            @torch.no_grad()
            def __call__(self, group):
                model = self.model if self.model is not None else group._DG.model
                with torch.enable_grad():
                    table = self._scores_by_producer(model)
                if self._names is None or self._names[0] != id(model):
                    self._names = (id(model), {m: n for n, m in model.named_modules()})
                name = self._names[1].get(group[0].dep.target.module)
                if name not in table:
                    return None
                s, idx_map = table[name]
                try:
                    imp = torch.stack([s[idx_map[int(i)]] for i in group[0].idxs])
                except KeyError:
                    return None
                return normalize_group(imp.float(), self.normalizer)

        return _Imp()


def work_copy(model: nn.Module) -> nn.Module:
    """A deep copy for scores that must take optimizer steps (trajectory calibration)."""
    return copy.deepcopy(model)
