"""The model zoo by name, plus torchvision (``tv:NAME``) and timm (``timm:NAME``) models.

Every constructor has one signature, ``build_model(name, input_shape, num_classes, **kwargs)``,
and every built model carries ``model.flowprune_base`` (a JSON-safe dict: name, input shape,
classes, kwargs) so that :func:`flowprune.io.save` can write a recipe that rebuilds it without
pickle. Pretrained weights are never downloaded: torchvision and timm models are built with
random weights (``weights=None`` / ``pretrained=False``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from flowprune.errors import FlowpruneError, bad_choice
from flowprune.models.resnet import BasicBlock, CifarResNet, PreActBlock, WideResNet
from flowprune.models.sequence import SeqRNN
from flowprune.models.small import MLP, VGG, CNN1d, small_vit

__all__ = ["BasicBlock", "CifarResNet", "PreActBlock", "WideResNet", "MLP", "VGG", "CNN1d",
           "build_model", "list_models", "forward_with_features", "example_input", "MODEL_KINDS"]


def _image(shape: Sequence[int], name: str) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise FlowpruneError(f"model {name!r} needs image input (C, H, W), got input_shape={tuple(shape)}; "
                             "for 1-D signals use 'cnn1d', for vectors use 'lenet300'")
    return int(shape[0]), int(shape[1]), int(shape[2])


def _resnet(depth: int) -> Callable[..., nn.Module]:
    def make(input_shape, num_classes, width: int = 1):
        c, _, _ = _image(input_shape, f"resnet{depth}")
        return CifarResNet(depth, c, num_classes, width)
    return make


def _wrn(input_shape, num_classes, depth: int = 16, widen: int = 2, dropout: float = 0.0):
    c, _, _ = _image(input_shape, "wrn16_2")
    return WideResNet(depth, widen, c, num_classes, dropout)


def _vgg(config: str) -> Callable[..., nn.Module]:
    def make(input_shape, num_classes):
        c, h, _ = _image(input_shape, config)
        return VGG(config, c, num_classes, image_size=h)
    return make


def _vit(input_shape, num_classes, embed_dim: int = 64, depth: int = 4, num_heads: int = 4,
         mlp_ratio: float = 2.0, patch_size: int | None = None):
    c, h, w = _image(input_shape, "vit")
    if h != w:
        raise FlowpruneError(f"model 'vit' needs square images, got input_shape={tuple(input_shape)}")
    return small_vit(h, c, num_classes, embed_dim, depth, num_heads, mlp_ratio, patch_size)


def _lenet300(input_shape, num_classes, hidden: Sequence[int] = (300, 100)):
    n = 1
    for s in input_shape:
        n *= int(s)
    return MLP(n, tuple(int(h) for h in hidden), num_classes)


def _cnn1d(input_shape, num_classes, widths: Sequence[int] = (32, 64, 128)):
    if len(input_shape) != 2:
        raise FlowpruneError(f"model 'cnn1d' needs 1-D signals (C, L), got input_shape={tuple(input_shape)}; "
                             "use it with data set 'mnist1d'")
    return CNN1d(int(input_shape[0]), num_classes, tuple(int(w) for w in widths))


def _seq(cell: str) -> Callable[..., nn.Module]:
    def make(input_shape, num_classes, hidden: int = 64, layers: int = 1, bidirectional: bool = False):
        if len(input_shape) != 2:
            raise FlowpruneError(f"model '{cell}1d' needs 1-D signals (C, L), read as L steps of C features; got "
                                 f"input_shape={tuple(input_shape)}; use it with data set 'mnist1d'")
        return SeqRNN(int(input_shape[0]), num_classes, cell, int(hidden), int(layers), bool(bidirectional))
    return make


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": _resnet(20),
    "resnet56": _resnet(56),
    "wrn16_2": _wrn,
    "vgg11": _vgg("vgg11"),
    "vgg8": _vgg("vgg8"),
    "vit": _vit,
    "lenet300": _lenet300,
    "cnn1d": _cnn1d,
    "lstm1d": _seq("lstm"),
    "gru1d": _seq("gru"),
}
MODEL_KINDS = {"resnet20": "cnn", "resnet56": "cnn", "wrn16_2": "cnn", "vgg11": "cnn", "vgg8": "cnn",
               "vit": "vit", "lenet300": "mlp", "cnn1d": "cnn1d", "lstm1d": "rnn1d", "gru1d": "rnn1d"}


def list_models() -> list[str]:
    """Zoo names, plus the ``tv:`` and ``timm:`` prefixes."""
    return sorted(MODELS) + ["tv:NAME", "timm:NAME"]


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.in_channels == in_channels:
                return
            new = nn.Conv2d(in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                            m.groups if m.groups == 1 else in_channels, m.bias is not None)
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], new)
            return


def _torchvision(name: str, input_shape, num_classes, **kwargs):
    try:
        import torchvision
    except ImportError:
        raise FlowpruneError("tv:NAME models need torchvision: pip install 'flowprune[vision]'") from None
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise bad_choice("torchvision model", f"tv:{name}", [f"tv:{n}" for n in known])
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    c = int(input_shape[0]) if len(input_shape) == 3 else 3
    if c != 3:
        _replace_first_conv(model, c)
    return model


def _timm(name: str, input_shape, num_classes, **kwargs):
    try:
        import timm
    except ImportError:
        raise FlowpruneError("timm:NAME models need timm: pip install 'flowprune[vision]'") from None
    if not timm.list_models(name):
        raise FlowpruneError(f"unknown timm model 'timm:{name}'; see timm.list_models() for the allowed names")
    kw = dict(kwargs)
    if len(input_shape) == 3:
        kw.setdefault("in_chans", int(input_shape[0]))
        if any(k in name for k in ("vit", "deit", "swin", "beit", "eva")):
            kw.setdefault("img_size", int(input_shape[1]))
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kw)


def build_model(name: str, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10,
                **kwargs) -> nn.Module:
    """Build a model by name with random weights.

    Args:
        name: a zoo name (``resnet20``, ``resnet56``, ``wrn16_2``, ``vgg11``, ``vgg8``, ``vit``,
            ``lenet300``, ``cnn1d``, ``lstm1d``, ``gru1d``), ``tv:NAME`` (torchvision) or ``timm:NAME``.
        input_shape: one sample's shape without the batch dimension, e.g. ``(1, 28, 28)``.
        num_classes: size of the classifier output.
        kwargs: the model's own options (``width`` for ResNets, ``depth``/``num_heads`` for the ViT...).

    Raises:
        FlowpruneError: unknown name, or an input shape the model cannot take.
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise FlowpruneError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s <= 0 for s in shape):
        raise FlowpruneError(f"input_shape must be positive sizes without the batch dimension, got {input_shape!r}")
    if not isinstance(name, str):
        raise bad_choice("model", name, list_models())
    if name.startswith("tv:"):
        model = _torchvision(name[3:], shape, num_classes, **kwargs)
    elif name.startswith("timm:"):
        model = _timm(name[5:], shape, num_classes, **kwargs)
    elif name in MODELS:
        try:
            model = MODELS[name](shape, num_classes, **kwargs)
        except TypeError as e:
            raise FlowpruneError(f"bad option for model {name!r}: {e}") from None
    else:
        raise bad_choice("model", name, list_models())
    model.flowprune_base = {"name": name, "input_shape": list(shape), "num_classes": num_classes,
                            "kwargs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}}
    return model


def example_input(model_or_shape: nn.Module | Sequence[int], batch_size: int = 1) -> torch.Tensor:
    """A random input batch for a model built by :func:`build_model` (or for an input shape)."""
    if isinstance(model_or_shape, nn.Module):
        base = getattr(model_or_shape, "flowprune_base", None)
        if base is None:
            raise FlowpruneError("model has no flowprune_base; pass its input shape instead, e.g. (3, 32, 32)")
        shape = base["input_shape"]
    else:
        shape = model_or_shape
    return torch.randn(batch_size, *[int(s) for s in shape])


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The model's final classifier: the last ``nn.Linear`` in module order."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise FlowpruneError("model has no nn.Linear classifier; cannot take penultimate features")
    return last


def forward_with_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and penultimate features (the input of the final ``nn.Linear``), in one forward."""
    fc = classifier_layer(model)
    store: dict[str, torch.Tensor] = {}

    def hook(_m, inp, _out):
        store["f"] = inp[0]

    h = fc.register_forward_hook(hook)
    try:
        logits = model(x)
    finally:
        h.remove()
    feats = store["f"]
    if feats.dim() > 2:
        feats = feats.flatten(1)
    return logits, feats
