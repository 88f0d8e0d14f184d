"""Routing between a light (pruned) and a heavy (full) expert (docs/methods.md §2).

* :mod:`~flowprune.route.cascade` -- :class:`Cascade` (two experts) and :class:`EarlyExitCascade`
  (an exit head at any named module of one network, attached by a hook): per-sample dispatch
  inside a batch, ``route(x) -> CascadeOutput``.
* :mod:`~flowprune.route.routers` -- the router registry: ``@register_router(name)``,
  ``get_router(name, **options)``, ``list_routers()`` (``confidence``, ``entropy``, ``l1``,
  ``learned``, ``random``, and yours; see docs/extend/router.md).
* :mod:`~flowprune.route.calibrate` -- threshold for a heavy-usage budget or a max accuracy drop,
  on the val split.
* :mod:`~flowprune.route.cost` -- C_mix / C_cascade from MACs, measured latency/throughput, overhead.
* :mod:`~flowprune.route.diagnostics` -- the AGF signal-compression diagnostic.
* :mod:`~flowprune.route.io` -- ``save_cascade`` / ``load_cascade`` (safetensors + JSON, no pickle).
* :mod:`~flowprune.route.api` -- ``route_experts(light, heavy, data, config=None, **overrides) -> RouteResult``.
"""

from flowprune.route.api import RouteConfig, RouteResult, route_early_exit, route_experts
from flowprune.route.calibrate import Calibration, calibrate, collect_outputs
from flowprune.route.cascade import Cascade, CascadeOutput, EarlyExitCascade, build_early_exit
from flowprune.route.io import load_cascade, save_cascade
from flowprune.route.routers import (
    Router,
    fit_learned_router,
    get_router,
    list_routers,
    make_router,
    parse_router_options,
    register_router,
)

__all__ = ["Cascade", "CascadeOutput", "EarlyExitCascade", "build_early_exit", "Router", "ROUTERS", "get_router",
           "list_routers", "register_router", "parse_router_options", "make_router", "fit_learned_router",
           "Calibration", "calibrate", "collect_outputs", "RouteConfig", "RouteResult", "route_experts",
           "route_early_exit", "load_cascade", "save_cascade"]


def __getattr__(name: str):
    if name == "ROUTERS":  # the registered router names (a user's registrations included)
        return tuple(list_routers())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
