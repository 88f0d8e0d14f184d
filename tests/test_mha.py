"""nn.MultiheadAttention heads cut for real (issue 22): the pruned forward equals PyTorch's with
every head kept, heads that write nothing are cut without a change, counts by hand, save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import flowprune as fp
from flowprune.mha import PrunedMultiheadAttention


def _pruned_copy(m: nn.MultiheadAttention) -> nn.MultiheadAttention:
    p = copy.deepcopy(m)
    PrunedMultiheadAttention.adopt(p)
    return p


@pytest.mark.parametrize("batch_first", [True, False])
def test_pruned_forward_with_every_head_equals_pytorchs(batch_first):
    torch.manual_seed(0)
    m = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    p = _pruned_copy(m)
    b, lq, s = 3, 5, 7
    q = torch.randn((b, lq, 16) if batch_first else (lq, b, 16))
    kv = torch.randn((b, s, 16) if batch_first else (s, b, 16))
    pad = torch.zeros(b, s, dtype=torch.bool)
    pad[0, -2:] = True
    bool_mask = torch.zeros(lq, s, dtype=torch.bool)
    bool_mask[:, 0] = True
    float_mask = torch.randn(b * 4, lq, s)
    for kw in ({}, {"key_padding_mask": pad}, {"attn_mask": bool_mask}, {"attn_mask": float_mask},
               {"attn_mask": bool_mask, "key_padding_mask": pad, "average_attn_weights": False}):
        want, want_w = m(q, kv, kv, **kw)
        got, got_w = p(q, kv, kv, **kw)
        assert torch.allclose(got, want, atol=1e-5) and torch.allclose(got_w, want_w, atol=1e-5), kw
    x = torch.randn(lq, 16)  # unbatched
    assert torch.allclose(p(x, x, x)[0], m(x, x, x)[0], atol=1e-5)
    causal = nn.Transformer.generate_square_subsequent_mask(lq)
    assert torch.allclose(p(q, q, q, attn_mask=causal)[0], m(q, q, q, attn_mask=causal)[0], atol=1e-5)


class Tiny(nn.Module):
    """A linear stem, one fused-path-eligible encoder layer (batch first), a classifier."""

    def __init__(self, input_shape=(5, 6), num_classes=3):
        super().__init__()
        self.stem = nn.Linear(input_shape[-1], 16)
        self.enc = nn.TransformerEncoderLayer(16, 4, dim_feedforward=24, dropout=0.0, batch_first=True)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.enc(self.stem(x)).mean(1))


def test_cutting_heads_that_write_nothing_changes_nothing_and_loses_the_hand_counted_parameters():
    torch.manual_seed(0)
    model = Tiny().eval()
    with torch.no_grad():  # heads 1 and 3 (columns 4..7 and 12..15 of out_proj) write nothing
        model.enc.self_attn.out_proj.weight[:, 4:8] = 0
        model.enc.self_attn.out_proj.weight[:, 12:16] = 0
    x = torch.randn(2, 5, 6)
    heads = [u for u in fp.find_units(model, x) if u.kind == "head"]
    assert [(u.name, u.size) for u in heads] == [("enc.self_attn", 4)]
    cut = fp.apply_cuts(model, {"enc.self_attn": [1, 3]}, example_inputs=x)
    attn = cut.enc.self_attn
    assert isinstance(attn, PrunedMultiheadAttention) and isinstance(attn, nn.MultiheadAttention)
    assert (attn.num_heads, attn.head_dim, attn.embed_dim) == (2, 4, 16)
    assert attn.in_proj_weight.shape == (24, 16) and attn.out_proj.weight.shape == (16, 8)
    # 3 * 8 in-projection rows of 16 weights + 1 bias, 8 out_proj columns of 16: 408 + 128
    lost = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in cut.parameters())
    assert lost == 3 * 8 * 17 + 8 * 16
    with torch.no_grad():  # eval + no grad: nn.TransformerEncoderLayer's fused fast path is not taken
        assert torch.allclose(cut(x), model(x), atol=1e-5)


def test_scores_see_every_mha_head():
    torch.manual_seed(0)
    model = Tiny().eval()
    x, y = torch.randn(4, 5, 6), torch.tensor([0, 1, 2, 0])
    units = fp.find_units(model, x)
    for name in ("agf", "l1", "taylor"):
        s = fp.get_score(name)(model, units, [(x, y)])["enc.self_attn"]
        assert s.shape == (4,) and bool((s.abs() > 0).all()), name
    assert type(model.enc.self_attn) is nn.MultiheadAttention  # the caller's module class is restored


def test_torchvision_vit_heads_are_cut_and_count_by_hand():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.vision_transformer.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=4,
                                                           hidden_dim=32, mlp_dim=48, num_classes=3).eval()
    x = torch.randn(2, 3, 16, 16)
    units = fp.find_units(model, x)
    assert sorted((u.kind, u.size) for u in units) == [("head", 4)] * 2 + [("neuron", 48)] * 2
    cut = fp.apply_cuts(model, {u.name: list(range(u.size // 2)) for u in units}, example_inputs=x)
    # per layer: 2 of 4 heads of 8 = 3 * 16 rows * (32 + 1) + 16 * 32; 24 of 48 neurons = 24 * 33 + 24 * 32
    lost = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in cut.parameters())
    assert lost == 2 * (3 * 16 * 33 + 16 * 32 + 24 * 33 + 24 * 32)
    assert cut(x).shape == (2, 3)


def test_save_load_round_trip(tmp_path, monkeypatch):
    from flowprune import models

    monkeypatch.setitem(models.MODELS, "tiny_mha_test", lambda shape, n, **kw: Tiny(shape, n))
    torch.manual_seed(0)
    model = fp.build_model("tiny_mha_test", (5, 6), 3).eval()
    x = torch.randn(2, 5, 6)
    cut = fp.apply_cuts(model, {"enc.self_attn": [0, 2]}, example_inputs=x)
    fp.save(cut, tmp_path)
    back = fp.load(tmp_path)
    assert isinstance(back.enc.self_attn, PrunedMultiheadAttention) and back.enc.self_attn.num_heads == 2
    with torch.no_grad():
        assert torch.equal(back(x), cut.eval()(x))


def test_an_mha_with_extra_key_value_rows_is_left_intact_with_its_reason():
    class KV(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(6, 16)
            self.attn = nn.MultiheadAttention(16, 4, add_bias_kv=True, batch_first=True)
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            h = self.stem(x)
            return self.fc(self.attn(h, h, h)[0].mean(1))

    units = fp.find_units(KV().eval(), torch.randn(2, 5, 6))
    assert not [u for u in units if u.kind == "head"]
    assert "attn" in units.reasons
