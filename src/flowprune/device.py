"""Where flowprune runs: device names, validation, synchronisation and mixed precision.

``resolve_device(spec, model=None)`` turns what a user wrote (``auto``, ``cpu``, ``cuda``,
``cuda:N``, ``mps``, a :class:`torch.device`, or ``None``) into a :class:`torch.device`, or raises
one :class:`~flowprune.errors.FlowpruneError` naming the value and what this machine allows,
before any work is done:

* ``None`` inside a :func:`use` block (the CLI's ``--device``): that block's device.
* ``None`` / ``"auto"``: the model's device when a model is given and its parameters are not on
  the CPU; otherwise CUDA when available (under ``torchrun``: ``cuda:LOCAL_RANK``), else CPU.
  (``None`` with a model on the CPU keeps the CPU: a library call never moves a user's model
  elsewhere unasked; ``"auto"`` picks the accelerator.)
* ``cuda`` without a usable CUDA device, ``cuda:N`` with N past the last device, ``mps`` where
  Apple's Metal backend is not available, an unknown string: FlowpruneError.

``synchronize(device)`` waits for the device's queued work (a no-op on the CPU); timings call
it before reading the clock. ``autocast(device, amp)`` is the ``torch.autocast`` context of a
mixed-precision mode (``none``, ``bf16``, ``fp16``) on a device, validated by :func:`check_amp`.
"""

from __future__ import annotations

import contextlib
import os
import re

import torch
from torch import nn

from flowprune.errors import FlowpruneError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
AMP_MODES = ("none", "bf16", "fp16")
_SPEC = re.compile(r"^(auto|cpu|mps|cuda)(?::(\d+))?$")
_defaults: list[tuple[torch.device, str]] = []  # the stack of :func:`use` blocks


@contextlib.contextmanager
def use(device: str | torch.device | None = None, amp: str | None = None):
    """Inside the block, ``device=None`` / ``amp=None`` in flowprune's functions mean ``device`` /
    ``amp`` (the CLI's ``--device`` and ``--amp`` work this way). Validated on entry."""
    dev = resolve_device(device if device is not None else "auto")
    mode = check_amp(amp, dev)
    _defaults.append((dev, mode))
    try:
        yield dev
    finally:
        _defaults.pop()


def current() -> torch.device | None:
    """The device of the innermost :func:`use` block (None outside any)."""
    return _defaults[-1][0] if _defaults else None


def default_amp() -> str:
    """The ``amp`` of the innermost :func:`use` block ("none" outside any)."""
    return _defaults[-1][1] if _defaults else "none"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """The device names this machine accepts (``cpu`` always)."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        out.append("mps")
    return out


def model_device(model: nn.Module | None) -> torch.device | None:
    """The device of the model's first parameter (or buffer); None for no model / no tensors."""
    if model is None:
        return None
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def _bad(spec: object, why: str) -> FlowpruneError:
    return FlowpruneError(f"device {spec!r} {why}; allowed here: auto, {', '.join(available_devices())} "
                          f"(forms: {', '.join(DEVICE_CHOICES)})")


def _default_accelerator() -> torch.device:
    if torch.cuda.is_available():
        local = os.environ.get("LOCAL_RANK")
        idx = int(local) if local is not None and local.isdigit() else torch.cuda.current_device()
        return torch.device("cuda", idx % max(1, torch.cuda.device_count()))
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(spec: str | torch.device | None = None, model: nn.Module | None = None) -> torch.device:
    """``spec`` as a :class:`torch.device` usable on this machine, else FlowpruneError (see the module doc)."""
    if spec is None and _defaults:
        return _defaults[-1][0]
    if spec is None:
        dev = model_device(model)
        if dev is not None and dev.type != "cpu":
            return dev
        return torch.device("cpu") if model is not None else _default_accelerator()
    if isinstance(spec, torch.device):
        text = str(spec)
    elif isinstance(spec, str):
        text = spec.strip().lower()
    else:
        raise _bad(spec, f"must be a string or torch.device, not {type(spec).__name__}")
    m = _SPEC.match(text)
    if m is None:
        raise _bad(spec, "is not a device name")
    kind, index = m.group(1), m.group(2)
    if kind == "auto":
        if index is not None:
            raise _bad(spec, "is not a device name")
        dev = model_device(model)
        return dev if dev is not None and dev.type != "cpu" else _default_accelerator()
    if kind == "cpu":
        if index not in (None, "0"):
            raise _bad(spec, "is not a device name")
        return torch.device("cpu")
    if kind == "mps":
        if not _mps_available():
            raise _bad(spec, "is not available: this PyTorch build or machine has no Apple Metal (MPS) backend")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise _bad(spec, "is not available: no CUDA GPU is visible to PyTorch on this machine "
                         "(use --device cpu, or check the driver and CUDA_VISIBLE_DEVICES)")
    n = torch.cuda.device_count()
    if index is None:
        if os.environ.get("LOCAL_RANK", "").isdigit():  # torchrun: one GPU per local rank
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]) % n)
        return torch.device("cuda", torch.cuda.current_device())
    if int(index) >= n:
        raise _bad(spec, f"is past the last GPU: this machine has {n} (cuda:0..cuda:{n - 1})")
    return torch.device("cuda", int(index))


def synchronize(device: str | torch.device | None) -> None:
    """Wait until every kernel queued on ``device`` has finished (no-op on the CPU / None)."""
    if device is None:
        return
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":  # pragma: no cover - Apple only
        torch.mps.synchronize()


def check_amp(amp: str | None, device: str | torch.device | None = None) -> str:
    """A mixed-precision mode (``none``, ``bf16``, ``fp16``), else FlowpruneError.

    ``fp16`` needs CUDA (loss scaling with ``torch.amp.GradScaler``); ``bf16`` runs on CUDA and on
    the CPU (``torch.autocast("cpu", dtype=torch.bfloat16)``).
    """
    mode = "none" if amp is None else amp
    if not isinstance(mode, str) or mode.strip().lower() not in AMP_MODES:
        raise FlowpruneError(f"amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    mode = mode.strip().lower()
    if device is not None:
        dev = torch.device(device)
        if mode == "fp16" and dev.type != "cuda":
            raise FlowpruneError(f"amp 'fp16' needs a CUDA device (it uses loss scaling), got device {str(dev)!r}; "
                                 "use --amp bf16 on the CPU, or --amp none")
        if mode == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise FlowpruneError(f"amp 'bf16' is not supported by GPU {str(dev)!r}; use --amp fp16 or --amp none")
        if mode != "none" and dev.type not in ("cuda", "cpu"):
            raise FlowpruneError(f"amp {mode!r} is supported on cuda and cpu devices, not {dev.type!r}; "
                                 "use --amp none")
    return mode


def amp_dtype(amp: str) -> torch.dtype | None:
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: str | torch.device, amp: str):
    """The ``torch.autocast`` context for ``amp`` on ``device`` (a null context for ``none``)."""
    dtype = amp_dtype(amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def move_copy(model: nn.Module, device: str | torch.device | None) -> tuple[nn.Module, torch.device]:
    """``(model, device)`` with the model on the resolved device: the model itself when it is already
    there, else a deep copy moved there (the caller's model is never moved). ``flowprune_base`` and
    other attributes travel with the copy."""
    import copy

    dev = resolve_device(device, model)
    cur = model_device(model)
    if cur is None or _same(cur, dev):
        return model, dev
    return copy.deepcopy(model).to(dev), dev


def _same(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        ia = a.index if a.index is not None else torch.cuda.current_device()
        ib = b.index if b.index is not None else torch.cuda.current_device()
        return ia == ib
    return True
