"""The ``base`` recipe of a model built directly with torchvision or timm (for :func:`flowprune.io.save`).

A model built by :func:`flowprune.build_model` carries ``flowprune_base``. One built with
``torchvision.models.resnet18(num_classes=10)`` or ``timm.create_model("resnet18", ...)`` does
not, but flowprune can build the same architecture as ``tv:resnet18`` / ``timm:resnet18``:

* timm: the name is the model's ``pretrained_cfg["architecture"]``;
* torchvision: the candidates are the registered builders defined in the model class's own module
  (``torchvision.models.resnet`` for a ``ResNet``), each built on the meta device (no memory).

Either way the candidate is built with the model's class count and input channels and must have
exactly the model's parameter and buffer names and shapes; otherwise (a hand-edited model, an
unknown class) :func:`infer_base` raises a FlowpruneError that says how to pass ``base=``.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from flowprune.errors import FlowpruneError

HOW = ("pass base={'name': NAME, 'input_shape': [C, H, W], 'num_classes': N, 'kwargs': {}} to flowprune.save, "
       "where NAME is a model flowprune can build with the same layers (flowprune.list_models(): a zoo name, "
       "'tv:NAME' or 'timm:NAME'), or build the model with flowprune.build_model")


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _in_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return int(m.in_channels)
    return 3


def _num_classes(model: nn.Module) -> int | None:
    from flowprune.models import classifier_layer

    try:
        return int(classifier_layer(model).out_features)
    except Exception:  # noqa: BLE001 -- no recognisable classifier: the caller reports it
        return None


def _matches(name: str, shape: tuple[int, ...], num_classes: int, kwargs: dict, want: dict) -> bool:
    from flowprune.models import build_model

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built = build_model(name, shape, num_classes, **kwargs)
    except Exception:  # noqa: BLE001 -- a candidate that cannot be built this way is not the model
        return False
    return _shapes(built) == want


def _torchvision_names(model: nn.Module) -> list[str]:
    import torchvision

    mod = type(model).__module__
    return [n for n in torchvision.models.list_models(module=torchvision.models)
            if getattr(torchvision.models.get_model_builder(n), "__module__", None) == mod]


def _timm_candidate(model: nn.Module) -> tuple[str, dict, tuple[int, int]] | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    if not isinstance(arch, str):
        return None
    hw = tuple(cfg.get("input_size", (3, 224, 224))[1:])
    kwargs = {}
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img is not None:
        hw = tuple(int(s) for s in img)
        if tuple(cfg.get("input_size", (3, 224, 224))[1:]) != hw:
            kwargs["img_size"] = hw[0]
    return f"timm:{arch}", kwargs, hw


def infer_base(model: nn.Module) -> dict:
    """``{"name", "input_shape", "num_classes", "kwargs"}`` for a torchvision / timm model, or a FlowpruneError."""
    cls = f"{type(model).__module__}.{type(model).__qualname__}"
    family = type(model).__module__.split(".")[0]
    if family not in ("torchvision", "timm"):
        raise FlowpruneError(f"cannot save a model of class {cls} without base: it was not built by "
                             f"flowprune.build_model, torchvision or timm; {HOW}")
    nc = _num_classes(model)
    if nc is None or nc < 2:
        raise FlowpruneError(f"cannot infer base for {cls}: no classifier with >= 2 outputs found; {HOW}")
    c = _in_channels(model)
    want = _shapes(model)
    if family == "timm":
        cand = _timm_candidate(model)
        tries = [] if cand is None else [cand]
    else:
        hw = (int(model.image_size),) * 2 if isinstance(getattr(model, "image_size", None), int) else (224, 224)
        tries = [(f"tv:{n}", {}, hw) for n in _torchvision_names(model)]
    for name, kwargs, hw in tries:
        shape = (c, *hw)
        if _matches(name, shape, nc, kwargs, want):
            return {"name": name, "input_shape": list(shape), "num_classes": nc, "kwargs": kwargs}
    tried = ", ".join(t[0] for t in tries) or "none"
    raise FlowpruneError(f"cannot infer base for {cls}: no {family} model flowprune builds has its layers "
                         f"(tried {tried}; a model changed after it was built, or built with other options); {HOW}")
