"""Unstructured sparsity after pruning: bake masks, save compactly, run with sparse kernels.

* :func:`bake` removes every weight parametrization (``remove_parametrizations(...,
  leave_parametrized=True)``), so the masked product ``w * mask`` becomes the plain weight: a
  normal dense model with exact zeros, identical outputs.
* :func:`save_sparse` / :func:`load_sparse`: weights with at least ``min_sparsity`` zeros are
  stored as CSR (``crow``/``col`` int32 indices + float values) of their 2-D view
  ``(out, in * kernel)`` in ``DIR/model.sparse.safetensors``; everything else is stored dense in
  the same file. ``DIR/model.json`` is the :mod:`flowprune.io` recipe with a ``sparse`` section
  (shapes of the CSR tensors). Loading rebuilds the dense architecture and never unpickles.
* :func:`to_sparse_execution` returns a copy where Linear, Conv1d and Conv2d (``groups == 1``)
  layers with at least ``min_sparsity`` zeros run with ``torch.sparse`` CSR matmuls (MKL on x86
  CPU builds): Linear as ``W_csr @ x^T``; convolutions as im2col (``F.unfold``) followed by one
  ``W_csr @ cols_i`` per sample, except 1x1 / size-1 kernels with stride 1 and no padding, which
  multiply the input as it is. It is an inference-only runtime form (not a save format).
  Whether it is faster than dense depends on the layer, sparsity, batch size and the CPU: the
  crossover table of ``python -m benchmarks.bench_sparse`` (docs/results/hyperflows.md) gives,
  per layer type, the sparsity from which it beats the dense (oneDNN / MKL) layer at batch 1 and
  256 on this CPU. Pass ``example_input=`` (a batch of the size you will run) and each layer is
  timed both ways on its own input and converted only where CSR is faster, so the sparse path
  pays or stays dense layer by layer (``model.sparse_decisions``).
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from flowprune.errors import FlowpruneError, check_fraction, check_positive_int

SPARSE_WEIGHTS_FILE = "model.sparse.safetensors"
_SEP = "::csr_"


def bake(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Return ``model`` (a copy unless ``inplace``) with every parametrized weight replaced by its value.

    For a masked model this multiplies the mask into the weight; pruned entries become exact
    zeros and the module classes are the original ones again.
    """
    net = model if inplace else copy.deepcopy(model)
    for m in list(net.modules()):
        if parametrize.is_parametrized(m):
            cls = m.__class__
            # A deep copy shares the dynamic ``Parametrized<Cls>`` class with the original, and
            # remove_parametrizations deletes the property from that class, which would break
            # the original: give this module a private copy of the class first.
            m.__class__ = type(cls.__name__, cls.__bases__,
                               {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")})
            for name in list(m.parametrizations.keys()):
                parametrize.remove_parametrizations(m, name, leave_parametrized=True)
    return net


def zero_sparsity_report(model: nn.Module, *, include: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d,
                                                                           nn.Conv3d)) -> dict:
    """Share of exact zeros in the weights of ``include`` layers (a baked model): overall and per layer."""
    layers, zeros, total = {}, 0, 0
    for name, m in model.named_modules():
        if isinstance(m, include) and getattr(m, "weight", None) is not None:
            w = m.weight.detach()
            z = int((w == 0).sum())
            layers[name] = z / w.numel()
            zeros += z
            total += w.numel()
    if total == 0:
        raise FlowpruneError("the model has no Conv/Linear weight")
    return {"sparsity": zeros / total, "zeros": zeros, "total": total, "layers": layers}


def _to_csr(w: torch.Tensor) -> dict[str, torch.Tensor]:
    csr = _csr(w.detach().cpu().reshape(w.shape[0], -1))
    return {"crow": csr.crow_indices().to(torch.int32).contiguous(),
            "col": csr.col_indices().to(torch.int32).contiguous(),
            "val": csr.values().contiguous()}


def save_sparse(model: nn.Module, path: str | os.PathLike, *, metadata: dict | None = None,
                min_sparsity: float = 0.5) -> Path:
    """Save a (baked or masked) model to directory ``path`` with sparse weights in CSR form.

    Args:
        min_sparsity: a 2-D+ weight is stored as CSR when at least this share of it is zero
            (below ~50 % CSR with int32 indices is larger than dense float32).

    Returns the directory. The files: ``model.sparse.safetensors`` and ``model.json``.
    """
    from safetensors.torch import save_file

    from flowprune import io as fio

    check_fraction("min_sparsity", min_sparsity, high_open=False)
    net = bake(model) if any(parametrize.is_parametrized(m) for m in model.modules()) else model
    base = getattr(net, "flowprune_base", None)
    if base is None:
        raise FlowpruneError("the model has no flowprune_base: build it with flowprune.build_model(...)")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    sparse_info: dict[str, dict] = {}
    dense_bytes = stored_bytes = 0
    for k, v in net.state_dict().items():
        v = v.detach().cpu().contiguous()
        dense_bytes += v.numel() * v.element_size()
        if v.ndim >= 2 and v.is_floating_point() and v.numel() > 0 and float((v == 0).float().mean()) >= min_sparsity:
            parts = _to_csr(v)
            for p, t in parts.items():
                tensors[f"{k}{_SEP}{p}"] = t
                stored_bytes += t.numel() * t.element_size()
            sparse_info[k] = {"shape": list(v.shape), "nnz": int(parts["val"].numel())}
        else:
            tensors[k] = v.clone()
            stored_bytes += v.numel() * v.element_size()
    recipe = {"format": fio.FORMAT, "format_version": fio.FORMAT_VERSION, "base": base,
              "modules": fio.architecture_record(net),
              "metadata": metadata if metadata is not None else getattr(net, "flowprune_metadata", {}),
              "sparse": {"weights_file": SPARSE_WEIGHTS_FILE, "layout": "csr-int32", "tensors": sparse_info,
                         "dense_bytes": dense_bytes, "stored_bytes": stored_bytes}}
    try:
        text = json.dumps(recipe, indent=1)
    except TypeError as e:
        raise FlowpruneError(f"metadata must be JSON-serialisable: {e}") from None
    save_file(tensors, str(out / SPARSE_WEIGHTS_FILE), metadata={"format": "flowprune-sparse"})
    tmp = out / "model.json.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / "model.json")
    return out


def load_sparse(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Load a model written by :func:`save_sparse` into its dense architecture (zeros restored)."""
    from safetensors.torch import load_file

    from flowprune import io as fio

    d = Path(path)
    if not (d / "model.json").exists() or not (d / SPARSE_WEIGHTS_FILE).exists():
        raise FlowpruneError(f"{str(d)!r} is not a sparse flowprune model directory (needs model.json and "
                             f"{SPARSE_WEIGHTS_FILE}, as written by flowprune.sparse.save_sparse)")
    recipe = json.loads((d / "model.json").read_text())
    if recipe.get("format") != fio.FORMAT or "sparse" not in recipe:
        raise FlowpruneError(f"{d / 'model.json'} is not a sparse flowprune recipe")
    raw = load_file(str(d / SPARSE_WEIGHTS_FILE), device="cpu")
    tensors: dict[str, torch.Tensor] = {k: v for k, v in raw.items() if _SEP not in k}
    for k, info in recipe["sparse"]["tensors"].items():
        shape = tuple(info["shape"])
        crow, col, val = (raw[f"{k}{_SEP}{p}"] for p in ("crow", "col", "val"))
        rows = shape[0]
        cols = 1
        for s in shape[1:]:
            cols *= s
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # check_invariants: a malformed file raises instead of reading out of bounds
                csr = torch.sparse_csr_tensor(crow.to(torch.int64), col.to(torch.int64), val, size=(rows, cols),
                                              check_invariants=True)
        except RuntimeError as e:
            raise FlowpruneError(f"{d}: sparse tensor {k!r} is malformed: {e}") from None
        tensors[k] = csr.to_dense().reshape(shape)
    return fio.model_from_tensors(recipe, tensors, where=d, device=device)


def _csr(w2d: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return w2d.detach().contiguous().to_sparse_csr()


class SparseLinear(nn.Module):
    """Inference-only Linear with a CSR weight: ``y = (W_csr @ x^T)^T + b``. Input ``(..., in)``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_csr = _csr(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach().clone()
        self.nnz = int(self.weight_csr.values().numel())

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 1:  # a matrix-vector product: about half the time of a one-column matmul here
            y = torch.mv(self.weight_csr, x2[0].contiguous()).unsqueeze(0)
        else:
            y = torch.sparse.mm(self.weight_csr, x2.t().contiguous()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


def _conv_supported(conv: nn.Module) -> bool:
    """Zero padding given as integers, ``groups == 1``: what the im2col path computes."""
    return conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def _csr_times_samples(w_csr: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``stack([w_csr @ cols[i] for i])`` for ``cols`` of shape ``(B, K, L)`` -> ``(B, O, L)``.

    One CSR matmul per sample on its contiguous ``(K, L)`` block: measured faster on this CPU than
    one matmul on the ``(K, B*L)`` matrix, whose transposing copy dominated the time.
    """
    if cols.shape[0] == 1:
        return torch.sparse.mm(w_csr, cols[0]).unsqueeze(0)
    return torch.stack([torch.sparse.mm(w_csr, cols[i]) for i in range(cols.shape[0])])


class _SparseConv(nn.Module):
    """im2col + CSR matmul on a ``(B, C, H, W)`` input; a Conv1d is held as a ``1 x k`` Conv2d.

    A ``1x1`` kernel with stride 1 and no padding skips the im2col: each sample's ``(C, H*W)`` view
    is already the matrix the CSR weight multiplies.
    """

    def __init__(self, conv: nn.Conv1d | nn.Conv2d):
        super().__init__()
        if not _conv_supported(conv):
            raise FlowpruneError(f"{type(self).__name__} supports groups=1, zero padding given as integers only")

        def pair(v: tuple[int, ...], lead: int) -> tuple[int, int]:
            return (lead, *v) if len(v) == 1 else tuple(v)

        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = pair(conv.kernel_size, 1), pair(conv.stride, 1)
        self.padding, self.dilation = pair(conv.padding, 0), pair(conv.dilation, 1)
        self.pointwise = self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
        self.weight_csr = _csr(conv.weight.detach().reshape(conv.out_channels, -1))
        self.bias = None if conv.bias is None else conv.bias.detach().clone()
        self.nnz = int(self.weight_csr.values().numel())

    def _conv2d(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        kh, kw = self.kernel_size
        ho = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        wo = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        if self.pointwise:
            cols = x.reshape(b, self.in_channels, h * w).contiguous()
        else:
            cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        y = _csr_times_samples(self.weight_csr, cols).reshape(b, self.out_channels, ho, wo)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y


class SparseConv2d(_SparseConv):
    """Inference-only Conv2d (``groups=1``) as im2col + CSR matmul. Input ``(B, C, H, W)``."""

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv2d(x)


class SparseConv1d(_SparseConv):
    """Inference-only Conv1d (``groups=1``) as im2col + CSR matmul. Input ``(B, C, L)``.

    Computed as the ``1 x k`` Conv2d on the ``(B, C, 1, L)`` view (``F.unfold``); a kernel of size 1
    with stride 1 and no padding uses the input as it is.
    """

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv2d(x.unsqueeze(2)).squeeze(2)


def sparse_layer(module: nn.Module) -> nn.Module | None:
    """The CSR form of a Linear / Conv1d / Conv2d (``groups=1``, integer zero padding), else ``None``."""
    if isinstance(module, nn.Linear):
        return SparseLinear(module)
    if isinstance(module, nn.Conv2d) and _conv_supported(module):
        return SparseConv2d(module)
    if isinstance(module, nn.Conv1d) and _conv_supported(module):
        return SparseConv1d(module)
    return None


def _median_seconds(dense: nn.Module, sparse: nn.Module, x: torch.Tensor, reps: int) -> tuple[float, float]:
    """Median seconds of the dense and the sparse layer on ``x``, timed together (interleaved rounds)."""
    from flowprune.timing import time_callables

    t = time_callables({"dense": lambda: dense(x), "sparse": lambda: sparse(x)}, device=x.device, rounds=reps,
                       warmup=1, min_round_s=0.0)
    return t.median["dense"], t.median["sparse"]


def to_sparse_execution(model: nn.Module, *, min_sparsity: float = 0.7, linear: bool = True,
                        conv: bool = True, example_input: torch.Tensor | None = None,
                        reps: int = 20) -> nn.Module:
    """A copy of ``model`` (masks baked) with sparse-enough Linear/Conv1d/Conv2d layers on CSR kernels.

    Layers with fewer than ``min_sparsity`` zeros stay dense. With ``example_input`` (a batch of
    the size you will run), each candidate layer is timed dense and sparse on the input it sees
    for that batch (the two timed together by :mod:`flowprune.timing`, medians of ``reps``
    interleaved rounds) and converted only when the sparse form is faster
    there: the sparse path then never loses to dense layer by layer. ``model.sparse_decisions``
    records ``{layer: {"dense_ms", "sparse_ms", "sparse"}}``. The copy is for inference (eval
    mode, no gradients); ``model.sparse_layers`` lists the converted layers.
    """
    check_fraction("min_sparsity", min_sparsity, high_open=False)
    check_positive_int("reps", reps)
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        raise FlowpruneError(f"example_input must be a tensor batch (e.g. torch.randn(256, 1, 28, 28)), got "
                             f"{type(example_input).__name__}")
    net = bake(model).eval()
    inputs: dict[str, torch.Tensor] = {}
    if example_input is not None:
        hooks = []
        for name, m in net.named_modules():
            if name and isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                hooks.append(m.register_forward_pre_hook(
                    lambda mod, args, _n=name: inputs.__setitem__(_n, args[0].detach())))
        with torch.no_grad():
            net(example_input)
        for h in hooks:
            h.remove()
    converted, decisions = [], {}
    for name, m in list(net.named_modules()):
        if not name:
            continue
        new = None
        wanted = (linear and isinstance(m, nn.Linear)) or (conv and isinstance(m, (nn.Conv1d, nn.Conv2d)))
        if wanted and float((m.weight == 0).float().mean()) >= min_sparsity:
            new = sparse_layer(m)
        if new is not None and example_input is not None and name in inputs:
            x = inputs[name]
            with torch.no_grad():
                td, tsp = _median_seconds(m, new, x, reps)
            decisions[name] = {"dense_ms": 1e3 * td, "sparse_ms": 1e3 * tsp, "sparse": tsp < td}
            if tsp >= td:
                new = None
        if new is not None:
            parent_name, _, child = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            setattr(parent, child, new)
            converted.append(name)
    net.sparse_layers = converted
    net.sparse_decisions = decisions
    return net.eval()
