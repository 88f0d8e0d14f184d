"""Heads of ``nn.MultiheadAttention``, cut for real.

PyTorch's ``nn.MultiheadAttention`` runs through ``F.multi_head_attention_forward``, which
requires ``num_heads * head_dim == embed_dim`` and a packed in-projection of ``3 * embed_dim``
rows, so it cannot run with fewer heads. A head cut therefore turns the module into a
:class:`PrunedMultiheadAttention` (a subclass: ``isinstance(m, nn.MultiheadAttention)`` still
holds, and callers such as torchvision's ``EncoderBlock`` call it the same way) whose forward
allows an attention width ``num_heads * head_dim`` smaller than ``embed_dim``: the packed
``in_proj_weight`` keeps the q, k and v rows of the kept heads (``3 * num_heads * head_dim``
rows, ``embed_dim`` columns), ``out_proj`` keeps their input columns; ``embed_dim`` (the
residual stream), ``head_dim`` and ``batch_first`` do not change. With every head kept its
outputs equal PyTorch's (masks, key padding, causal, attention weights; tested).

Cut: modules with a packed in-projection and neither ``add_bias_kv`` nor ``add_zero_attn``
(``nn.Transformer*`` layers, torchvision ViT, most user models). Others are left intact, with
the reason in ``units.reasons``. :func:`mha_head_units` finds the units (hooked into
:func:`flowprune.units.analyse`); the unit carries its surgery (:meth:`MhaHeadUnit.apply_cut`).
:func:`flowprune.io.load` restores the class from the saved recipe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flowprune.errors import FlowpruneError
from flowprune.unit_providers import register_extra_units
from flowprune.units import Member, PrunableUnit


def cut_reason(m: nn.MultiheadAttention) -> str | None:
    """Why the heads of ``m`` cannot be cut (``None`` when they can)."""
    if isinstance(m, PrunedMultiheadAttention):
        return None
    if not m._qkv_same_embed_dim or m.in_proj_weight is None:
        return "separate q/k/v projections (kdim or vdim differs from embed_dim)"
    if m.bias_k is not None or m.add_zero_attn:
        return "add_bias_kv / add_zero_attn (extra key/value rows per head)"
    return None


def _merged_mask(attn_mask, key_padding_mask, is_causal: bool, b: int, h: int, lq: int, s: int,
                 dtype) -> torch.Tensor | None:
    """One additive float mask broadcastable to (B, H, L, S), from PyTorch's mask conventions."""
    mask = None
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(lq, s, dtype=torch.bool).triu(1)
    if attn_mask is not None:
        am = attn_mask
        if am.dtype == torch.bool:
            am = torch.zeros_like(am, dtype=dtype).masked_fill(am, float("-inf"))
        am = am.to(dtype)
        mask = am.view(b, h, lq, s) if am.dim() == 3 else am.view(1, 1, lq, s)
    if key_padding_mask is not None:
        kp = key_padding_mask
        if kp.dtype == torch.bool:
            kp = torch.zeros_like(kp, dtype=dtype).masked_fill(kp, float("-inf"))
        kp = kp.to(dtype).view(b, 1, 1, s)
        mask = kp if mask is None else mask + kp
    return mask


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose attention width ``num_heads * head_dim`` may be below ``embed_dim``."""

    @classmethod
    def adopt(cls, m: nn.MultiheadAttention) -> None:
        """Turn ``m`` (packed in-projection) into this class in place. ``_qkv_same_embed_dim`` is set
        False so that ``nn.TransformerEncoderLayer``'s fused fast path, which assumes
        ``num_heads * head_dim == embed_dim``, is never taken (it checks that flag)."""
        m.__class__ = cls
        m._qkv_same_embed_dim = False

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if self.batch_first and not unbatched:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        lq, b, _ = query.shape
        s, h, d = key.shape[0], self.num_heads, self.head_dim
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q = F.linear(query, wq, bq).view(lq, b, h, d).permute(1, 2, 0, 3)
        k = F.linear(key, wk, bk).view(s, b, h, d).permute(1, 2, 0, 3)
        v = F.linear(value, wv, bv).view(s, b, h, d).permute(1, 2, 0, 3)
        scores = (q @ k.transpose(-1, -2)) * d ** -0.5
        mask = _merged_mask(attn_mask, key_padding_mask, is_causal, b, h, lq, s, scores.dtype)
        if mask is not None:
            scores = scores + mask
        attn = scores.softmax(-1)
        out = F.dropout(attn, self.dropout, self.training) @ v  # (B, H, L, d)
        # out_proj reads (B, L, H * d): batch first, as hooks on a linear layer expect
        out = self.out_proj(out.transpose(1, 2).reshape(b, lq, h * d))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = attn.mean(1) if average_attn_weights else attn
        return out, (weights.squeeze(0) if unbatched else weights)


@contextlib.contextmanager
def pruned_forward(model: nn.Module):
    """Within the block every cuttable ``nn.MultiheadAttention`` of ``model`` runs
    :class:`PrunedMultiheadAttention`'s forward (the same outputs, but ``out_proj`` is called as a
    module, so hooks on it see the heads' context vectors); classes restored on exit."""
    swapped = []
    try:
        for m in model.modules():
            if type(m) is nn.MultiheadAttention and cut_reason(m) is None:
                m.__class__ = PrunedMultiheadAttention
                swapped.append(m)
        yield model
    finally:
        for m in swapped:
            m.__class__ = nn.MultiheadAttention


