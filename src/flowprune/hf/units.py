"""Units of Hugging Face ``transformers`` models: attention heads and MLP neurons, found by layout.

Torch-Pruning's DependencyGraph cannot follow a ``transformers`` forward (keyword inputs, caches,
masks built from shapes); but since transformers 5 every family reads its attention shapes at
forward time from the projections themselves (``view(*shape, -1, head_dim)``), so a head cut is
a cut of the projection rows and columns plus a few attributes. Layouts are recognised by the
names of the projections (read from the families' ``modeling_*.py``):

* attention: ``q_proj/k_proj/v_proj`` + ``o_proj|out_proj|dense`` (Llama, Mistral, Qwen, Gemma,
  Phi, OPT, BART, Whisper, CLIP, ViT, DeiT...), ``self.query/key/value`` + ``output.dense``
  (BERT, RoBERTa), ``q_lin/k_lin/v_lin`` + ``out_lin`` (DistilBERT), ``c_attn`` (fused, GPT-2's
  ``Conv1D``) + ``c_proj``, ``query_key_value`` (fused per head, GPT-NeoX) + ``dense``;
* MLP: ``gate_proj, up_proj -> down_proj`` (or fused ``gate_up_proj``, Phi-3), ``fc1 -> fc2``, ``c_fc -> c_proj``,
  ``intermediate.dense -> output.dense``, ``dense_h_to_4h -> dense_4h_to_h``, ``lin1 -> lin2``, ``fc_in -> fc_out``,
  ``wi(_0, _1) -> wo``.

With grouped-query attention one unit is a whole key/value group plus the query heads that
share it, so ``num_key_value_groups`` (query heads per group) never changes and
``repeat_kv`` keeps working; ``num_heads``-like attributes are set to the new counts. Layers
may end with different widths (the config keeps the dense ones; :mod:`flowprune.hf.io`
records the per-layer widths). A module that looks like attention (its class name ends in
``Attention`` and it holds parameters) but matches no layout is left intact and reported in
``units.reasons``. A layout whose projections do not split into whole heads is a FlowpruneError.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from flowprune.errors import FlowpruneError
from flowprune.hf.adapter import TensorIO, is_hf_model
from flowprune.mha import mha_head_units
from flowprune.unit_providers import register_unit_provider
from flowprune.units import Member, PrunableUnit, UnitList

_Q = ("q_proj", "query", "q_lin", "q")
_K = ("k_proj", "key", "k_lin", "k")
_V = ("v_proj", "value", "v_lin", "v")
_O = ("o_proj", "out_proj", "out_lin", "dense", "o")
_MLPS = ((("gate_proj", "up_proj"), "down_proj"), (("fc1",), "fc2"), (("c_fc",), "c_proj"),
         (("intermediate.dense",), "output.dense"), (("dense_h_to_4h",), "dense_4h_to_h"), (("lin1",), "lin2"),
         (("wi_0", "wi_1"), "wo"), (("wi",), "wo"), (("fc_in",), "fc_out"))
# attributes of an attention module that count query heads / key-value heads / query width
_Q_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads")
_WIDTH_ATTRS = ("all_head_size", "inner_dim", "split_size")


def _is_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``(in, out)``."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(getattr(m, "weight", None), torch.Tensor)


def _linear_like(m) -> bool:
    return isinstance(m, nn.Linear) or _is_conv1d(m)


def out_features(m: nn.Module) -> int:
    return int(m.weight.shape[1] if _is_conv1d(m) else m.weight.shape[0])


def in_features(m: nn.Module) -> int:
    return int(m.weight.shape[0] if _is_conv1d(m) else m.weight.shape[1])


@torch.no_grad()
def keep_out(m: nn.Module, keep: torch.Tensor) -> None:
    """Keep only output features ``keep`` of a Linear or Conv1D (in place, attributes fixed)."""
    dim = 1 if _is_conv1d(m) else 0
    m.weight = nn.Parameter(m.weight.index_select(dim, keep.to(m.weight.device)).contiguous())
    if m.bias is not None:
        m.bias = nn.Parameter(m.bias.index_select(0, keep.to(m.bias.device)).contiguous())
    if _is_conv1d(m):
        m.nf = len(keep)
    else:
        m.out_features = len(keep)


@torch.no_grad()
def keep_in(m: nn.Module, keep: torch.Tensor) -> None:
    """Keep only input features ``keep`` of a Linear or Conv1D (in place, attributes fixed)."""
    dim = 0 if _is_conv1d(m) else 1
    m.weight = nn.Parameter(m.weight.index_select(dim, keep.to(m.weight.device)).contiguous())
    if not _is_conv1d(m):
        m.in_features = len(keep)


@dataclass(eq=False)
class HFUnit(PrunableUnit):
    """A unit of a Hugging Face model that carries its own surgery (:meth:`apply_cut`)."""

    mods: dict = field(default_factory=dict, repr=False)   # member name -> module
    attrs: nn.Module | None = field(default=None, repr=False)  # where head counts live
    group_size: int = 1  # query heads per key/value group (heads)

    def apply_cut(self, removed: Sequence[int]) -> None:
        """Remove units ``removed`` (indices in ``[0, size)``) in place and fix the attributes."""
        removed = sorted({int(i) for i in removed})
        if not removed:
            return
        if removed[0] < 0 or removed[-1] >= self.size or len(removed) >= self.size:
            raise FlowpruneError(f"cut of {self.name!r} must remove 1..{self.size - 1} of its {self.size} units, "
                                 f"got {removed}")
        rm = torch.as_tensor(removed, dtype=torch.long)
        for mem in self.producers:
            keep_out(self.mods[mem.module_name], mem.idxs[~torch.isin(mem.root_idxs, rm)])
        for mem in self.consumers:
            keep_in(self.mods[mem.module_name], mem.idxs[~torch.isin(mem.root_idxs, rm)])
        new = self.size - len(removed)
        if self.kind == "head":
            _set_head_attrs(self.attrs, new * self.group_size, new, self.head_dim)
        elif self.attrs is not None and isinstance(getattr(self.attrs, "intermediate_size", None), int):
            self.attrs.intermediate_size = new
        self.size = new


def _set_head_attrs(m: nn.Module, n_q: int, n_kv: int, head_dim: int) -> None:
    for a in _Q_ATTRS:
        if isinstance(m.__dict__.get(a), int):
            setattr(m, a, n_q)
    for a in _KV_ATTRS:
        if isinstance(m.__dict__.get(a), int):
            setattr(m, a, n_kv)
    for a in _WIDTH_ATTRS:
        if isinstance(m.__dict__.get(a), int):
            setattr(m, a, n_q * head_dim)


def _child(named: dict, name: str, options: Sequence[str]) -> str | None:
    for o in options:
        n = f"{name}.{o}" if name else o
        if _linear_like(named.get(n)):
            return n
    return None


def _head_dim(m: nn.Module, config) -> int | None:
    for a in ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim", "dim_per_head"):
        v = m.__dict__.get(a)
        if isinstance(v, int) and v > 0:
            return v
    if config is None:
        return None
    hd = getattr(config, "head_dim", None)
    if isinstance(hd, int) and hd > 0:
        return hd
    h, d = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    return d // h if isinstance(h, int) and isinstance(d, int) and h > 0 and d % h == 0 else None


@dataclass
class _Attn:
    name: str
    attrs: nn.Module
    qkv: list[str]  # q, k, v projections (one name for a fused q|k|v projection)
    o: str
    interleaved: bool = False  # a fused projection laid out per head as [q_h | k_h | v_h] (GPT-NeoX)


def _attention_at(named: dict, n: str, m: nn.Module) -> _Attn | None:
    q, k, v, o = _child(named, n, _Q), _child(named, n, _K), _child(named, n, _V), _child(named, n, _O)
    if q and k and v and o:
        return _Attn(n, m, [q, k, v], o)
    sub = f"{n}.self" if n else "self"
    if n and sub in named and _child(named, sub, _Q) and _child(named, sub, _K) and _child(named, sub, _V):
        o = _child(named, n, ("output.dense",))
        if o:
            return _Attn(n, named[sub], [_child(named, sub, _Q), _child(named, sub, _K), _child(named, sub, _V)], o)
    fused, proj = _child(named, n, ("c_attn",)), _child(named, n, ("c_proj",))
    if fused and proj and out_features(named[fused]) == 3 * in_features(named[proj]):
        return _Attn(n, m, [fused], proj)
    fused, proj = _child(named, n, ("query_key_value",)), _child(named, n, ("dense",))
    if fused and proj and type(m).__name__.startswith("GPTNeoX") and \
            out_features(named[fused]) == 3 * in_features(named[proj]):
        return _Attn(n, m, [fused], proj, interleaved=True)
    return None


def _head_unit(a: _Attn, named: dict, config) -> HFUnit:
    """The head unit of one attention layout (a FlowpruneError when its widths are not whole heads)."""
    hd = _head_dim(a.attrs, config)
    o_in = in_features(named[a.o])
    if len(a.qkv) == 1:
        q_out = k_out = o_in
    else:
        q_out, k_out = out_features(named[a.qkv[0]]), out_features(named[a.qkv[1]])
    if hd is None or q_out % hd or k_out % hd or q_out != o_in or (q_out // hd) % (k_out // hd):
        raise FlowpruneError(f"attention {a.name!r} ({type(a.attrs).__name__}): its projections ({q_out} query, "
                             f"{k_out} key features, {o_in} output inputs) do not split into whole heads of "
                             f"head_dim={hd}; check the config (hidden_size must be num_attention_heads * head_dim "
                             "and num_attention_heads a multiple of num_key_value_heads)")
    n_q, n_kv = q_out // hd, k_out // hd
    g = n_q // n_kv
    q_idx = torch.arange(q_out)
    q_root = q_idx // (g * hd)
    kv_idx = torch.arange(k_out)
    if a.interleaved:  # rows of head j: [3 * j * hd, 3 * (j + 1) * hd)
        fused = torch.arange(3 * q_out)
        producers = [Member(a.qkv[0], "out", fused, fused // (3 * hd))]
    elif len(a.qkv) == 1:
        producers = [Member(a.qkv[0], "out", torch.cat([q_idx + s * q_out for s in range(3)]), q_root.repeat(3))]
    else:
        producers = [Member(a.qkv[0], "out", q_idx, q_root)] + [Member(p, "out", kv_idx, kv_idx // hd)
                                                                 for p in a.qkv[1:]]
    mods = {mem: named[mem] for mem in a.qkv + [a.o]}
    return HFUnit(name=a.name, kind="head", module=named[a.name], size=n_kv, producers=producers,
                  consumers=[Member(a.o, "in", q_idx, q_root)], block=a.name.rpartition(".")[0], head_dim=hd,
                  mods=mods, attrs=a.attrs, group_size=g)


def _fused_mlp_unit(named: dict, n: str, m: nn.Module) -> HFUnit | None:
    """Phi-3's ``gate_up_proj`` (gate rows, then up rows) -> ``down_proj``: neuron i is rows i and i + F."""
    fused, cons = _child(named, n, ("gate_up_proj",)), _child(named, n, ("down_proj",))
    if fused is None or cons is None or out_features(named[fused]) != 2 * in_features(named[cons]):
        return None
    ar = torch.arange(in_features(named[cons]))
    return HFUnit(name=fused, kind="neuron", module=named[fused], size=len(ar),
                  producers=[Member(fused, "out", torch.cat([ar, ar + len(ar)]), ar.repeat(2))],
                  consumers=[Member(cons, "in", ar, ar)], block=fused.rpartition(".")[0],
                  mods={fused: named[fused], cons: named[cons]}, attrs=m)


