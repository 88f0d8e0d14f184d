"""Measurement used by everything else: accuracy, MACs and params, latency and throughput.

* MACs and parameters come from Torch-Pruning's counter (``tp.utils.count_ops_and_params``),
  not a hand-written one. Its convention: multiply-accumulates per sample, with bias additions
  and one op per activation output counted (a ``Linear(784, 300)`` is 784*300 + 300 = 235,500
  MACs; a following ReLU adds 300).
* Speed comes from the one timing harness, :mod:`flowprune.timing` (warm-up, interleaved rotated
  rounds, medians with quartiles, device synchronised before each clock reading, load average
  recorded). ``latency`` is the median wall time of one forward at a batch size; ``throughput``
  samples per second at a batch size. To compare models use :func:`speed_compare`, which times
  them together and reports speed-ups next to the MACs reduction, refusing impossible ones.

None of these functions changes the caller's model: train/eval mode is restored on return.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from flowprune.errors import FlowpruneError, ImplausibleTiming, check_positive_int
from flowprune.timing import Timings, check_plausible, eval_mode, time_models


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def input_shape_of(model: nn.Module, input_shape: Sequence[int] | None = None) -> tuple[int, ...]:
    if input_shape is not None:
        return tuple(int(s) for s in input_shape)
    base = getattr(model, "flowprune_base", None)
    if base is None:
        raise FlowpruneError("input_shape is required for a model not built by flowprune.build_model")
    return tuple(int(s) for s in base["input_shape"])


def count_macs_params(model: nn.Module, input_shape: Sequence[int] | None = None, *,
                      example_inputs: torch.Tensor | None = None) -> tuple[int, int]:
    """(MACs per sample, parameter count) by Torch-Pruning's counter, at batch size 1.

    ``example_inputs`` (its first sample is used) replaces the random input of ``input_shape``:
    needed for inputs that are not floats (token ids).
    """
    import torch_pruning as tp

    if example_inputs is not None:
        x = example_inputs[:1].to(_device_of(model))
    else:
        x = torch.randn(1, *input_shape_of(model, input_shape), device=_device_of(model))
    with eval_mode(model), torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, x)
    return int(macs), int(params)


@torch.no_grad()
def accuracy(model: nn.Module, data: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy (a fraction in [0, 1]) over a loader or a list of ``(x, y)`` batches.

    Under torchrun (:mod:`flowprune.distributed`) the batches are dealt out to the ranks and the
    counts summed, so every rank gets the same value (and decisions made from it agree).
    """
    from flowprune import distributed

    correct = total = 0
    dev = _device_of(model)
    world, rank = distributed.world_size(), distributed.rank()
    with eval_mode(model):
        for i, (x, y) in enumerate(data):
            if i % world != rank:
                continue
            out = model(x.to(dev))
            correct += int((out.argmax(1).cpu() == y).sum())
            total += int(y.numel())
    if world > 1:
        counts = distributed.all_reduce_sum(torch.tensor([correct, total], dtype=torch.float64))
        correct, total = int(counts[0]), int(counts[1])
    if total == 0:
        raise FlowpruneError("accuracy needs at least one labelled sample; the data given was empty")
    return correct / total


