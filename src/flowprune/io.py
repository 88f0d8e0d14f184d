"""Save and load models without pickle: safetensors weights plus a JSON recipe.

A saved model is a directory::

    DIR/model.safetensors   every parameter and buffer (safetensors: no code can run on load)
    DIR/model.json          the recipe: the base model (zoo name, input shape, classes, kwargs),
                            the shape-defining attributes of every module (in/out channels,
                            features, num_heads, head_dim...), the modules replaced by the
                            identity (removed layers), free-form metadata (the cuts made,
                            the method, the results) and an integrity record (SHA-256 of the
                            weights file and of the architecture part of the recipe)

:func:`load` rebuilds the base model by name, replaces removed modules by ``nn.Identity``, sets
every recorded attribute, resizes each parameter to its saved shape and loads the weights with
``strict=True``. That covers every structural cut flowprune makes (channels, neurons, heads,
whole blocks) and never unpickles anything: ``torch.load`` of a pickled model runs code from
the file, which this format avoids by construction.

Loading treats the directory as untrusted input (see docs/robustness.md): the recipe is
validated before anything is built (known format version, a registered model name, constructor
options from an allow-list -- never ``pretrained``, paths or URLs --, only registered shape
attributes with values of the type the module already holds), the weights file is checked
against the recorded SHA-256, tensor names and shapes must fit the rebuilt model, and one
forward pass on a zero input must give ``(1, num_classes)`` logits. Whatever is wrong, the
error is a :class:`~flowprune.errors.FlowpruneError` naming the file and the value.

Saving is atomic: both files are written to temporary names and moved into place with
``os.replace``; the previous weights are kept as ``model.safetensors.prev`` until the new
recipe is in place, so a save killed half-way leaves the previous model loadable.

Why not Torch-Pruning's ``tp.state_dict``/``tp.load_state_dict``: they store module ``__dict__``s
with pickle, which is exactly what must not be loaded from an untrusted file.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowprune import __version__
from flowprune.errors import FlowpruneError

FORMAT = "flowprune-model"
FORMAT_VERSION = 1
KNOWN_FORMAT_VERSIONS = (1,)
WEIGHTS_FILE = "model.safetensors"
RECIPE_FILE = "model.json"
PREV_SUFFIX = ".prev"
TMP_SUFFIX = ".tmp"

# Bounds on what a recipe may ask to build (a hostile recipe must not allocate gigabytes).
MAX_RECIPE_BYTES = 64 * 2**20
MAX_INPUT_ELEMENTS = 2**24
MAX_DIM = 65536
MAX_CLASSES = 100_000
MAX_KWARG_INT = 100_000
MAX_KWARG_LIST = 64
MAX_BUILD_ELEMENTS = 2 * 10**9

# Attributes that define a module's shape after a structural cut. Extend with
# :func:`register_shape_attribute` for custom modules.
SHAPE_ATTRIBUTES: set[str] = {
    "in_channels", "out_channels", "in_features", "out_features", "num_features", "groups",
    "num_heads", "head_dim", "embed_dim", "kdim", "vdim", "normalized_shape", "scale", "attn_dim",
    "hidden_features", "num_groups", "num_channels", "dim", "hidden_dim", "inner_dim",
    "hidden_size", "input_size",
}

# Constructor options a recipe may pass to torchvision / timm constructors. Conservative: shape
# and regularisation numbers only. Never weights, pretrained flags, configs, paths or URLs.
TV_TIMM_KWARGS: frozenset[str] = frozenset({
    "in_chans", "img_size", "patch_size", "embed_dim", "depth", "depths", "num_heads", "mlp_ratio",
    "drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate", "dropout",
    "attention_dropout", "width_mult", "width_per_group", "groups", "stochastic_depth_prob",
    "aux_logits", "transform_input", "init_weights", "channels", "dims", "hidden_dim", "mlp_dim",
    "num_layers", "image_size", "qkv_bias", "class_token", "no_embed_class", "reg_tokens",
})
# Names refused whatever the model family says (they fetch weights or read files).
DANGEROUS_KWARGS: frozenset[str] = frozenset({
    "pretrained", "weights", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
    "url", "file", "path", "model_dir", "progress", "num_classes", "input_shape", "features_only",
})


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
        for a in sorted(SHAPE_ATTRIBUTES):
            if a in m.__dict__:  # instance attributes only: properties cannot be set back
                js = _json_safe(m.__dict__[a])
                if js is not None:
                    attrs[a] = js
        modules[name] = {"class": type(m).__name__, "attrs": attrs}
    return modules


def _architecture_digest(recipe: dict) -> str:
    text = json.dumps({"base": recipe.get("base"), "modules": recipe.get("modules")}, sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(model: nn.Module, path: str | os.PathLike, *, metadata: dict | None = None,
         base: dict | None = None) -> Path:
    """Save ``model`` to directory ``path`` (created) as safetensors + JSON recipe; returns the path.

    The save is atomic: a save that is killed or fails half-way leaves the previously saved
    model in ``path`` loadable (see the module docstring).

    Args:
        model: a model built by :func:`flowprune.build_model` (possibly pruned), or any model
            when ``base`` is given.
        metadata: JSON-safe extra information stored in the recipe (method, cuts, results).
        base: ``{"name", "input_shape", "num_classes", "kwargs"}``; defaults to ``model.flowprune_base``,
            else, for a model built directly with torchvision or timm, the ``tv:NAME`` / ``timm:NAME``
            recipe that rebuilds its layers (:func:`flowprune.models.infer.infer_base`; input shape
            ``(C, 224, 224)`` unless the model records its image size). Any other model needs ``base``.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise FlowpruneError(f"model must be a torch nn.Module, got {type(model).__name__}")
    from flowprune.hf.adapter import is_hf_model, unwrap

    if is_hf_model(unwrap(model)):  # save_pretrained files plus the width record (flowprune.hf.io)
        from flowprune.hf import io as hf_io

        return hf_io.save(model, path, metadata=metadata)
    base = base or getattr(model, "flowprune_base", None)
    if base is None:  # built directly with torchvision / timm: the tv:NAME / timm:NAME that rebuilds it
        from flowprune.models.infer import infer_base

        base = infer_base(model)
    out = Path(path)
    if out.suffix == ".json" or out.suffix == ".safetensors":
        out = out.parent
    if out.exists() and not out.is_dir():
        raise FlowpruneError(f"cannot save a model to {str(out)!r}: it exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    recipe = {"format": FORMAT, "format_version": FORMAT_VERSION, "flowprune_version": __version__,
              "base": base, "modules": architecture_record(model),
              "metadata": metadata if metadata is not None else getattr(model, "flowprune_metadata", {})}
    try:
        json.dumps(recipe)
    except (TypeError, ValueError) as e:
        raise FlowpruneError(f"metadata must be JSON-serialisable: {e}") from None
    weights, recipe_path = out / WEIGHTS_FILE, out / RECIPE_FILE
    w_tmp, r_tmp, w_prev = (out / (WEIGHTS_FILE + TMP_SUFFIX), out / (RECIPE_FILE + TMP_SUFFIX),
                            out / (WEIGHTS_FILE + PREV_SUFFIX))
    # 1. both new files under temporary names (a kill here leaves the old pair untouched)
    save_file(tensors, str(w_tmp), metadata={"format": FORMAT})
    _fsync(w_tmp)
    recipe["integrity"] = {"weights_sha256": _sha256_file(w_tmp), "architecture_sha256": _architecture_digest(recipe)}
    r_tmp.write_text(json.dumps(recipe, indent=1))
    _fsync(r_tmp)
    # 2. keep the old weights reachable until the new recipe is in place
    if weights.exists() and recipe_path.exists():
        if w_prev.exists():
            w_prev.unlink()
        try:
            os.link(weights, w_prev)
        except OSError:  # file systems without hard links
            import shutil

            shutil.copyfile(weights, w_prev)
    # 3. move in: weights, then recipe (the commit point), then drop the old weights
    os.replace(w_tmp, weights)
    os.replace(r_tmp, recipe_path)
    if w_prev.exists():
        w_prev.unlink()
    return out


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - best effort
        pass


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
        if not (d / f).is_file():
            raise FlowpruneError(f"{str(d)!r} has no {f}; it is not a saved flowprune model directory")
    return d


