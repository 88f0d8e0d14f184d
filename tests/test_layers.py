"""Stage 2 primitives: removable blocks, the layer divergence, removal as the identity, save/load."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from flowprune import io
from flowprune.models import build_model
from flowprune.pruning.layers import find_removable_blocks, rank_blocks, remove_block


def _x(shape, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g)


def test_resnet_candidates_are_exactly_the_identity_shortcut_blocks():
    m = build_model("resnet20", (1, 8, 8), 10).eval()
    blocks = find_removable_blocks(m, _x((1, 8, 8)))
    names = {b.name for b in blocks}
    # the first block of stages 2 and 3 changes width and resolution: never a candidate
    assert names == {f"layer{s}.{j}" for s in (1, 2, 3) for j in range(3)} - {"layer2.0", "layer3.0"}
    assert all(b.kind == "residual" and b.input_nonnegative for b in blocks)
    ranked = rank_blocks(blocks)
    assert [b.divergence for b in ranked] == sorted(b.divergence for b in blocks)


def test_divergence_is_branch_over_output_norm():
    m = build_model("resnet20", (1, 8, 8), 10).eval()
    x = _x((1, 8, 8), n=3)
    blk = m.layer1[1]
    store = {}
    h = blk.register_forward_hook(lambda _m, i, o: store.update(x=i[0], out=o))
    with torch.no_grad():
        m(x)
    h.remove()
    xi, out = store["x"], store["out"]
    expected = float(((out - xi).flatten(1).norm(dim=1) / out.flatten(1).norm(dim=1)).mean())
    got = {b.name: b.divergence for b in find_removable_blocks(m, x)}["layer1.1"]
    assert abs(got - expected) < 1e-5


class _Odd(nn.Module):
    """A class named like a residual block whose output shape differs from its input."""

    def __init__(self):
        super().__init__()
        self.shortcut = nn.Identity()
        self.lin = nn.Linear(6, 4)

    def forward(self, x):
        return self.lin(x)


_Odd.__name__ = "BasicBlock"


@settings(max_examples=10, deadline=None)
@given(st.lists(st.sampled_from([4, 6, 8]), min_size=2, max_size=5))
def test_shape_mismatched_layers_are_never_candidates(widths):
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    m = nn.Sequential(*layers).eval()
    blocks = find_removable_blocks(m, torch.randn(3, widths[0]))
    expected = {str(2 * i) for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])) if a == b}
    assert {b.name for b in blocks} == expected
    odd = nn.Sequential(nn.Linear(4, 6), _Odd()).eval()
    assert find_removable_blocks(odd, torch.randn(2, 4)) == []


def _zero_branch_models():
    r = build_model("resnet20", (1, 8, 8), 10).eval()
    for bn in (r.layer1[1].bn2, r.layer3[2].bn2):
        nn.init.zeros_(bn.weight)
        nn.init.zeros_(bn.bias)
    yield r, ["layer1.1", "layer3.2"], (1, 8, 8)
    w = build_model("wrn16_2", (1, 8, 8), 10).eval()
    nn.init.zeros_(w.layer2[1].conv2.weight)
    yield w, ["layer2.1"], (1, 8, 8)
    v = build_model("vit", (1, 8, 8), 10).eval()
    blk = v.blocks[1]
    for lin in (blk.attn.proj, blk.mlp.fc2):
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
    yield v, ["blocks.1"], (1, 8, 8)


def test_removing_a_zero_branch_block_leaves_outputs_unchanged():
    for model, names, shape in _zero_branch_models():
        x = _x(shape, n=5)
        with torch.no_grad():
            ref = model(x)
            cut = model
            for n in names:
                cut = remove_block(cut, n)
                assert isinstance(cut.get_submodule(n), nn.Identity)
            out = cut(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        # the caller's model is untouched
        assert not isinstance(model.get_submodule(names[0]), nn.Identity)
        # a zero branch has zero divergence
        div = {b.name: b.divergence for b in find_removable_blocks(model, x)}
        assert all(div[n] < 1e-6 for n in names)


def test_layer_removed_models_save_and_load(tmp_path):
    for name, shape, blocks in (("resnet20", (1, 8, 8), ["layer1.2", "layer3.1"]), ("vit", (1, 8, 8), ["blocks.2"]),
                                ("vgg8", (1, 16, 16), None)):
        m = build_model(name, shape, 10).eval()
        if blocks is None:  # a plain shape-preserving conv + its BatchNorm
            cands = find_removable_blocks(m, _x(shape))
            assert cands and cands[0].kind == "plain" and cands[0].companions
            cut = remove_block(m, cands[0])
        else:
            cut = m
            for b in blocks:
                cut = remove_block(cut, b)
        d = io.save(cut, tmp_path / name)
        back = io.load(d)
        x = _x(shape, n=3)
        with torch.no_grad():
            torch.testing.assert_close(back(x), cut(x))
        assert sum(isinstance(mod, nn.Identity) for mod in back.modules()) == \
            sum(isinstance(mod, nn.Identity) for mod in cut.modules())


def test_torchvision_and_timm_blocks_are_found():
    tv = build_model("tv:resnet18", (3, 32, 32), 10).eval()
    names = {b.name for b in find_removable_blocks(tv, _x((3, 32, 32), n=2))}
    assert names == {"layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"}
    vit = build_model("vit", (1, 28, 28), 10).eval()
    assert [b.kind for b in find_removable_blocks(vit, _x((1, 28, 28), n=2))] == ["transformer"] * 4
    assert find_removable_blocks(build_model("lenet300", (1, 8, 8), 10), _x((1, 8, 8))) == []