@torch.no_grad()
def predict(model: nn.Module, data: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated logits and labels over a loader."""
    outs, ys = [], []
    dev = _device_of(model)
    with eval_mode(model):
        for x, y in data:
            outs.append(model(x.to(dev)).cpu())
            ys.append(y)
    return torch.cat(outs), torch.cat(ys)


def _input(model: nn.Module, input_shape, batch_size: int) -> torch.Tensor:
    check_positive_int("batch_size", batch_size)
    return torch.randn(batch_size, *input_shape_of(model, input_shape), device=_device_of(model))


def latency(model: nn.Module, input_shape: Sequence[int] | None = None, *, batch_size: int = 1,
            warmup: int = 2, rounds: int = 7, min_round_s: float = 0.05, backend: str = "eager",
            repeats: int | None = None) -> float:
    """Median seconds for one forward pass of a batch of ``batch_size`` (default 1), after warm-up
    (:func:`flowprune.timing.time_models`; compare two models with :func:`speed_compare` instead,
    which times them interleaved). ``repeats`` is the old name of ``rounds``."""
    x = _input(model, input_shape, batch_size)
    return time_models({"model": model}, x, backend=backend, rounds=repeats or rounds, warmup=warmup,
                       min_round_s=min_round_s).median["model"]


def throughput(model: nn.Module, input_shape: Sequence[int] | None = None, *, batch_size: int = 64,
               warmup: int = 2, rounds: int = 5, min_round_s: float = 0.05, backend: str = "eager",
               repeats: int | None = None) -> float:
    """Samples per second at ``batch_size``, from the median time of one batch."""
    t = latency(model, input_shape, batch_size=batch_size, warmup=warmup, rounds=repeats or rounds,
                min_round_s=min_round_s, backend=backend)
    return batch_size / t


def speed_report(model: nn.Module, input_shape: Sequence[int] | None = None, *,
                 batch_sizes: Sequence[int] = (64, 256), rounds: int = 5, min_round_s: float = 0.05,
                 backend: str = "eager") -> dict[str, float]:
    """Latency at batch 1 (ms) and throughput (samples/s) at each batch size, in one dict."""
    out = {"latency_ms_b1": 1e3 * latency(model, input_shape, batch_size=1, rounds=rounds,
                                          min_round_s=min_round_s, backend=backend)}
    for b in batch_sizes:
        out[f"throughput_b{b}"] = throughput(model, input_shape, batch_size=b, rounds=rounds,
                                             min_round_s=min_round_s, backend=backend)
    return out


SPEED_BATCH = 64  # the default throughput batch of the speed reported with every model
SPEED_SLACK = 0.5  # a pruned model may beat its MACs cut by this much (cache effects) before it is refused


def _batch_speed(t: Timings, base: str, b: int, macs: Mapping[str, int], slack: float) -> tuple[dict, list]:
    """One batch size's entry of :func:`speed_compare` and the refusals (ImplausibleTiming messages)."""
    entry: dict = {"seconds": dict(t.median), "q25": dict(t.q25), "q75": dict(t.q75),
                   "per_second": {k: b / v for k, v in t.median.items()}, "speedup": {}, "speedup_range": {}}
    refused = []
    for other in t.median:
        if other == base:
            continue
        try:
            check_plausible(t, base=base, other=other, work_ratio=macs[base] / max(macs[other], 1),
                            what=f"{other} vs {base} at batch {b}", slack=slack)
        except ImplausibleTiming as e:
            refused.append(str(e))
            entry["speedup"][other] = None
            continue
        entry["speedup"][other] = t.speedup(base, other)
        entry["speedup_range"][other] = list(t.speedup_range(base, other))
    return entry, refused


def speed_compare(models: Mapping[str, nn.Module], input_shape: Sequence[int] | None = None, *, base: str,
                  batch_sizes: Sequence[int] = (1, SPEED_BATCH), backend: str = "eager", rounds: int = 5,
                  warmup: int = 1, min_round_s: float = 0.02, slack: float = SPEED_SLACK,
                  macs: Mapping[str, int] | None = None) -> dict:
    """Measured speed-up of each model over ``base`` at each batch size, next to its MACs reduction.

    All models are timed together, interleaved (:func:`flowprune.timing.time_models`), once per
    batch size, on random inputs of ``input_shape`` on ``base``'s device. A speed-up that beats
    the MACs reduction by more than ``slack`` beyond the noise band is re-measured once and, if
    it still does, refused (:func:`flowprune.timing.check_plausible`): its ``speedup`` is None
    and the reason is in ``refused``. ``macs`` gives each model's work per sample where Torch-Pruning's
    counter cannot (sparse execution: the nonzero MACs); by default it is counted.

    Returns a JSON-safe dict: ``device``, ``backend``, ``threads``, ``rounds``, ``batch_sizes``,
    ``macs`` and ``macs_reduction`` per model, ``load_before`` / ``load_after`` (1-minute load
    average around the whole measurement), ``notes``, ``refused``, and ``b{B}`` per batch size with
    ``seconds`` (median per batch), ``q25``, ``q75``, ``per_second`` (samples/s), ``speedup``
    and ``speedup_range`` (vs ``base``).
    """
    if not isinstance(models, Mapping) or base not in models:
        raise FlowpruneError(f"speed_compare: base {base!r} must be one of the models given "
                             f"({', '.join(models) if isinstance(models, Mapping) else type(models).__name__})")
    sizes = [check_positive_int("batch size", b) for b in batch_sizes]
    shape = input_shape_of(models[base], input_shape)
    macs = dict(macs) if macs is not None else {k: count_macs_params(m, shape)[0] for k, m in models.items()}
    if set(macs) != set(models):
        raise FlowpruneError(f"speed_compare: macs must name the same models ({', '.join(models)}), got {', '.join(macs)}")
    out: dict = {"backend": backend, "batch_sizes": sizes, "macs": macs,
                 "macs_reduction": {k: macs[base] / max(v, 1) for k, v in macs.items() if k != base},
                 "notes": [], "refused": []}
    dev = _device_of(models[base])
    for b in sizes:
        x = torch.randn(b, *shape, device=dev)
        for attempt in range(2):
            t = time_models(models, x, backend=backend, rounds=rounds * (attempt + 1), warmup=warmup,
                            min_round_s=min_round_s)
            entry, refused = _batch_speed(t, base, b, macs, slack)
            if not refused:
                break
        out[f"b{b}"] = entry
        out["refused"] += refused
        out["notes"] += t.notes
        out.setdefault("load_before", t.load_before)
        out.update(load_after=t.load_after, device=t.device, threads=t.threads, rounds=t.rounds,
                   backend=t.backend)
    return out


def speed_summary(speed: Mapping, other: str) -> dict[str, float | None]:
    """The flat figures a results table shows for ``other`` from a :func:`speed_compare` dict:
    ``speedup_b{B}`` per batch size and ``speed_backend``."""
    out: dict = {f"speedup_b{b}": speed[f"b{b}"]["speedup"].get(other) for b in speed["batch_sizes"]}
    out["speed_backend"] = f"{speed['backend']} on {speed['device']}"
    return out


def model_summary(model: nn.Module, test_data=None, input_shape: Sequence[int] | None = None,
                  speed: bool = True) -> dict[str, float]:
    """Accuracy (when ``test_data`` is given), MACs, params, and optionally speed, in one dict."""
    macs, params = count_macs_params(model, input_shape)
    out: dict[str, float] = {"macs": macs, "params": params}
    if test_data is not None:
        out["accuracy"] = accuracy(model, test_data)
    if speed:
        out.update(speed_report(model, input_shape))
    return out


def runs_on(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``model`` runs on one example of ``x`` (eval mode, no grad); any exception means no."""
    try:
        with eval_mode(model), torch.no_grad():
            model(x[:1])
    except Exception:  # noqa: BLE001 -- only whether it runs
        return False
    return True