def read_json_file(path: Path, what: str, max_bytes: int = MAX_RECIPE_BYTES) -> dict:
    """Parse a JSON object from ``path`` or raise a FlowpruneError that names the file."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise FlowpruneError(f"{path} is {size} bytes; a {what} is at most {max_bytes} bytes")
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except FlowpruneError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FlowpruneError(f"{path} is not a readable {what} (corrupt or truncated JSON: {e})") from None
    if not isinstance(obj, dict):
        raise FlowpruneError(f"{path} is not a {what}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_recipe(path: str | os.PathLike) -> dict:
    """The JSON recipe of a saved model (format checked; see :func:`validate_recipe` for the rest)."""
    d = _resolve(path)
    recipe = read_json_file(d / RECIPE_FILE, "flowprune model recipe")
    if recipe.get("format") != FORMAT:
        raise FlowpruneError(f"{d / RECIPE_FILE} is not a flowprune model recipe (format={recipe.get('format')!r})")
    return recipe


# ---------------------------------------------------------------- recipe validation


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _check_kwarg_value(where: str, model: str, key: str, v: Any, default: Any = None) -> None:
    bad = None
    if isinstance(default, bool) or (default is None and isinstance(v, bool)):
        if not isinstance(v, bool):
            bad = "a boolean"
    elif isinstance(v, bool):
        bad = "a number" if not isinstance(default, (list, tuple)) else "a list of integers"
    elif _is_int(v):
        low = 1 if _is_int(default) else 0  # a size option (default an integer) is at least 1
        if not low <= v <= MAX_KWARG_INT:
            bad = f"an integer in [{low}, {MAX_KWARG_INT}]"
        elif isinstance(default, (list, tuple)):
            bad = "a list of integers"
    elif isinstance(v, float):
        if not (math.isfinite(v) and 0 <= v <= 1e4) or _is_int(default):
            bad = "an integer" if _is_int(default) else "a finite number in [0, 10000]"
        elif isinstance(default, (list, tuple)):
            bad = "a list of integers"
    elif isinstance(v, list):
        if not (1 <= len(v) <= MAX_KWARG_LIST and all(_is_int(i) and 1 <= i <= MAX_KWARG_INT for i in v)):
            bad = f"a list of 1..{MAX_KWARG_LIST} integers in [1, {MAX_KWARG_INT}]"
        elif default is not None and not isinstance(default, (list, tuple)):
            bad = "a number"
    elif v is None:
        if default is not None:
            bad = "not null"
    else:
        bad = "a number, a boolean or a list of integers"
    if bad is not None:
        raise FlowpruneError(f"{where}: base.kwargs[{key!r}] of model {model!r} must be {bad}, got {v!r}")


def _allowed_kwargs(name: str) -> dict[str, Any]:
    """Allowed constructor options of a model name -> their default (None when unknown)."""
    from flowprune.models import MODELS

    if name in MODELS:
        out = {}
        for p in inspect.signature(MODELS[name]).parameters.values():
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.name in DANGEROUS_KWARGS:
                continue
            if p.name in ("input_shape", "num_classes"):
                continue
            out[p.name] = None if p.default is inspect.Parameter.empty else p.default
        return out
    return {k: None for k in TV_TIMM_KWARGS - DANGEROUS_KWARGS}


def _check_model_name(where: str, name: Any) -> None:
    from flowprune.errors import bad_choice
    from flowprune.models import MODELS, list_models

    if not isinstance(name, str) or not name:
        raise FlowpruneError(f"{where}: base.name must be a model name, got {name!r}")
    if name in MODELS:
        return
    if name.startswith("tv:"):
        try:
            import torchvision
        except ImportError:
            raise FlowpruneError(f"{where}: model {name!r} needs torchvision: pip install 'flowprune[vision]'") from None
        if name[3:] not in torchvision.models.list_models(module=torchvision.models):
            raise FlowpruneError(f"{where}: unknown torchvision model {name!r} in base.name")
        return
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError:
            raise FlowpruneError(f"{where}: model {name!r} needs timm: pip install 'flowprune[vision]'") from None
        n = name[5:]
        if any(c in n for c in "*?[]") or n not in set(timm.list_models()):
            raise FlowpruneError(f"{where}: unknown timm model {name!r} in base.name (an exact timm.list_models() "
                                 "name is needed)")
        return
    e = bad_choice("model", name, list_models())
    raise FlowpruneError(f"{where}: base.name: {e}")


def validate_recipe(recipe: Any, where: str | os.PathLike = "") -> dict:
    """Check a model recipe before anything is built; returns it, or raises FlowpruneError.

    Checks: the format and a known ``format_version``; ``base.name`` a registered model;
    ``input_shape`` and ``num_classes`` positive and bounded; ``base.kwargs`` only options the
    model family allows (zoo: the constructor's own keywords; ``tv:``/``timm:``
    :data:`TV_TIMM_KWARGS`), never ``pretrained``/weights/paths/URLs, with numbers, booleans or
    lists of integers as values; ``modules`` maps module names to a class name and attributes
    from :data:`SHAPE_ATTRIBUTES` whose values are integers, finite numbers, booleans or lists
    of integers.
    """
    w = str(where) or "model recipe"
    if not isinstance(recipe, dict):
        raise FlowpruneError(f"{w}: the recipe must be a JSON object, got {type(recipe).__name__}")
    if recipe.get("format") != FORMAT:
        raise FlowpruneError(f"{w}: not a flowprune model recipe (format={recipe.get('format')!r})")
    ver = recipe.get("format_version")
    if not _is_int(ver) or ver not in KNOWN_FORMAT_VERSIONS:
        raise FlowpruneError(f"{w}: unknown format_version {ver!r}; this flowprune ({__version__}) reads "
                             f"{', '.join(map(str, KNOWN_FORMAT_VERSIONS))}")
    base = recipe.get("base")
    if not isinstance(base, dict):
        raise FlowpruneError(f"{w}: base must be an object with name, input_shape, num_classes, kwargs; got {base!r}")
    extra = set(base) - {"name", "input_shape", "num_classes", "kwargs"}
    if extra:
        raise FlowpruneError(f"{w}: unknown base entries {sorted(extra)}; allowed: input_shape, kwargs, name, "
                             "num_classes")
    name = base.get("name")
    _check_model_name(w, name)
    shape = base.get("input_shape")
    if (not isinstance(shape, list) or not 1 <= len(shape) <= 4
            or not all(_is_int(s) and 1 <= s <= MAX_DIM for s in shape) or math.prod(shape) > MAX_INPUT_ELEMENTS):
        raise FlowpruneError(f"{w}: base.input_shape must be a list of 1..4 positive sizes (at most "
                             f"{MAX_INPUT_ELEMENTS} elements in all), got {shape!r}")
    nc = base.get("num_classes")
    if not _is_int(nc) or not 2 <= nc <= MAX_CLASSES:
        raise FlowpruneError(f"{w}: base.num_classes must be an integer in [2, {MAX_CLASSES}], got {nc!r}")
    kwargs = base.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise FlowpruneError(f"{w}: base.kwargs must be an object, got {kwargs!r}")
    allowed = _allowed_kwargs(name)
    for k, v in kwargs.items():
        if k in DANGEROUS_KWARGS or k not in allowed:
            raise FlowpruneError(f"{w}: base.kwargs[{k!r}] is not an allowed option of model {name!r}; allowed: "
                                 f"{', '.join(sorted(allowed)) or 'none'}")
        _check_kwarg_value(w, name, k, v, allowed[k])
    modules = recipe.get("modules", {})
    if not isinstance(modules, dict):
        raise FlowpruneError(f"{w}: modules must be an object (module name -> class and attributes)")
    for mname, info in modules.items():
        if not isinstance(info, dict) or not isinstance(info.get("class"), str):
            raise FlowpruneError(f"{w}: modules[{mname!r}] must be an object with a 'class' name, got {info!r}")
        if mname and not all(_MODULE_PART.fullmatch(part) for part in mname.split(".")):
            raise FlowpruneError(f"{w}: modules: {mname!r} is not a module path")
        attrs = info.get("attrs", {})
        if not isinstance(attrs, dict):
            raise FlowpruneError(f"{w}: modules[{mname!r}].attrs must be an object, got {attrs!r}")
        for a, v in attrs.items():
            if a not in SHAPE_ATTRIBUTES:
                raise FlowpruneError(f"{w}: modules[{mname!r}].attrs[{a!r}] is not a registered shape attribute; "
                                     "allowed: " + ", ".join(sorted(SHAPE_ATTRIBUTES)))
            _check_attr_value(w, mname, a, v)
    meta = recipe.get("metadata", {})
    if not isinstance(meta, dict):
        raise FlowpruneError(f"{w}: metadata must be an object, got {type(meta).__name__}")
    return recipe


# a module path part: Python identifiers, list indices, and the dashed names some libraries give children
# (torchvision RegNet's ``block1-0``); names are only looked up in ``named_modules``, never evaluated
_MODULE_PART = re.compile(r"[A-Za-z0-9_\-]{1,128}")


def _check_attr_value(w: str, mname: str, a: str, v: Any) -> None:
    raw = v["__tuple__"] if isinstance(v, dict) and set(v) == {"__tuple__"} else v
    ok = False
    if isinstance(raw, bool):
        ok = True
    elif _is_int(raw):
        ok = -64 <= raw <= 10**7  # small negatives: a dimension index such as Softmax(dim=-1)
    elif isinstance(raw, float):
        ok = math.isfinite(raw)
    elif isinstance(raw, list):
        ok = len(raw) <= 8 and all(_is_int(i) and 0 <= i <= 10**7 for i in raw)
    elif isinstance(raw, str):  # recorded as found; rebuild only accepts the value the module already has
        ok = len(raw) <= 64
    if not ok:
        raise FlowpruneError(f"{w}: modules[{mname!r}].attrs[{a!r}] must be an integer, a finite number, a boolean "
                             f"or a tuple of integers, got {v!r}")


def _compatible(old: Any, new: Any) -> bool:
    """Whether ``new`` may replace attribute value ``old`` (same kind of value)."""
    if isinstance(old, str) or isinstance(new, str):
        return old == new
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if _is_int(old):
        return _is_int(new) and (new >= 1 if old >= 1 else new == old)
    if isinstance(old, float):
        return _is_number(new)
    if isinstance(old, (tuple, list)):
        return isinstance(new, (tuple, list)) and len(new) == len(old) and all(_is_int(i) and i >= 1 for i in new)
    return False


def _check_build_size(base: dict, where: str) -> None:
    """Build the base on the meta device (no memory) and refuse absurd sizes before the real build."""
    from flowprune.models import build_model

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = build_model(base["name"], base["input_shape"], base["num_classes"], **base.get("kwargs", {}))
    except FlowpruneError as e:
        raise FlowpruneError(f"{where}: {e}") from None
    except Exception:  # some constructors cannot run on the meta device; the real build is bounded anyway
        return
    n = sum(t.numel() for t in m.parameters()) + sum(t.numel() for t in m.buffers())
    if n > MAX_BUILD_ELEMENTS:
        raise FlowpruneError(f"{where}: the recipe's base model {base['name']!r} with kwargs {base.get('kwargs')} "
                             f"has {n} parameters; at most {MAX_BUILD_ELEMENTS} are allowed")


def rebuild(recipe: dict, shapes: dict[str, tuple[int, ...]], *, where: str | os.PathLike = "") -> nn.Module:
    """Build the architecture a recipe describes, with parameters of the given shapes (uninitialised).

    The recipe is validated first (:func:`validate_recipe`); every problem is a FlowpruneError.
    """
    from flowprune.models import build_model

    w = str(where) or "model recipe"
    validate_recipe(recipe, w)
    base = recipe["base"]
    _check_build_size(base, w)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constructor chatter must not reach the user as extra lines
            model = build_model(base["name"], base["input_shape"], base["num_classes"], **base.get("kwargs", {}))
    except FlowpruneError as e:
        raise FlowpruneError(f"{w}: {e}") from None
    except Exception as e:  # the constructor refused an allowed-looking option
        raise FlowpruneError(f"{w}: model {base['name']!r} cannot be built with base.kwargs "
                             f"{base.get('kwargs')}: {type(e).__name__}: {e}") from None
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
    # 2. shape attributes: only registered names the module already holds, with a value of the same kind
    present = dict(model.named_modules())
    for name, info in modules.items():
        m = present.get(name)
        if m is None:
            continue
        _upgrade_class(m, info["class"])
        for a, v in info.get("attrs", {}).items():
            if a not in m.__dict__:
                continue
            new = _from_json(v)
            old = m.__dict__[a]
            if not _compatible(old, new):
                raise FlowpruneError(f"{w}: modules[{name!r}].attrs[{a!r}] = {v!r} does not fit the module's "
                                     f"{type(m).__name__}.{a} (a {type(old).__name__} like {old!r})")
            if isinstance(old, tuple) and isinstance(new, list):
                new = tuple(new)
            if isinstance(old, float):
                new = float(new)
            m.__dict__[a] = new
    # 3. parameter and buffer shapes
    for key, shape in shapes.items():
        mod_name, _, leaf = key.rpartition(".")
        try:
            m = model.get_submodule(mod_name) if mod_name else model
        except AttributeError:
            raise FlowpruneError(f"{w}: saved tensor {key!r} has no module in the rebuilt {base['name']!r}; "
                                 "the recipe and the weights do not belong together") from None
        if leaf in m._parameters and m._parameters[leaf] is not None:
            old = m._parameters[leaf]
            if tuple(old.shape) != tuple(shape):
                if len(old.shape) != len(shape):
                    raise FlowpruneError(f"{w}: saved tensor {key!r} has {len(shape)} dimensions {tuple(shape)}; "
                                         f"the model's has {len(old.shape)} {tuple(old.shape)}")
                m._parameters[leaf] = nn.Parameter(torch.empty(shape, dtype=old.dtype), requires_grad=old.requires_grad)
        elif leaf in m._buffers and m._buffers[leaf] is not None:
            old = m._buffers[leaf]
            if tuple(old.shape) != tuple(shape):
                if len(old.shape) != len(shape):
                    raise FlowpruneError(f"{w}: saved tensor {key!r} has {len(shape)} dimensions {tuple(shape)}; "
                                         f"the model's has {len(old.shape)} {tuple(old.shape)}")
                m._buffers[leaf] = torch.empty(shape, dtype=old.dtype)
    for m in model.modules():
        if isinstance(m, nn.RNNBase):  # its flat weight list still points at the parameters replaced above
            m._init_flat_weights()
    return model


def _upgrade_class(m: nn.Module, saved: str) -> None:
    """A module a cut turned into a flowprune subclass gets that class back (only these known pairs)."""
    if saved == "PrunedMultiheadAttention" and type(m) is nn.MultiheadAttention:
        from flowprune.mha import PrunedMultiheadAttention

        PrunedMultiheadAttention.adopt(m)


def _check_shapes(model: nn.Module, where: str) -> None:
    """Every conv / linear / norm layer's weights must agree with its own attributes."""
    for name, m in model.named_modules():
        wt = getattr(m, "weight", None) if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd,
                                                            nn.modules.batchnorm._NormBase, nn.LayerNorm)) else None
        if not isinstance(wt, torch.Tensor):
            continue
        if isinstance(m, nn.Linear):
            want = (m.out_features, m.in_features)
        elif isinstance(m, nn.modules.conv._ConvNd):
            if m.groups < 1 or m.in_channels % m.groups or m.out_channels % m.groups:
                raise FlowpruneError(f"{where}: module {name!r}: groups={m.groups} does not divide its channels")
            if m.transposed:
                want = (m.in_channels, m.out_channels // m.groups, *m.kernel_size)
            else:
                want = (m.out_channels, m.in_channels // m.groups, *m.kernel_size)
        elif isinstance(m, nn.LayerNorm):
            want = tuple(m.normalized_shape)
        else:
            want = (m.num_features,)
        if tuple(wt.shape) != tuple(want):
            raise FlowpruneError(f"{where}: module {name!r} ({type(m).__name__}) has weights of shape "
                                 f"{tuple(wt.shape)} but its recipe says {tuple(want)}")


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Load a model saved by :func:`save` (directory, or its ``model.json``/``model.safetensors``).

    Nothing is unpickled and nothing but ``model.json`` and ``model.safetensors`` (or the
    ``.prev`` copy an interrupted save left) is read. The returned model is in eval mode and
    carries ``flowprune_base`` and ``flowprune_metadata``.

    Raises:
        FlowpruneError: whatever is wrong with the directory (missing, corrupt, truncated or
            edited files, a recipe asking for something not allowed).
    """
    from flowprune.hf import io as hf_io

    if hf_io.is_saved_hf(path):  # a Hugging Face model (flowprune.hf.io)
        return hf_io.load(path, device=device)
    d = _resolve(path)
    recipe = read_recipe(d)
    validate_recipe(recipe, d / RECIPE_FILE)
    data = _read_weights(d, recipe)
    tensors = _parse_safetensors(data, d / WEIGHTS_FILE)
    return model_from_tensors(recipe, tensors, where=d, device=device)


def _read_weights(d: Path, recipe: dict) -> bytes:
    """The weights file's bytes, checked against the recipe's SHA-256 when it records one."""
    integ = recipe.get("integrity")
    if integ is None:
        return _read_bytes(d / WEIGHTS_FILE)
    if not isinstance(integ, dict) or not all(isinstance(integ.get(k), str) for k in
                                              ("weights_sha256", "architecture_sha256")):
        raise FlowpruneError(f"{d / RECIPE_FILE}: integrity must hold weights_sha256 and architecture_sha256 strings")
    if _architecture_digest(recipe) != integ["architecture_sha256"]:
        raise FlowpruneError(f"{d / RECIPE_FILE}: the base/modules part of the recipe was changed after saving "
                             "(its SHA-256 does not match integrity.architecture_sha256); re-save the model")
    want = integ["weights_sha256"]
    for f in (d / WEIGHTS_FILE, d / (WEIGHTS_FILE + PREV_SUFFIX)):
        if not f.is_file():
            continue
        data = _read_bytes(f)
        if hashlib.sha256(data).hexdigest() == want:
            return data
    raise FlowpruneError(f"{d / WEIGHTS_FILE} is corrupt, truncated or from another save: its SHA-256 does not "
                         f"match the recipe's integrity.weights_sha256")


def _read_bytes(f: Path) -> bytes:
    try:
        return f.read_bytes()
    except OSError as e:
        raise FlowpruneError(f"{f} cannot be read: {e}") from None


def _parse_safetensors(data: bytes, where: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as st_load

    if len(data) < 8:
        raise FlowpruneError(f"{where} is truncated ({len(data)} bytes): not a safetensors file")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > min(len(data) - 8, 100 * 2**20):
        raise FlowpruneError(f"{where} is corrupt or truncated: its header claims {header_len} bytes, the file has "
                             f"{len(data)}")
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own SafetensorError (and others) on bad files
        raise FlowpruneError(f"{where} is not a valid safetensors file (corrupt or truncated): "
                             f"{type(e).__name__}: {e}") from None
    return tensors


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing, corrupt or truncated file is a FlowpruneError naming it."""
    p = Path(path)
    return _parse_safetensors(_read_bytes(p), p)


def model_from_tensors(recipe: dict, tensors: dict[str, torch.Tensor], *, where: str | os.PathLike = "",
                       device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the recipe's architecture, load ``tensors`` into it strictly, check it, tag it (eval mode).

    Raises FlowpruneError if the recipe is not allowed, the tensors do not fit it, or one forward
    pass on a zero input does not give ``(1, num_classes)`` logits.
    """
    w = str(where) or "model"
    for k, v in tensors.items():
        if not (v.is_floating_point() or v.dtype in (torch.int64, torch.int32, torch.bool, torch.uint8)):
            raise FlowpruneError(f"{w}: saved tensor {k!r} has dtype {v.dtype}; expected floats (or integer counters)")
    model = rebuild(recipe, {k: tuple(v.shape) for k, v in tensors.items()}, where=where)
    try:
        # the rebuilt model's own per-module state-dict versions (``_metadata``): a plain dict has none,
        # and some modules refuse to load without one (torchvision MNASNet: "version should be set to 1 or 2")
        sd = OrderedDict(tensors)
        sd._metadata = getattr(model.state_dict(), "_metadata", OrderedDict())  # type: ignore[attr-defined]
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except Exception as e:
        raise FlowpruneError(f"{w}: weights do not fit the recipe: {type(e).__name__}: {str(e)[:300]}") from None
    if missing or unexpected:
        raise FlowpruneError(f"{w}: weights do not fit the recipe (missing {missing[:5]}, unexpected {unexpected[:5]})")
    _check_shapes(model, w)
    base = recipe["base"]
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *base["input_shape"]))
    except Exception as e:
        raise FlowpruneError(f"{w}: the rebuilt model does not run on an input of shape {tuple(base['input_shape'])} "
                             f"(recipe and weights do not fit together): {type(e).__name__}: {str(e)[:300]}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, base["num_classes"]):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise FlowpruneError(f"{w}: the rebuilt model gives outputs of shape {got}, not (1, {base['num_classes']})")
    model.flowprune_base = base
    model.flowprune_metadata = recipe.get("metadata", {})
    return model.to(device).eval()
