"""One shape for every procedure: a validated config dataclass in, a result dataclass out.

Every procedure of flowprune (``prune``, ``idap``, ``hyperflows_prune``, ``route_experts``,
``compare``, ``train_model``) is called the same way::

    result = procedure(model, data, config=None, **overrides)

* ``config`` is ``None`` (the defaults), an instance of the procedure's :class:`ProcedureConfig`
  subclass, or a plain ``dict`` of its fields (e.g. read from JSON).
* ``overrides`` are keyword arguments named after the config's fields; they replace the values of
  ``config`` (which is never changed: a new config is built).
* ``Config.resolve(config, overrides)`` does both and calls :meth:`ProcedureConfig.validate`; an
  unknown name raises a :class:`~flowprune.errors.FlowpruneError` that names it and lists the
  fields, before any work is done.
* The result is a dataclass deriving from :class:`ProcedureResult`: ``.model`` holds the model the
  procedure produced (``None`` where it produces none) and ``.to_dict()`` a JSON-safe summary
  without the model (what ``results.json`` holds).

A subclass overrides :meth:`ProcedureConfig.validate` to check every field and raise a
``FlowpruneError`` naming the bad value and what is allowed (helpers in :mod:`flowprune.errors`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, TypeVar

from flowprune.errors import FlowpruneError

C = TypeVar("C", bound="ProcedureConfig")


def field_names(cls: type) -> list[str]:
    """The init fields of a dataclass ``cls``, in declaration order."""
    return [f.name for f in dataclasses.fields(cls) if f.init]


def check_names(cls: type, names, what: str = "option") -> None:
    """Raise a FlowpruneError naming the first of ``names`` that is not a field of ``cls``."""
    allowed = field_names(cls)
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise FlowpruneError(f"unknown {what} {unknown[0]!r} for {cls.__name__}; allowed: {', '.join(allowed)}")


@dataclasses.dataclass
class ProcedureConfig:
    """Base of every procedure's config: ``resolve`` builds one from a config and overrides."""

    def validate(self: C) -> C:
        """Check every field; raise FlowpruneError naming the bad value and the fix. Returns self."""
        return self

    @classmethod
    def resolve(cls: type[C], config: C | Mapping[str, Any] | None = None,
                overrides: Mapping[str, Any] | None = None) -> C:
        """A validated config: ``config`` (an instance, a dict or None) with ``overrides`` applied."""
        overrides = dict(overrides or {})
        check_names(cls, overrides)
        if config is None:
            base = {}
        elif isinstance(config, cls):
            base = {n: getattr(config, n) for n in field_names(cls)}
        elif isinstance(config, Mapping):
            check_names(cls, config, "config key")
            base = dict(config)
        else:
            raise FlowpruneError(f"config must be a {cls.__name__}, a dict of its fields or None, "
                                 f"got {type(config).__name__}")
        base.update(overrides)
        return cls(**base).validate()

    def to_dict(self) -> dict:
        """The fields as a JSON-safe dict (nested dataclasses become dicts)."""
        return jsonable(dataclasses.asdict(self))


@dataclasses.dataclass
class ProcedureResult:
    """Base of every procedure's result. Subclasses declare ``model`` (or leave it ``None``)."""

    def to_dict(self) -> dict:
        """Every field but the model, JSON-safe."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "model":
                continue
            out[f.name] = getattr(self, f.name)
        return jsonable(out)


def jsonable(value: Any) -> Any:
    """``value`` with tuples as lists, dataclasses as dicts, tensors as lists, non-finite floats as None.

    Objects without a JSON form (models, callables) become their type name.
    """
    import torch

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if hasattr(value, "to_dict"):
            return jsonable(value.to_dict())
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.detach().cpu().tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, torch.device):
        return str(value)
    return type(value).__name__


class ReadsAsDict:
    """``res[key]``, ``key in res``, ``res.get(key)`` and ``res.keys()`` for results that earlier
    versions returned as dicts. A subclass defines :meth:`keys` and ``__getitem__``."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def __getitem__(self, key: str):
        raise NotImplementedError

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def get(self, key: str, default=None):
        return self[key] if key in self else default


@dataclasses.dataclass
class RecordResult(ProcedureResult, ReadsAsDict):
    """A result whose summary is one flat record (``results.json``): ``.model``, ``.record``.

    Also readable as the dict earlier versions returned: ``res["accuracy"]``, ``res["model"]``,
    ``"macs" in res``, ``res.keys()``, ``res.get(...)``.
    """

    model: Any = None
    record: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return jsonable(self.record)

    def __getitem__(self, key: str):
        return self.model if key == "model" else self.record[key]

    def keys(self) -> list[str]:
        return [*self.record, "model"]
