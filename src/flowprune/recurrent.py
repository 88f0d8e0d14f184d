"""Recurrent hidden units (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) as the unit kind ``recurrent``.

A unit is one recurrent module; unit ``j`` is hidden unit ``j`` of **every layer and both
directions** of the module, cut together: PyTorch gives a recurrent module one ``hidden_size``
for all its layers and directions, so each must lose the same number of units, and tying the
index is the one consistent way to cut them without rebuilding the module. (Stack separate
one-layer modules to let each layer keep its own width: each is then its own unit.)

Cutting hidden unit ``j`` removes, in every layer ``l`` and direction:

* the gate rows ``g * H + j`` of ``weight_ih_l{l}``, ``weight_hh_l{l}``, ``bias_ih_l{l}`` and
  ``bias_hh_l{l}`` for every gate (LSTM: i, f, g, o; GRU: r, z, n; RNN: one);
* column ``j`` of ``weight_hh_l{l}`` (the unit's own state, read by every unit's gates);
* for ``l > 0``, the columns ``d * H + j`` of ``weight_ih_l{l}`` (layer ``l - 1``'s output, both
  directions concatenated);
* downstream, the input columns of whatever reads the module's output sequence (a ``Linear``, a
  ``Conv1d``, the next recurrent module's ``weight_ih_l0`` columns, a ``LayerNorm``), found on
  Torch-Pruning's dependency graph; for a bidirectional module the output holds ``2H`` features
  and both ``j`` and ``H + j`` are cut (the unit's channel ``classes``).

``hidden_size`` (and a downstream module's ``input_size``) are updated and
``flatten_parameters()`` is called, so the module runs on cuDNN again after a cut.

**Why hand-written.** Torch-Pruning 1.6.1's ``LSTMPruner`` is wrong for every LSTM it accepts: it
cuts ``weight_hh`` rows by the hidden index alone (not the four gate rows), cuts ``weight_ih``
along its input dimension with the gate-expanded index, cuts ``bias_ih`` by the hidden index, never
cuts ``weight_hh``'s columns, asserts ``num_layers == 1``, and has no GRU/RNN rule; and its graph
traces into the recurrent kernels (GRU-bidirectional models make its index mapping fail). So
flowprune registers :class:`RecurrentPruner` through Torch-Pruning's public
``customized_pruners`` hook and, while tracing, shows each recurrent module as one autograd node
(as :mod:`flowprune.tp_ext` does for opaque modules): Torch-Pruning still finds every consumer of
the hidden units; the module's own surgery is this file's.

Not handled (reported in ``units.reasons``, left intact): an LSTM with ``proj_size > 0``; a
module whose final states ``(h_n, c_n)`` are read downstream (only the output sequence is
followed; a trial cut finds it); ``PackedSequence`` inputs; an output added to another layer's
output (a residual over a recurrent module).
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch
from torch import nn

from flowprune.unit_kinds import UnitKind, register_unit_kind

log = logging.getLogger(__name__)

RNN_TYPES: tuple[type, ...] = (nn.LSTM, nn.GRU, nn.RNN)
KIND = "recurrent"


def is_recurrent(m: object) -> bool:
    return isinstance(m, RNN_TYPES)


def gates(m: nn.Module) -> int:
    """Gate blocks per hidden unit: 4 (LSTM), 3 (GRU), 1 (RNN)."""
    return 4 if isinstance(m, nn.LSTM) else 3 if isinstance(m, nn.GRU) else 1


def directions(m: nn.Module) -> int:
    return 2 if m.bidirectional else 1


def _suffixes(m: nn.Module) -> list[str]:
    return ["", "_reverse"][: directions(m)]


def param_names(m: nn.Module, layer: int, sfx: str) -> dict[str, str]:
    """``{"ih": name, "hh": name, "b_ih": name, "b_hh": name}`` of one layer and direction (no biases
    when the module has none)."""
    out = {"ih": f"weight_ih_l{layer}{sfx}", "hh": f"weight_hh_l{layer}{sfx}"}
    if m.bias:
        out.update(b_ih=f"bias_ih_l{layer}{sfx}", b_hh=f"bias_hh_l{layer}{sfx}")
    return out


def _tp_base():
    import torch_pruning as tp

    return tp.pruner.function.BasePruningFunc


class RecurrentPruner(_tp_base()):
    """Torch-Pruning layer pruner for ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (see the module docstring).

    Output channels are the ``directions * hidden_size`` features of the output sequence; cutting
    channel ``i`` cuts hidden unit ``i % hidden_size`` in every layer and direction (a unit's
    channels always hold both directions' copies). Input channels are ``input_size``.
    """

    TARGET_MODULES = RNN_TYPES

    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        h, g, d = int(layer.hidden_size), gates(layer), directions(layer)
        cut = {int(i) % h for i in idxs}
        keep = torch.tensor([j for j in range(h) if j not in cut], dtype=torch.long)
        rows = torch.cat([keep + k * h for k in range(g)])
        below = torch.cat([keep + k * h for k in range(d)])  # layer l-1's output, both directions
        for li in range(int(layer.num_layers)):
            for sfx in _suffixes(layer):
                names = param_names(layer, li, sfx)
                w_ih = self._prune_parameter_and_grad(getattr(layer, names["ih"]), rows, 0)
                if li > 0:
                    w_ih = self._prune_parameter_and_grad(w_ih, below, 1)
                w_hh = self._prune_parameter_and_grad(getattr(layer, names["hh"]), rows, 0)
                setattr(layer, names["ih"], w_ih)
                setattr(layer, names["hh"], self._prune_parameter_and_grad(w_hh, keep, 1))
                for b in ("b_ih", "b_hh"):
                    if b in names:
                        setattr(layer, names[b], self._prune_parameter_and_grad(getattr(layer, names[b]), rows, 0))
        layer.hidden_size = len(keep)
        _reflatten(layer)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs) -> nn.Module:
        cut = {int(i) for i in idxs}
        keep = [i for i in range(int(layer.input_size)) if i not in cut]
        for sfx in _suffixes(layer):
            name = f"weight_ih_l0{sfx}"
            setattr(layer, name, self._prune_parameter_and_grad(getattr(layer, name), keep, 1))
        layer.input_size = len(keep)
        _reflatten(layer)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return int(layer.hidden_size) * directions(layer)

    def get_in_channels(self, layer: nn.Module) -> int:
        return int(layer.input_size)


def _reflatten(layer: nn.Module) -> None:
    """Point the module's flat weight list at its (new) parameters; re-pack them for cuDNN."""
    layer._init_flat_weights()
    layer.flatten_parameters()  # a no-op on the CPU; on CUDA it packs the new weights into one buffer


def _pruners() -> dict:
    pruner = RecurrentPruner()
    return {t: pruner for t in RNN_TYPES}


def _tracing_hook(module, args, kwargs, output):
    """While tracing: the output sequence is one autograd node fed by the module's tensor inputs (so
    Torch-Pruning does not walk into the recurrent kernels), and the final states carry no graph."""
    from flowprune.tp_ext import _Opaque

    if not (isinstance(output, tuple) and isinstance(output[0], torch.Tensor)):
        return None  # a PackedSequence: left to Torch-Pruning (reported when it cannot be followed)
    inputs = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not inputs:  # fed the model's input: the node still needs a gradient path to exist
        inputs = [p for p in module.parameters() if p.requires_grad][:1]
    state = output[1]
    state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
    return _Opaque.apply(output[0].detach(), *inputs), state


@contextlib.contextmanager
def _tracing(model: nn.Module):
    handles = [m.register_forward_hook(_tracing_hook, with_kwargs=True) for m in model.modules() if is_recurrent(m)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- units


def _unit_from_group(name: str, m: nn.Module, group, dg, mod2name: dict) -> tuple[object | None, str | None]:
    """The recurrent unit of module ``name`` from its Torch-Pruning group, or ``(None, why)``."""
    from flowprune.tp_ext import is_opaque
    from flowprune.units import Member, PrunableUnit, _dedupe, _members_from_group, _remap

    h, d = int(m.hidden_size), directions(m)
    producers, norms, consumers, others = _members_from_group(group, dg, mod2name)
    if producers:
        return None, (f"its output is coupled to the output of {producers[0].module_name} (a residual over a "
                      "recurrent module); flowprune does not cut that coupling")
    for o in others:
        if isinstance(o, nn.Module) and o is not m and is_opaque(dg, o):
            return None, f"its output reaches {type(o).__name__} {mod2name.get(o, '')!r}, which flowprune cannot cut"
    ar = torch.arange(h * d)
    class_of = ar % h
    own = Member(name, "out", ar, class_of)
    norms, consumers = _remap(_dedupe(norms), class_of), _remap(_dedupe(consumers), class_of)
    classes = [[j + k * h for k in range(d)] for j in range(h)] if d > 1 else None
    unit = PrunableUnit(name=name, kind=KIND, module=m, size=h, producers=[own], norms=norms, consumers=consumers,
                        block=name.rpartition(".")[0], group=group, classes=classes)
    return unit, None


def _breaks_on_cut(model: nn.Module, name: str, x: torch.Tensor) -> bool:
    """Whether cutting half of ``name``'s hidden units (on a copy) leaves the model unable to run."""
    from flowprune.measure import runs_on
    from flowprune.units import build_graph

    work = copy.deepcopy(model)
    m = work.get_submodule(name)
    try:
        dg = build_graph(work, x)
        h, d = int(m.hidden_size), directions(m)
        cut = [j + k * h for j in range((h + 1) // 2, h) for k in range(d)]
        dg.get_pruning_group(m, dg.get_pruner_of_module(m).prune_out_channels, cut).prune()
    except Exception:  # noqa: BLE001 -- any failure marks the module
        return True
    return not runs_on(work, x)


def _add_units(model: nn.Module, dg, x: torch.Tensor, named: dict, mod2name: dict, skip: set[str],
               validate: bool) -> tuple[list, dict[str, str]]:
    """Recurrent units of a traced model and ``{module: why left intact}`` (see :class:`UnitKind`)."""
    units, reasons = [], {}
    for name, m in named.items():
        if not is_recurrent(m) or name in skip:
            continue
        if getattr(m, "proj_size", 0):
            reasons[name] = "an LSTM with proj_size > 0 (projected hidden state) has no cutting rule; left intact"
            continue
        if m not in dg.module2node:
            reasons[name] = ("its output sequence is not used (only its final state h_n / c_n is read, which "
                             "flowprune does not follow) or it is fed a PackedSequence; left intact")
            continue
        pruner = dg.get_pruner_of_module(m)
        group = dg.get_pruning_group(m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m))))
        unit, why = _unit_from_group(name, m, group, dg, mod2name)
        if why is None and validate and int(m.hidden_size) > 1 and _breaks_on_cut(model, name, x):
            why = ("a trial cut leaves the model unable to run: its final state (h_n / c_n) is read downstream; "
                   "flowprune follows only the output sequence")
        if why is not None:
            reasons[name] = why
            log.warning("hidden units of %s are left intact: %s", name, why)
            continue
        units.append(unit)
    return units, reasons


# ---------------------------------------------------------------- what scores read


def unit_rows(m: nn.Module, tensors: dict[str, torch.Tensor] | None = None, *, bias: bool = True) -> torch.Tensor:
    """The weights that *write* each output channel, one row per channel: ``(directions * H, fan)``.

    Row ``d * H + j`` holds hidden unit ``j``'s gate rows in direction ``d`` of every layer (of
    ``weight_ih``, ``weight_hh`` and, with ``bias``, both biases), the analogue of a Linear's weight
    row. ``tensors`` (``{parameter name: tensor of its shape}``, e.g. gradients or ``|W| * ||X||``)
    replaces the parameters; a name it lacks contributes zeros.
    """
    h, g = int(m.hidden_size), gates(m)
    per_dir = []
    for sfx in _suffixes(m):
        parts = []
        for li in range(int(m.num_layers)):
            for key, pname in param_names(m, li, sfx).items():
                if key.startswith("b_") and not bias:
                    continue
                p = getattr(m, pname)
                t = p.detach() if tensors is None else tensors.get(pname, torch.zeros_like(p))
                t = t.detach().reshape(g, h, -1).transpose(0, 1).reshape(h, -1)
                parts.append(t)
        per_dir.append(torch.cat(parts, dim=1))
    return torch.cat(per_dir, dim=0)


def input_columns(m: nn.Module, idxs: torch.Tensor) -> torch.Tensor:
    """The weights that *read* input channels ``idxs`` (``weight_ih_l0`` columns of every direction):
    ``(len(idxs), gates * H * directions)``."""
    cols = [getattr(m, f"weight_ih_l0{sfx}").detach()[:, idxs].transpose(0, 1) for sfx in _suffixes(m)]
    return torch.cat(cols, dim=1)


def weight_input_sq(m: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per weight matrix, the sum of squares of what each of its input columns reads over ``x``.

    ``weight_ih_l0`` reads ``x``; ``weight_ih_l{l}`` reads layer ``l - 1``'s output (both directions);
    ``weight_hh_l{l}`` of direction ``d`` reads that direction's hidden states (taken over the whole
    sequence). The inner layers' sequences are recomputed layer by layer with the module's own
    weights (one single-layer module per layer, no dropout), since the module does not expose them.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError("recurrent input must be a tensor (PackedSequence is not supported)")
    h = int(m.hidden_size)
    out: dict[str, torch.Tensor] = {}
    seq = x.detach()
    with torch.no_grad():
        for li in range(int(m.num_layers)):
            single = _single_layer(m, li, int(seq.shape[-1]))
            nxt, _ = single(seq)
            for k, sfx in enumerate(_suffixes(m)):
                names = param_names(m, li, sfx)
                out[names["ih"]] = (seq.double() ** 2).reshape(-1, seq.shape[-1]).sum(0).cpu()
                own = nxt[..., k * h:(k + 1) * h].double()
                out[names["hh"]] = (own ** 2).reshape(-1, h).sum(0).cpu()
            seq = nxt
    return out


def _single_layer(m: nn.Module, li: int, in_size: int) -> nn.Module:
    """A one-layer module of ``m``'s type holding layer ``li``'s weights (same device and dtype)."""
    p = next(m.parameters())
    kw = {"nonlinearity": m.nonlinearity} if isinstance(m, nn.RNN) else {}
    single = type(m)(in_size, int(m.hidden_size), num_layers=1, bias=m.bias, batch_first=m.batch_first,
                     bidirectional=m.bidirectional, device=p.device, dtype=p.dtype, **kw)
    state = {}
    for sfx in _suffixes(m):
        for pname in param_names(m, li, sfx).values():
            state[pname.replace(f"_l{li}", "_l0")] = getattr(m, pname).detach()
    single.load_state_dict(state)
    return single.eval()


def output_sequence(m: nn.Module, output) -> torch.Tensor:
    """The output sequence of a forward as ``(batch, time, directions * H)``."""
    y = output[0] if isinstance(output, tuple) else output
    return y if m.batch_first or y.dim() < 3 else y.transpose(0, 1)


register_unit_kind(UnitKind(name=KIND, module_types=RNN_TYPES, pruners=_pruners, tracing=_tracing,
                            add_units=_add_units))


def own_width_share(m: nn.Module) -> float:
    """The share of a recurrent module's weight MACs whose both dimensions are its own hidden units
    (``weight_hh`` and the inner layers' ``weight_ih``): that part scales with the square of the kept
    fraction of hidden units, the rest (``weight_ih_l0``) with the kept fraction of its inputs."""
    h, d = int(m.hidden_size), directions(m)
    per_row = [int(m.input_size) + h] + [d * h + h] * (int(m.num_layers) - 1)
    total = sum(per_row)
    return (total - int(m.input_size)) / total
