"""Save and load models without pickle: safetensors weights plus a JSON recipe.

A saved model is a directory::

    DIR/model.safetensors   every parameter and buffer (safetensors: no code can run on load)
    DIR/model.json          the recipe: the base model (zoo name, input shape, classes, kwargs),
                            the shape-defining attributes of every module (in/out channels,
                            features, num_heads, head_dim...), the modules replaced by the
                            identity (removed layers), and free-form metadata (the cuts made,
                            the method, the results)

:func:`load` rebuilds the base model by name, replaces removed modules by ``nn.Identity``, sets
every recorded attribute, resizes each parameter to its saved shape and loads the weights with
``strict=True``. That covers every structural cut flowprune makes (channels, neurons, heads,
whole blocks) and never unpickles anything: ``torch.load`` of a pickled model runs code from
the file, which this format avoids by construction.

Why not Torch-Pruning's ``tp.state_dict``/``tp.load_state_dict``: they store module ``__dict__``s
with pickle, which is exactly what must not be loaded from an untrusted file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowprune import __version__
from flowprune.errors import FlowpruneError

FORMAT = "flowprune-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
RECIPE_FILE = "model.json"

# Attributes that define a module's shape after a structural cut. Extend with
# :func:`register_shape_attribute` for custom modules.
SHAPE_ATTRIBUTES: set[str] = {
    "in_channels", "out_channels", "in_features", "out_features", "num_features", "groups",
    "num_heads", "head_dim", "embed_dim", "kdim", "vdim", "normalized_shape", "scale", "attn_dim",
    "hidden_features", "num_groups", "num_channels", "dim", "hidden_dim", "inner_dim",
}


def register_shape_attribute(name: str) -> None:
    """Record attribute ``name`` of every module in saved recipes (for custom module classes)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise FlowpruneError(f"shape attribute name must be an identifier, got {name!r}")
    SHAPE_ATTRIBUTES.add(name)


def _json_safe(v: Any) -> Any | None:
    if isinstance(v, bool) or isinstance(v, (int, float, str)):
        return v
    if isinstance(v, (tuple, list)) and all(isinstance(i, (int, float)) and not isinstance(i, bool) for i in v):
        return {"__tuple__": list(v)} if isinstance(v, tuple) else list(v)
    return None


def _from_json(v: Any) -> Any:
    if isinstance(v, dict) and "__tuple__" in v:
        return tuple(v["__tuple__"])
    return v


def architecture_record(model: nn.Module) -> dict:
    """The JSON-safe description of every module's class and shape-defining attributes."""
    modules = {}
    for name, m in model.named_modules():
        attrs = {}
        for a in SHAPE_ATTRIBUTES:
            if a in m.__dict__:  # instance attributes only: properties cannot be set back
                js = _json_safe(m.__dict__[a])
                if js is not None:
                    attrs[a] = js
        modules[name] = {"class": type(m).__name__, "attrs": attrs}
    return modules


def save(model: nn.Module, path: str | os.PathLike, *, metadata: dict | None = None,
         base: dict | None = None) -> Path:
    """Save ``model`` to directory ``path`` (created) as safetensors + JSON recipe; returns the path.

    Args:
        model: a model built by :func:`flowprune.build_model` (possibly pruned), or any model
            when ``base`` is given.
        metadata: JSON-safe extra information stored in the recipe (method, cuts, results).
        base: ``{"name", "input_shape", "num_classes", "kwargs"}``; defaults to ``model.flowprune_base``.
    """
    from safetensors.torch import save_file

    base = base or getattr(model, "flowprune_base", None)
    if base is None:
        raise FlowpruneError("the model has no flowprune_base: build it with flowprune.build_model(...) "
                             "or pass base={'name':..., 'input_shape':..., 'num_classes':..., 'kwargs':{}}")
    out = Path(path)
    if out.suffix == ".json" or out.suffix == ".safetensors":
        out = out.parent
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    recipe = {"format": FORMAT, "format_version": FORMAT_VERSION, "flowprune_version": __version__,
              "base": base, "modules": architecture_record(model),
              "metadata": metadata if metadata is not None else getattr(model, "flowprune_metadata", {})}
    try:
        json.dumps(recipe)
    except TypeError as e:
        raise FlowpruneError(f"metadata must be JSON-serialisable: {e}") from None
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
    tmp = out / (RECIPE_FILE + ".tmp")
    tmp.write_text(json.dumps(recipe, indent=1))
    os.replace(tmp, out / RECIPE_FILE)
    return out


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        d = p
    elif p.suffix in (".json", ".safetensors") and p.exists():
        d = p.parent
    else:
        raise FlowpruneError(f"{str(p)!r} is not a saved flowprune model: expected a directory holding "
                             f"{RECIPE_FILE} and {WEIGHTS_FILE} (as written by `flowprune train --out DIR`)")
    for f in (RECIPE_FILE, WEIGHTS_FILE):
        if not (d / f).exists():
            raise FlowpruneError(f"{str(d)!r} has no {f}; it is not a saved flowprune model directory")
    return d


