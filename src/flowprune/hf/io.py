"""Pruned Hugging Face models on disk: ``save_pretrained`` files plus a validated width record.

A saved directory::

    DIR/config.json          the model's config (written by ``save_pretrained``; dense widths)
    DIR/model.safetensors    the pruned weights under the model's parameter names (safetensors,
                             no pickle; a weight tied to another is stored once)
    DIR/flowprune_hf.json    the record: the model class, every unit's width (attention
                             key/value groups, MLP neurons; layers may differ), metadata (the
                             cuts made) and the SHA-256 of the weights and the config

:func:`load` (also :func:`flowprune.io.load`, and :func:`from_pretrained`) rebuilds it offline
and without pickle: the record is validated, the class must be a ``transformers``
``PreTrainedModel`` exported by the library (no remote code), the config is read as JSON by the
class's own config class, the model is built from it, every unit is cut to its recorded width
by the same surgery that pruned it (:mod:`flowprune.hf.units`), the weights are loaded strictly
(only weights tied to a loaded one, such as an LM head tied to the embedding, may be absent)
and one forward pass on a zero input must run. A plain ``AutoModel.from_pretrained(DIR)`` of a
pruned directory fails on the shapes (its config holds the dense widths): the width record is
what makes the directory loadable, so use ``flowprune.hf.from_pretrained(DIR)``.

This module reads its files itself (it sits below :mod:`flowprune.io`, which dispatches here).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from flowprune._version import __version__
from flowprune.errors import FlowpruneError
from flowprune.hf.adapter import TensorIO, is_hf_model, unwrap
from flowprune.hf.units import find_hf_units

RECORD_FILE = "flowprune_hf.json"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "flowprune-hf"
FORMAT_VERSION = 1
MAX_JSON_BYTES = 16 * 2**20
MAX_WIDTH = 1_000_000
KINDS = ("head", "neuron")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def widths_of(model: nn.Module) -> dict[str, int]:
    """``{unit name: width}`` of every head and neuron unit of a Hugging Face model."""
    return {u.name: int(u.size) for u in find_hf_units(model, KINDS, set(), config=getattr(model, "config", None))}


def save(model: nn.Module, path: str | os.PathLike, *, metadata: dict | None = None) -> Path:
    """Write ``model`` (a ``PreTrainedModel``, pruned or not) to directory ``path``; returns it."""
    hf = unwrap(model)
    if not is_hf_model(hf):
        raise FlowpruneError(f"flowprune.hf.save takes a transformers PreTrainedModel, got {type(hf).__name__}")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise FlowpruneError(f"cannot save a model to {str(out)!r}: it exists and is not a directory")
    meta = metadata if metadata is not None else getattr(model, "flowprune_metadata", None) or {}
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "flowprune_version": __version__,
              "architecture": type(hf).__name__, "widths": widths_of(hf), "metadata": meta}
    try:
        json.dumps(record)
    except (TypeError, ValueError) as e:
        raise FlowpruneError(f"metadata must be JSON-serialisable: {e}") from None
    from safetensors.torch import save_model

    hf.save_pretrained(str(out))  # config.json (+ generation_config.json)
    # the weights under the model's own parameter names (save_pretrained may rename some to a legacy
    # checkpoint layout, which only its own loader maps back); tied duplicates stored once
    save_model(hf, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    record["integrity"] = {"weights_sha256": _sha256(out / WEIGHTS_FILE), "config_sha256": _sha256(out / CONFIG_FILE)}
    tmp = out / (RECORD_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, out / RECORD_FILE)
    return out


def is_saved_hf(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by :func:`save`."""
    p = Path(path)
    return p.is_dir() and (p / RECORD_FILE).is_file()


def _read_json(path: Path, what: str) -> dict:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise FlowpruneError(f"{path} is larger than {MAX_JSON_BYTES} bytes; not a {what}")
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except FlowpruneError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FlowpruneError(f"{path} is not a readable {what}: {e}") from None
    if not isinstance(obj, dict):
        raise FlowpruneError(f"{path} is not a {what}: expected a JSON object")
    return obj


def read_record(d: Path) -> dict:
    """The validated width record of directory ``d`` (format, class, widths, integrity)."""
    f = d / RECORD_FILE
    rec = _read_json(f, "flowprune Hugging Face record")
    if rec.get("format") != FORMAT or rec.get("format_version") != FORMAT_VERSION:
        raise FlowpruneError(f"{f}: format must be {FORMAT!r} version {FORMAT_VERSION}, got "
                             f"{rec.get('format')!r} version {rec.get('format_version')!r}")
    arch = rec.get("architecture")
    if not isinstance(arch, str) or not arch.isidentifier():
        raise FlowpruneError(f"{f}: architecture must be a transformers class name, got {arch!r}")
    widths = rec.get("widths")
    if not isinstance(widths, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                               and 1 <= v <= MAX_WIDTH for k, v in widths.items()):
        raise FlowpruneError(f"{f}: widths must map unit names to integers in [1, {MAX_WIDTH}]")
    integ = rec.get("integrity")
    if not isinstance(integ, dict):
        raise FlowpruneError(f"{f}: integrity (weights_sha256, config_sha256) is missing")
    for key, name in (("weights_sha256", WEIGHTS_FILE), ("config_sha256", CONFIG_FILE)):
        if not (d / name).is_file():
            raise FlowpruneError(f"{d} has no {name}; it is not a saved flowprune Hugging Face model")
        if _sha256(d / name) != integ.get(key):
            raise FlowpruneError(f"{d / name} was changed after saving (its SHA-256 does not match {f}'s "
                                 f"integrity.{key}); re-save the model")
    return rec


