"""The zoo: every model forwards and backwards; torchvision/timm build offline; MACs are right."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flowprune.errors import FlowpruneError
from flowprune.measure import count_macs_params
from flowprune.models import MODEL_KINDS, MODELS, build_model, forward_with_features, list_models

# every zoo model (the registry, timm-style), at an input shape of its kind; a few fixed shapes where
# a model has a constraint (vgg11 pools five times)
SHAPE_BY_KIND = {"cnn": (1, 28, 28), "vit": (1, 28, 28), "mlp": (1, 28, 28), "cnn1d": (1, 40), "rnn1d": (1, 40)}
SHAPES = {"resnet56": (3, 16, 16), "vgg11": (3, 32, 32), "vgg8": (1, 8, 8)}
ZOO = [(name, SHAPES.get(name, SHAPE_BY_KIND[MODEL_KINDS[name]])) for name in MODELS]


@pytest.mark.parametrize("name, shape", ZOO)
def test_zoo_forward_backward(name, shape):
    torch.manual_seed(0)
    m = build_model(name, shape, num_classes=7)
    x = torch.randn(3, *shape)
    out = m(x)
    assert out.shape == (3, 7)
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert m.flowprune_base == {"name": name, "input_shape": list(shape), "num_classes": 7, "kwargs": {}}
    logits, feats = forward_with_features(m, x)
    assert torch.allclose(logits, m(x), atol=1e-5) or m.training
    assert feats.shape[0] == 3 and feats.dim() == 2


def test_torchvision_and_timm_build_offline():
    tv = build_model("tv:resnet18", (1, 32, 32), 10)
    assert tv.conv1.in_channels == 1 and tv.fc.out_features == 10
    assert tv(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    vit = build_model("timm:vit_tiny_patch16_224", (3, 32, 32), 5)
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert vit.blocks[0].attn.num_heads == 3


def test_macs_match_hand_calculation():
    # LeNet-300-100 on 28x28: every Linear costs in*out multiply-adds plus out bias adds, and
    # Torch-Pruning's counter adds one op per ReLU output element (300 + 100)
    m = build_model("lenet300", (1, 28, 28), 10)
    weights_and_biases = (784 * 300 + 300) + (300 * 100 + 100) + (100 * 10 + 10)
    macs, params = count_macs_params(m)
    assert macs == weights_and_biases + 300 + 100
    assert params == sum(p.numel() for p in m.parameters()) == weights_and_biases
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False))
    conv.flowprune_base = {"input_shape": [3, 10, 10]}
    assert count_macs_params(conv)[0] == 3 * 8 * 9 * 10 * 10


def test_resnet20_size_is_the_published_one():
    _, params = count_macs_params(build_model("resnet20", (3, 32, 32), 10))
    assert 0.26e6 < params < 0.28e6  # 0.27M (He et al.), here with 1x1 projection shortcuts


@pytest.mark.parametrize("name, shape, match", [
    ("resnet21", (1, 28, 28), "allowed"),
    ("cnn1d", (1, 28, 28), "1-D signals"),
    ("resnet20", (40,), "image input"),
    ("tv:not_a_model", (3, 32, 32), "allowed"),
])
def test_bad_model_requests(name, shape, match):
    with pytest.raises(FlowpruneError, match=match):
        build_model(name, shape, 10)


def test_list_models_names_every_zoo_entry():
    names = list_models()
    for n, _ in ZOO:
        assert n in names
