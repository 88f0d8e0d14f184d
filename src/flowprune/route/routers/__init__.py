"""Routers: per-sample "difficulty" scores computed from the light expert's output.

Every router maps the light expert's logits ``(B, K)`` and penultimate features ``(B, D)`` to a
difficulty score ``(B,)``; a sample is escalated to the heavy expert iff ``score > threshold``.
Higher always means "harder", so one calibration (:mod:`flowprune.route.calibrate`) serves all.

=============  ===================================================================  ==========
name           score (higher = escalate)                                            cost
=============  ===================================================================  ==========
``confidence`` ``-log max softmax probability`` (the paper's router; monotone in      zero
               ``1 - p_max``, computed without float32 ties near certainty)
``entropy``    predictive entropy of the softmax, in nats                           zero
``l1``         l1 norm of the penultimate features, signed by ``direction``:        zero
               ``"low_is_hard"`` -> ``-||f||_1``, ``"high_is_hard"`` -> ``||f||_1``.
               ``"auto"`` (default) picks the direction on the calibration split
               (the one whose score ranks the light expert's mistakes higher, by
               AUROC). On mnist5k and mnist1d a *low* norm marks a hard input (see
               docs/results/route.md).
``learned``    a small MLP on ``[logits, features]`` predicting P(light is wrong),   counted
               trained on a held-out split (see :func:`fit_learned_router`).
``random``     i.i.d. uniform draws from a seeded generator, the baseline. With a       zero
               threshold of ``1 - p`` it sends a fraction ``p`` to the heavy expert.
=============  ===================================================================  ==========

Routers live in one registry (the timm way): ``@register_router("name")`` on a :class:`Router`
subclass makes it available to ``get_router(name, **options)``, ``list_routers()``,
``route_experts(router=name)``, ``save_cascade``/``load_cascade`` and ``flowprune route --router``
(options from ``--router-option k=v``). What a router needs is said by attributes and hooks on its
class, never by its name:

* ``needs_features``: it reads the light expert's penultimate features.
* ``fit_on``: ``None`` (nothing to learn), ``"calibration"`` (``fit(outs)`` runs on the calibration
  outputs before the threshold is chosen: the l1 direction) or ``"held_out"`` (``fit(outs)`` runs on
  its own share of the val split, ``learned_fraction``: the learned router).
* ``config()`` (JSON constructor options) and the module's ``state_dict()`` (tensors) are what
  ``save_cascade`` writes; ``from_state(config, tensors)`` rebuilds it (no code is read from a file).
* ``budget_threshold(budget)``: a data-free threshold for a heavy-usage budget (the random router).
* ``exportable`` and ``score_numpy(logits, feats)``: ONNX export. A router with a numpy formula is
  computed by the runner; any other exportable router is traced to ``router.onnx``.

A built-in router is one file in this folder (imported with the package); a router of your own
is one file anywhere (docs/extend/router.md).

The random router is not a function of the input: its decisions depend on the generator state,
so it is deterministic for a given seed and call sequence (``reset()`` rewinds it) but not
"per sample".
"""

from __future__ import annotations

from flowprune.registry import import_submodules
from flowprune.route.routers.base import (
    FIT_ON,
    INHERITABLE,
    Router,
    auroc,
    describe_options,
    get_router,
    list_routers,
    make_router,
    parse_option_value,
    parse_router_options,
    register_router,
    router_class,
)

import_submodules(__name__, __path__)  # every file in this folder registers itself

from flowprune.route.routers.confidence import ConfidenceRouter  # noqa: E402
from flowprune.route.routers.entropy import EntropyRouter  # noqa: E402
from flowprune.route.routers.l1 import L1_DIRECTIONS, L1Router, resolve_l1_direction  # noqa: E402
from flowprune.route.routers.learned import LearnedRouter, fit_learned_router  # noqa: E402
from flowprune.route.routers.random import RandomRouter  # noqa: E402

__all__ = ["Router", "register_router", "get_router", "list_routers", "router_class", "make_router",
           "parse_option_value", "parse_router_options", "describe_options", "auroc", "FIT_ON", "INHERITABLE",
           "ConfidenceRouter", "EntropyRouter", "L1Router", "L1_DIRECTIONS", "resolve_l1_direction",
           "LearnedRouter", "fit_learned_router", "RandomRouter", "ROUTERS"]


def __getattr__(name: str):
    if name == "ROUTERS":  # the registered names, now and after user registrations
        return tuple(list_routers())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