def model_class(arch: str, where: Path) -> type:
    """The transformers class ``arch``: a ``PreTrainedModel`` exported by the library itself."""
    try:
        import transformers
    except ImportError:
        raise FlowpruneError("loading a Hugging Face model needs transformers: pip install 'flowprune[hf]'") from None
    cls = getattr(transformers, arch, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
            and cls.__module__.startswith("transformers.")):
        raise FlowpruneError(f"{where}: architecture {arch!r} is not a PreTrainedModel class of the installed "
                             f"transformers {transformers.__version__}")
    return cls


def apply_widths(model: nn.Module, widths: dict[str, int], where: str = "") -> None:
    """Cut every unit of ``model`` down to ``widths[name]`` (keeping its first units), in place."""
    by = {u.name: u for u in find_hf_units(model, KINDS, set(), config=getattr(model, "config", None))}
    for name, w in widths.items():
        u = by.get(name)
        if u is None:
            raise FlowpruneError(f"{where}: unit {name!r} of the width record is not a unit of the rebuilt model")
        if w > u.size:
            raise FlowpruneError(f"{where}: unit {name!r} has width {w} in the record, more than the config's {u.size}")
        if w < u.size:
            u.apply_cut(range(w, u.size))


def dummy_input(model: nn.Module) -> torch.Tensor:
    """A zero input of the model's main input kind (token ids, pixels or audio features)."""
    cfg, name = model.config, model.main_input_name
    if name == "pixel_values":
        vcfg = getattr(cfg, "vision_config", None) or cfg
        size = vcfg.image_size if isinstance(vcfg.image_size, int) else vcfg.image_size[0]
        return torch.zeros(1, getattr(vcfg, "num_channels", 3), size, size)
    if name == "input_features":
        return torch.zeros(1, cfg.num_mel_bins, 2 * cfg.max_source_positions)
    return torch.zeros(1, 4, dtype=torch.long)


def _load_weights(model: nn.Module, d: Path) -> None:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(d / WEIGHTS_FILE))
    except Exception as e:  # safetensors raises its own error types on bad files
        raise FlowpruneError(f"{d / WEIGHTS_FILE} is not a valid safetensors file: {type(e).__name__}: {e}") from None
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:
        raise FlowpruneError(f"{d}: the weights do not fit the rebuilt model: {str(e)[:300]}") from None
    loaded = {id(p) for k, p in model.named_parameters(remove_duplicate=False) if k in tensors}
    params = dict(model.named_parameters(remove_duplicate=False))
    untied = [k for k in missing if k not in params or id(params[k]) not in loaded]
    if untied or unexpected:
        raise FlowpruneError(f"{d}: the weights do not fit the rebuilt model (missing {untied[:5]}, "
                             f"unexpected {unexpected[:5]})")


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model written by :func:`save` (eval mode), offline and without pickle."""
    d = Path(path)
    if not is_saved_hf(d):
        raise FlowpruneError(f"{str(d)!r} is not a saved flowprune Hugging Face model (no {RECORD_FILE})")
    rec = read_record(d)
    cls = model_class(rec["architecture"], d / RECORD_FILE)
    cfg_dict = _read_json(d / CONFIG_FILE, "transformers config")
    if cfg_dict.get("model_type") != cls.config_class.model_type:
        raise FlowpruneError(f"{d / CONFIG_FILE}: model_type {cfg_dict.get('model_type')!r} does not fit "
                             f"{rec['architecture']} ({cls.config_class.model_type!r})")
    try:
        config = cls.config_class.from_dict(cfg_dict)
        model = cls._from_config(config)
    except Exception as e:  # a config transformers refuses: one clear error
        raise FlowpruneError(f"{d / CONFIG_FILE}: transformers cannot build {rec['architecture']} from it: "
                             f"{type(e).__name__}: {str(e)[:300]}") from None
    apply_widths(model, rec["widths"], str(d / RECORD_FILE))
    _load_weights(model, d)
    model.eval()
    try:
        with torch.no_grad():
            TensorIO(model)(dummy_input(model))
    except Exception as e:
        raise FlowpruneError(f"{d}: the rebuilt model does not run on a zero input: {type(e).__name__}: "
                             f"{str(e)[:300]}") from None
    model.flowprune_metadata = rec.get("metadata", {})
    return model.to(device)


def from_pretrained(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """The ``from_pretrained`` of a pruned directory: :func:`load` (the config alone holds dense widths)."""
    return load(path, device=device)
