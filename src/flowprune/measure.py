"""Measurement used by everything else: accuracy, MACs and params, latency and throughput.

* MACs and parameters come from Torch-Pruning's counter (``tp.utils.count_ops_and_params``),
  not a hand-written one. Its convention: multiply-accumulates per sample, with bias additions
  and one op per activation output counted (a ``Linear(784, 300)`` is 784*300 + 300 = 235,500
  MACs; a following ReLU adds 300).
* Latency is the median wall time of one forward at a batch size after warm-up; throughput is
  samples per second at a batch size, from the median batch time. The model's device is
  synchronised (:func:`flowprune.device.synchronize`) before each clock reading, so GPU timings
  count the kernels, not just their launch. Timings on a shared machine
  vary: compare models as ratios measured in the same process, and report medians.

None of these functions changes the caller's model: train/eval mode is restored on return.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from flowprune.errors import FlowpruneError, check_positive_int


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put ``model`` in eval mode for the block and restore every module's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, f in flags:
            m.training = f


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


def _time_batches(model: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> list[float]:
    """Wall times of ``repeats`` forwards; the device is synchronised before every clock reading,
    so queued (asynchronous) GPU work is counted in the batch that queued it."""
    from flowprune.device import synchronize

    times = []
    with eval_mode(model), torch.inference_mode():
        for _ in range(warmup):
            model(x)
        for _ in range(repeats):
            synchronize(x.device)
            t0 = time.perf_counter()
            model(x)
            synchronize(x.device)
            times.append(time.perf_counter() - t0)
    return times


def latency(model: nn.Module, input_shape: Sequence[int] | None = None, *, batch_size: int = 1,
            warmup: int = 10, repeats: int = 50) -> float:
    """Median seconds for one forward pass of a batch of ``batch_size`` (default 1), after warm-up."""
    check_positive_int("batch_size", batch_size)
    check_positive_int("repeats", repeats)
    shape = input_shape_of(model, input_shape)
    x = torch.randn(batch_size, *shape, device=_device_of(model))
    return statistics.median(_time_batches(model, x, warmup, repeats))


def throughput(model: nn.Module, input_shape: Sequence[int] | None = None, *, batch_size: int = 64,
               warmup: int = 3, repeats: int = 10) -> float:
    """Samples per second at ``batch_size``, from the median time of ``repeats`` batches."""
    t = latency(model, input_shape, batch_size=batch_size, warmup=warmup, repeats=repeats)
    return batch_size / t


def speed_report(model: nn.Module, input_shape: Sequence[int] | None = None, *,
                 batch_sizes: Sequence[int] = (64, 256), latency_repeats: int = 50,
                 throughput_repeats: int = 10) -> dict[str, float]:
    """Latency at batch 1 (ms) and throughput (samples/s) at each batch size, in one dict."""
    out = {"latency_ms_b1": 1e3 * latency(model, input_shape, batch_size=1, repeats=latency_repeats)}
    for b in batch_sizes:
        out[f"throughput_b{b}"] = throughput(model, input_shape, batch_size=b, repeats=throughput_repeats)
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