def _mlp_unit(named: dict, n: str, m: nn.Module) -> HFUnit | None:
    fused = _fused_mlp_unit(named, n, m)
    if fused is not None:
        return fused
    for ins, out in _MLPS:
        prods = [_child(named, n, (i,)) for i in ins]
        cons = _child(named, n, (out,))
        if not all(prods) or cons is None:
            continue
        width = out_features(named[prods[0]])
        if any(out_features(named[p]) != width for p in prods) or in_features(named[cons]) != width:
            continue
        idx = torch.arange(width)
        return HFUnit(name=prods[0], kind="neuron", module=named[prods[0]], size=width,
                      producers=[Member(p, "out", idx, idx) for p in prods], consumers=[Member(cons, "in", idx, idx)],
                      block=prods[0].rpartition(".")[0], mods={k: named[k] for k in prods + [cons]}, attrs=m)
    return None


def _skip_reason(a: _Attn, m: nn.Module) -> str | None:
    if hasattr(m, "has_relative_attention_bias"):
        return (f"{type(m).__name__}: the first layer's relative-position bias (one column per head) is added to "
                "every layer's scores, so no layer can lose heads alone; its heads are left intact")
    return None


def _per_head_param(a: _Attn, m: nn.Module, u: HFUnit) -> str | None:
    """A parameter of the attention outside its projections with one entry per head (Swin's relative
    position table): a head cut would leave it the wrong size, so the heads are left intact."""
    proj = {id(p) for name in list(u.mods) for p in u.mods[name].parameters()}
    heads = {u.size, u.size * u.group_size}
    for k, p in m.named_parameters():
        if id(p) not in proj and tuple(p.shape) != (u.head_dim,) and heads & set(p.shape):
            return (f"{type(m).__name__} holds {k!r} of shape {tuple(p.shape)}, with one entry per head outside "
                    "its projections (e.g. a relative-position table); flowprune has no rule to cut it, so its "
                    "heads are left intact")
    return None


