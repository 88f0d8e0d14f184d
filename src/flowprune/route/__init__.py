"""Routing between a light (pruned) and a heavy (full) expert (METHODS.md §2).

* :mod:`~flowprune.route.cascade` -- :class:`Cascade` (two experts) and :class:`EarlyExitCascade`
  (an exit head on one network): per-sample dispatch inside a batch, ``route(x) -> CascadeOutput``.
* :mod:`~flowprune.route.routers` -- the router registry (``confidence``, ``entropy``, ``l1``,
  ``learned``, ``random``).
* :mod:`~flowprune.route.calibrate` -- threshold for a heavy-usage budget or a max accuracy drop,
  on the val split.
* :mod:`~flowprune.route.cost` -- C_mix / C_cascade from MACs, measured latency/throughput, overhead.
* :mod:`~flowprune.route.diagnostics` -- the AGF signal-compression diagnostic.
* :mod:`~flowprune.route.io` -- ``save_cascade`` / ``load_cascade`` (safetensors + JSON, no pickle).
* :mod:`~flowprune.route.api` -- ``route_experts(light, heavy, data, ...) -> RouteResult`` (one call).
"""

from flowprune.route.api import RouteResult, route_early_exit, route_experts
from flowprune.route.calibrate import Calibration, calibrate, collect_outputs
from flowprune.route.cascade import Cascade, CascadeOutput, EarlyExitCascade, build_early_exit
from flowprune.route.io import load_cascade, save_cascade
from flowprune.route.routers import ROUTERS, Router, fit_learned_router, make_router

__all__ = ["Cascade", "CascadeOutput", "EarlyExitCascade", "build_early_exit", "Router", "ROUTERS", "make_router",
           "fit_learned_router", "Calibration", "calibrate", "collect_outputs", "RouteResult", "route_experts",
           "route_early_exit", "load_cascade", "save_cascade"]
