"""The router interface and registry (see :mod:`flowprune.route.routers` for the built-ins)."""

from __future__ import annotations

import inspect
import math
import re
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from flowprune.errors import FlowpruneError, bad_choice

_REGISTRY: dict[str, type[Router]] = {}
FIT_ON = (None, "calibration", "held_out")
#: options ``route_experts`` hands down to a router that declares them in ``inherits`` (unless given)
INHERITABLE = ("seed", "hidden")


def register_router(name: str) -> Callable[[type[Router]], type[Router]]:
    """Class decorator: register a :class:`Router` subclass under ``name`` (sets ``cls.name``)."""

    def deco(cls: type[Router]) -> type[Router]:
        if not (isinstance(cls, type) and issubclass(cls, Router)):
            raise FlowpruneError(f"@register_router({name!r}) must decorate a flowprune Router subclass, got {cls!r}")
        if cls.fit_on not in FIT_ON:
            raise bad_choice(f"fit_on of router {name!r}", cls.fit_on, [str(f) for f in FIT_ON])
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_routers() -> list[str]:
    """Registered router names, sorted."""
    return sorted(_REGISTRY)


def router_class(name: str) -> type[Router]:
    """The registered class of router ``name``."""
    if name not in _REGISTRY:
        raise bad_choice("router", name, list_routers())
    return _REGISTRY[name]


def get_router(name: str, **options) -> Router:
    """A router by registry name; ``options`` are its constructor's (``router_class(name).accepted_options()``).

    Raises:
        FlowpruneError: an unknown name (listing the registered ones), an unknown option (naming it and
            the router's accepted options) or a bad value.
    """
    cls = router_class(name)
    accepted = cls.accepted_options()
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise FlowpruneError(f"unknown option(s) {unknown} for router {name!r}; accepted: "
                             f"{', '.join(sorted(accepted)) or 'none'}")
    try:
        return cls(**options)
    except (TypeError, ValueError) as e:
        raise FlowpruneError(f"bad option for router {name!r}: {e}") from None


_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")


def parse_option_value(text: str):
    """A command-line option value: ``true``/``false`` -> bool, ``none`` -> None, an integer -> int,
    a decimal number -> float, anything else -> the string itself. Nothing is evaluated."""
    t = str(text).strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if _INT.fullmatch(t):
        return int(t)
    if _FLOAT.fullmatch(t):
        return float(t)
    return t


def parse_router_options(items, router: str | None = None) -> dict:
    """``["k=v", ...]`` (``--router-option k=v``, repeatable) -> ``{k: parsed v}``.

    With ``router``, every key is checked against that router's accepted options.

    Raises:
        FlowpruneError: an item without ``=`` or with an empty key, a key given twice, or (with
            ``router``) an option the router does not accept, naming the ones it does.
    """
    out: dict = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise FlowpruneError(f"a router option must look like key=value, got {item!r}")
        if key in out:
            raise FlowpruneError(f"router option {key!r} is given twice")
        out[key] = parse_option_value(value)
    if router is not None:
        accepted = router_class(router).accepted_options()
        for key in out:
            if key not in accepted:
                raise FlowpruneError(f"unknown option {key!r} for router {router!r}; accepted: "
                                     f"{', '.join(sorted(accepted)) or 'none'}")
    return out


def describe_options(name: str) -> str:
    """``"k=default, ..."`` of router ``name``'s options, for help texts."""
    opts = router_class(name).accepted_options()
    return ", ".join(f"{k}" if v is inspect.Parameter.empty else f"{k}={v}" for k, v in opts.items()) or "none"


def make_router(name: str, **kwargs) -> Router:
    """Deprecated alias of :func:`get_router`."""
    warnings.warn("flowprune.route.make_router is deprecated; use get_router", DeprecationWarning, stacklevel=2)
    return get_router(name, **kwargs)


class Router(nn.Module):
    """Base class. ``forward(logits, feats) -> scores (B,)``; higher = send to the heavy expert.

    Constructor keyword arguments are the router's options (``get_router(name, **options)``,
    ``--router-option k=v``); ``config()`` returns those needed to rebuild it.
    """

    name: str = "base"
    needs_features: bool = False
    #: None, "calibration" or "held_out" (see the module docstring)
    fit_on: str | None = None
    #: route_experts options (:data:`INHERITABLE`) this router takes as defaults when not given
    inherits: tuple[str, ...] = ()
    #: whether the decisions are a function of the input, so the routed model exports to ONNX
    exportable: bool = True

    def forward(self, logits: torch.Tensor, feats: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def accepted_options(cls) -> dict[str, object]:
        """Constructor options and their defaults (``inspect.Parameter.empty`` where required)."""
        sig = inspect.signature(cls.__init__)
        return {n: p.default for n, p in list(sig.parameters.items())[1:]
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    @property
    def needs_fit(self) -> bool:
        """Whether :meth:`fit` must run before the router is used."""
        return self.fit_on is not None

    @property
    def needs_fitting(self) -> bool:
        """Old name: the router needs its own held-out split (``fit_on == "held_out"``)."""
        return self.fit_on == "held_out"

    def fit(self, outs) -> dict:
        """Learn from :class:`~flowprune.route.calibrate.ExpertOutputs`; return JSON-safe evidence."""
        return {}

    def is_ready(self) -> bool:
        """Whether the router can score inputs (fitted, or nothing to fit)."""
        return self.fit_on != "held_out" or bool(getattr(self, "fitted", False))

    def check_ready(self) -> None:
        """Raise FlowpruneError when the router must be fitted first."""
        if not self.is_ready():
            raise FlowpruneError(f"the {self.name} router has not been trained; fit it first (router.fit(outputs); "
                                 "route_experts does it on part of the val split)")

    def budget_threshold(self, budget: float) -> float | None:
        """A data-free threshold for a heavy-usage ``budget``; None: from the calibration scores."""
        return None

    def config(self) -> dict:
        """JSON-safe constructor arguments (saved in router.json)."""
        return {}

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor] | None = None) -> Router:
        """Rebuild a saved router: the constructor with ``config``, then the saved tensors, if any."""
        r = cls(**config)
        if tensors:
            r.load_state_dict(tensors)
            r.fitted = True
        return r.eval()

    def score_numpy(self, logits: np.ndarray, feats: np.ndarray | None):
        """The score in numpy for the ONNX runner, or NotImplemented (then exported as ``router.onnx``)."""
        return NotImplemented

    def reset(self) -> None:
        """Rewind any internal state (only the random router has one)."""


def auroc(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for detecting ``positives`` (bool), ties counted half.

    NaN when one class is empty.
    """
    s = scores.double().flatten()
    pos = positives.bool().flatten()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    # rank-based (Mann-Whitney U), average ranks for ties
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    uniq, inv = torch.unique(s, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, ranks)
    cnts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, torch.ones_like(ranks))
    ranks = (sums / cnts)[inv]
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))