def find_hf_units(model: nn.Module, kinds: Sequence[str], ignored: set[str], config=None) -> UnitList:
    """The head and neuron units of a Hugging Face model (see the module docstring)."""
    named = dict(model.named_modules())
    units, reasons, covered = UnitList(), {}, set()
    for n, m in named.items():
        a = _attention_at(named, n, m)
        if a is not None:
            covered.update({n, *a.qkv, a.o, a.qkv[0].rpartition(".")[0]})
            why = _skip_reason(a, m)
            if why:
                reasons[n] = why
            elif "head" in kinds and n not in ignored:
                u = _head_unit(a, named, config)
                why = _per_head_param(a, m, u)
                if why:
                    reasons[n] = why
                else:
                    units.append(u)
            continue
        if "neuron" in kinds:
            u = _mlp_unit(named, n, m)
            if u is not None and not ({u.name, n} & ignored):
                units.append(u)
    mha = mha_head_units(named, kinds, ignored, set())  # nn.MultiheadAttention inside (e.g. pooling heads)
    units.extend(mha)
    covered.update(u.name for u in mha)
    for n, m in named.items():
        looks = type(m).__name__.endswith("Attention") and any(True for _ in m.parameters())
        if looks and n not in covered and not any(c.startswith(n + ".") or n.startswith(c + ".") for c in covered):
            reasons[n] = (f"{type(m).__name__} matches no attention layout flowprune can cut (separate "
                          "q/k/v/o projections, GPT-2's c_attn or GPT-NeoX's per-head query_key_value); its heads "
                          "are left intact")
    order = {n: i for i, n in enumerate(named)}
    units.sort(key=lambda u: order[u.name])
    units.unsupported, units.reasons, units.excluded = list(reasons), reasons, []
    return units


@register_unit_provider
def hf_units(model: nn.Module, kinds: Sequence[str], ignored: set[str]) -> UnitList | None:
    """The unit provider of Hugging Face models (a :class:`TensorIO` or a ``PreTrainedModel``)."""
    inner = model.hf if isinstance(model, TensorIO) else model
    if not is_hf_model(inner):
        return None
    return find_hf_units(model, kinds, ignored, config=getattr(inner, "config", None))