@dataclass(eq=False)
class MhaHeadUnit(PrunableUnit):
    """The heads of one ``nn.MultiheadAttention``; carries its own surgery."""

    def apply_cut(self, removed: Sequence[int]) -> None:
        m = self.module
        removed = sorted({int(i) for i in removed})
        if not removed:
            return
        h, d = int(m.num_heads), int(m.head_dim)
        if removed[0] < 0 or removed[-1] >= h or len(removed) >= h:
            raise FlowpruneError(f"cut of {self.name!r} must remove 1..{h - 1} of its {h} heads, got {removed}")
        keep = torch.tensor([i for i in range(h * d) if i // d not in set(removed)], dtype=torch.long)
        rows = torch.cat([keep + s * h * d for s in range(3)])
        with torch.no_grad():
            m.in_proj_weight = nn.Parameter(m.in_proj_weight[rows.to(m.in_proj_weight.device)].contiguous())
            if m.in_proj_bias is not None:
                m.in_proj_bias = nn.Parameter(m.in_proj_bias[rows.to(m.in_proj_bias.device)].contiguous())
            o = m.out_proj
            o.weight = nn.Parameter(o.weight[:, keep.to(o.weight.device)].contiguous())
            o.in_features = len(keep)
        m.num_heads = h - len(removed)
        PrunedMultiheadAttention.adopt(m)
        self.size = m.num_heads


@register_extra_units
def mha_head_units(named: dict[str, nn.Module], kinds: Sequence[str], ignored: set[str],
                   excluded: set[str]) -> list[MhaHeadUnit]:
    """A head unit for every cuttable ``nn.MultiheadAttention`` (not ignored / excluded), in module order."""
    out = []
    if "head" not in kinds:
        return out
    for n, m in named.items():
        if not isinstance(m, nn.MultiheadAttention) or n in ignored or n in excluded or cut_reason(m) is not None:
            continue
        h, d = int(m.num_heads), int(m.head_dim)
        ar = torch.arange(h * d)
        rows = torch.cat([ar + s * h * d for s in range(3)])  # q, k, v rows of the packed in-projection
        out.append(MhaHeadUnit(name=n, kind="head", module=m, size=h,
                               producers=[Member(n, "out", rows, (ar // d).repeat(3))],
                               consumers=[Member(f"{n}.out_proj", "in", ar, ar // d)],
                               block=n.rpartition(".")[0], head_dim=d))
    return out
