"""flowprune: make trained PyTorch networks smaller and faster without losing what they learned.

The data flows one way: calibrate -> plan -> cut -> recover -> measure -> save -> route -> report.

Every procedure is called the same way, ``procedure(model, data, config=None, **overrides)``
(:mod:`flowprune.config`), and what users extend lives in a registry: scores
(``register_score``), pruning procedures (``register_procedure``) and routers
(``register_router``); :func:`load_plugins` imports extensions kept in your own files.
"""

from __future__ import annotations

from flowprune import (
    export,  # noqa: E402  (a callable module: fp.export(model, path), fp.export.OnnxCascade)
    hf,  # noqa: E402,F401  (registers the Hugging Face unit provider; transformers stays lazy)
    mha,  # noqa: E402,F401  (registers the nn.MultiheadAttention head units)
    recurrent,  # noqa: F401  (registers the "recurrent" unit kind: LSTM / GRU / RNN hidden units)
)
from flowprune._version import __version__
from flowprune.api import train_model  # noqa: E402
from flowprune.compare import CompareConfig, CompareResult, compare  # noqa: E402
from flowprune.config import ProcedureConfig, ProcedureResult  # noqa: E402
from flowprune.cut import apply_cuts, cut_heads  # noqa: E402
from flowprune.data import DataSplits, load_dataset, make_loader  # noqa: E402
from flowprune.errors import FlowpruneError  # noqa: E402
from flowprune.io import load, save  # noqa: E402
from flowprune.measure import accuracy, count_macs_params, latency, throughput  # noqa: E402
from flowprune.models import build_model, list_models  # noqa: E402
from flowprune.plan import plan_cuts  # noqa: E402
from flowprune.plugins import load_plugins  # noqa: E402
from flowprune.procedures import (  # noqa: E402
    CutContext,
    Pruned,
    PruningProcedure,
    get_procedure,
    list_procedures,
    register_procedure,
)
from flowprune.pruning.hyperflows import HyperflowsConfig, HyperflowsResult, hyperflows_prune  # noqa: E402
from flowprune.pruning.idap import IdapConfig, IdapResult, idap  # noqa: E402
from flowprune.pruning.structural import PruneConfig, PruneResult, prune  # noqa: E402
from flowprune.route.api import RouteConfig, RouteResult, route_experts  # noqa: E402
from flowprune.route.io import load_cascade  # noqa: E402
from flowprune.route.routers import Router, get_router, list_routers, register_router  # noqa: E402
from flowprune.runstate import RunState  # noqa: E402
from flowprune.scores import Score, get_score, list_scores, register_score  # noqa: E402
from flowprune.step import plan_and_cut  # noqa: E402
from flowprune.train import TrainConfig, fit  # noqa: E402
from flowprune.units import find_units  # noqa: E402

hyperflows = hyperflows_prune  # the name the docs teach

__all__ = [
    "__version__",
    "CompareConfig",
    "CompareResult",
    "CutContext",
    "DataSplits",
    "FlowpruneError",
    "HyperflowsConfig",
    "HyperflowsResult",
    "IdapConfig",
    "IdapResult",
    "ProcedureConfig",
    "ProcedureResult",
    "PruneConfig",
    "PruneResult",
    "Pruned",
    "PruningProcedure",
    "RouteConfig",
    "RouteResult",
    "Router",
    "RunState",
    "Score",
    "TrainConfig",
    "accuracy",
    "apply_cuts",
    "build_model",
    "compare",
    "count_macs_params",
    "cut_heads",
    "export",
    "find_units",
    "fit",
    "get_procedure",
    "get_router",
    "get_score",
    "hyperflows",
    "hyperflows_prune",
    "idap",
    "latency",
    "list_models",
    "list_procedures",
    "list_routers",
    "list_scores",
    "load",
    "load_cascade",
    "load_dataset",
    "load_plugins",
    "make_loader",
    "plan_and_cut",
    "plan_cuts",
    "prune",
    "register_procedure",
    "register_router",
    "register_score",
    "route_experts",
    "save",
    "throughput",
    "train_model",
]
