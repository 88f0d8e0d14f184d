"""The signal-compression diagnostic: why the paper does not route by AGF.

The per-sample AGF signal of input ``x`` is ``s(x) = sum_units sum_positions |Y_c(x) * dL(x)/dY_c(x)|``
over the post-activation outputs ``Y`` of every ReLU/GELU module (docs/methods.md §1's ``Y_c``, summed
over all units instead of averaged over samples). Its dynamic range over samples is reported as
``p99 / p1`` (default, robust) and ``max / min``. The paper reports the range shrinking from about
149x early in training to about 21x at convergence: the signal compresses, so a threshold on it
separates easy from hard inputs poorly, besides needing a backward pass.

One forward and one backward per batch in eval mode with ``reduction="sum"``: every sample's
gradient is then its own loss's gradient (no BatchNorm coupling in eval mode), so per-sample
signals come from one batched pass. Weights are not changed; no parameter gradients are kept.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from flowprune.errors import FlowpruneError

ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.ReLU6, nn.LeakyReLU)


def per_sample_agf_signal(model: nn.Module, batches) -> torch.Tensor:
    """``(N,)`` per-sample AGF signal ``sum |Y * dL/dY|`` over every activation module's output."""
    from flowprune.measure import eval_mode

    acts = [m for m in model.modules() if isinstance(m, ACTIVATIONS)]
    if not acts:
        raise FlowpruneError("the AGF signal diagnostic needs activation modules (nn.ReLU/GELU...) in the model")
    store: list[torch.Tensor] = []

    def hook(_m, _inp, out):
        if out.requires_grad:
            out.retain_grad()
        store.append(out)

    out_signals = []
    req = [(p, p.requires_grad) for p in model.parameters()]
    handles = [m.register_forward_hook(hook) for m in acts]
    try:
        for p, _ in req:
            p.requires_grad_(False)
        with eval_mode(model), torch.enable_grad():
            for x, y in batches:
                store.clear()
                xg = x.clone().requires_grad_(True)  # gives the activations a graph without weight grads
                logits = model(xg)
                loss = F.cross_entropy(logits, y, reduction="sum")
                loss.backward()
                s = torch.zeros(len(y))
                for a in store:
                    if a.grad is not None:
                        s += (a.detach() * a.grad).abs().flatten(1).sum(1)
                out_signals.append(s)
    finally:
        for h in handles:
            h.remove()
        for p, r in req:
            p.requires_grad_(r)
    return torch.cat(out_signals)


def dynamic_range(signal: torch.Tensor, eps: float = 1e-12) -> dict:
    """``{"p99_p1", "max_min", "median", "n"}`` of a positive per-sample signal."""
    s = signal.double().clamp_min(eps)
    q = torch.quantile(s, torch.tensor([0.01, 0.99], dtype=torch.float64))
    return {"p99_p1": float(q[1] / q[0]), "max_min": float(s.max() / s.min()), "median": float(s.median()),
            "n": int(s.numel())}


def signal_compression(heavy: nn.Module, data, *, early_steps: int = 20, num_batches: int = 8, batch_size: int = 64,
                       lr: float = 0.05, seed: int = 0) -> dict:
    """Dynamic range of the per-sample AGF signal early in training versus at convergence.

    "Converged" is the given trained ``heavy`` model (not changed). "Early" is a fresh copy of the
    same architecture (``flowprune_base``; or the same module re-initialised) trained for only
    ``early_steps`` SGD steps (default 20, about 0.7 epoch on mnist5k) from the seed. Both are
    measured on the same ``num_batches`` x ``batch_size`` val batches (the train split when val
    is empty).

    Returns ``{"early": {...}, "converged": {...}, "compression": early p99/p1 ÷ converged p99/p1,
    "early_steps": ...}``.
    """
    from flowprune.data import make_loader
    from flowprune.models import build_model
    from flowprune.train import TrainConfig, fit

    split = "val" if len(data.val) else "train"
    batches = data.calibration_batches(batch_size, num_batches, seed=seed, split=split)
    if not batches:
        raise FlowpruneError("the signal diagnostic needs at least one batch of data")
    base = getattr(heavy, "flowprune_base", None)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if base is not None:
            fresh = build_model(base["name"], base["input_shape"], base["num_classes"], **base.get("kwargs", {}))
        else:
            fresh = copy.deepcopy(heavy)
            for m in fresh.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        loader = make_loader(data.train, batch_size, shuffle=True, seed=seed)
        steps_per_epoch = max(1, len(loader))
        epochs = math.ceil(early_steps / steps_per_epoch)
        fit(fresh, loader, TrainConfig(epochs=epochs, lr=lr, augment=False, seed=seed, schedule="constant"),
            max_batches_per_epoch=min(steps_per_epoch, early_steps), progress=False)
    finally:
        torch.random.set_rng_state(state)
    early = dynamic_range(per_sample_agf_signal(fresh, batches))
    conv = dynamic_range(per_sample_agf_signal(heavy, batches))
    return {"early": early, "converged": conv, "compression": early["p99_p1"] / conv["p99_p1"],
            "early_steps": early_steps, "split": split, "num_samples": early["n"],
            "definition": "per-sample sum over activation outputs of |Y * dCE/dY|; range = p99/p1 over samples"}