def read_recipe(path: str | os.PathLike) -> dict:
    """The JSON recipe of a saved model."""
    d = _resolve(path)
    recipe = json.loads((d / RECIPE_FILE).read_text())
    if recipe.get("format") != FORMAT:
        raise FlowpruneError(f"{d / RECIPE_FILE} is not a flowprune model recipe (format={recipe.get('format')!r})")
    return recipe


def rebuild(recipe: dict, shapes: dict[str, tuple[int, ...]]) -> nn.Module:
    """Build the architecture a recipe describes, with parameters of the given shapes (uninitialised)."""
    from flowprune.models import build_model

    base = recipe["base"]
    model = build_model(base["name"], base["input_shape"], base["num_classes"], **base.get("kwargs", {}))
    modules = recipe.get("modules", {})
    # 1. modules removed (replaced by the identity), shallowest first
    for name in sorted(modules, key=lambda n: n.count(".")):
        info = modules[name]
        if not name or info["class"] != "Identity":
            continue
        try:
            current = model.get_submodule(name)
        except AttributeError:
            continue
        if not isinstance(current, nn.Identity):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, nn.Identity())
    # 2. shape attributes
    present = dict(model.named_modules())
    for name, info in modules.items():
        m = present.get(name)
        if m is None:
            continue
        for a, v in info.get("attrs", {}).items():
            try:
                setattr(m, a, _from_json(v))
            except (AttributeError, TypeError):
                pass
    # 3. parameter and buffer shapes
    for key, shape in shapes.items():
        mod_name, _, leaf = key.rpartition(".")
        try:
            m = model.get_submodule(mod_name) if mod_name else model
        except AttributeError:
            raise FlowpruneError(f"saved tensor {key!r} has no module in the rebuilt {base['name']!r}; "
                                 "the recipe and the weights do not belong together") from None
        if leaf in m._parameters and m._parameters[leaf] is not None:
            old = m._parameters[leaf]
            if tuple(old.shape) != tuple(shape):
                m._parameters[leaf] = nn.Parameter(torch.empty(shape, dtype=old.dtype), requires_grad=old.requires_grad)
        elif leaf in m._buffers and m._buffers[leaf] is not None:
            old = m._buffers[leaf]
            if tuple(old.shape) != tuple(shape):
                m._buffers[leaf] = torch.empty(shape, dtype=old.dtype)
    return model


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Load a model saved by :func:`save` (directory, or its ``model.json``/``model.safetensors``).

    Nothing is unpickled. The returned model is in eval mode and carries ``flowprune_base`` and
    ``flowprune_metadata``.
    """
    from safetensors.torch import load_file

    d = _resolve(path)
    recipe = read_recipe(d)
    tensors = load_file(str(d / WEIGHTS_FILE), device="cpu")
    return model_from_tensors(recipe, tensors, where=d, device=device)


def model_from_tensors(recipe: dict, tensors: dict[str, torch.Tensor], *, where: str | os.PathLike = "",
                       device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the recipe's architecture, load ``tensors`` into it strictly, and tag it (eval mode)."""
    model = rebuild(recipe, {k: tuple(v.shape) for k, v in tensors.items()})
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise FlowpruneError(f"{where}: weights do not fit the recipe (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.flowprune_base = recipe["base"]
    model.flowprune_metadata = recipe.get("metadata", {})
    return model.to(device).eval()
