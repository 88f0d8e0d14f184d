"""Several processes, one result: flowprune under ``torchrun``.

    torchrun --nproc-per-node 2 -m flowprune prune --checkpoint runs/dense --data mnist5k \\
             --method agf --target-macs 4x --out runs/agf4x

Every process (rank) runs the same command on the same data and the same seeds (SPMD); the
work is split where it is heavy and the results are made identical on every rank:

* **Scores** (:meth:`flowprune.scores.base.Score.__call__`): the calibration batches are dealt
  out ``batches[rank::world]``; every rank scores its share and the per-rank results are
  combined with the right weights (a score that is a mean over batches, as AGF and Taylor, by
  batch count; a mean over samples, as IDAP++'s divergence, by sample count), so the scores equal
  the single-process scores on all the batches (to float rounding). Scores that cannot be split
  (trajectory calibration, activation norms) run on all batches on every rank. Either way the
  result is broadcast from rank 0, so every rank plans the same cuts.
* **Training and recovery** (:func:`flowprune.train.fit`): the model is wrapped in
  ``DistributedDataParallel`` for the run (again after every cut, since ``fit`` is called on the
  cut model); every rank walks the same global batches of flowprune's ``TensorBatchLoader`` and
  takes its contiguous slice of each (the DistributedSampler equivalent that keeps the global
  batch, its order and augmentation identical to a single-process run), and the loss is scaled so
  the averaged gradient is the gradient of the global batch's mean loss.
* **Accuracy** (:func:`flowprune.measure.accuracy`): evaluation batches are dealt out and the
  counts summed, so accept/reject decisions (IDAP++'s budget) are the same on every rank.
* **Files**: only rank 0 writes into ``--out`` (the CLI gives the other ranks a private scratch
  copy that is removed at the end), and only rank 0 prints results.

The process group is initialised from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) with ``gloo`` on the CPU and ``nccl`` on CUDA,
and a timeout (``FLOWPRUNE_DIST_TIMEOUT`` seconds, default 300): when a rank dies, the others stop
with one clear message instead of hanging. Outside torchrun (no ``WORLD_SIZE`` or 1) every
function here is a cheap no-op and flowprune runs as one process.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch

from flowprune.errors import FlowpruneError

DEFAULT_TIMEOUT_S = 300.0
_state = {"local": 0, "owned": False, "timeout": DEFAULT_TIMEOUT_S}


def _dist():
    import torch.distributed as dist

    return dist


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise FlowpruneError(f"WORLD_SIZE must be an integer, got {os.environ.get('WORLD_SIZE')!r}") from None


def timeout_seconds() -> float:
    raw = os.environ.get("FLOWPRUNE_DIST_TIMEOUT")
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        v = float(raw)
    except ValueError:
        v = -1.0
    if not v > 0:
        raise FlowpruneError(f"FLOWPRUNE_DIST_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return v


def init_from_env(device: str | torch.device | None = None) -> bool:
    """Join the torchrun job described by the environment; True if this call created the process group.

    No-op (False) when ``WORLD_SIZE`` is unset or 1, or a process group already exists. The
    backend is ``nccl`` when ``device`` is CUDA, else ``gloo``; on CUDA the process's default GPU
    is set to ``cuda:LOCAL_RANK``.
    """
    dist = _dist()
    if env_world_size() <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise FlowpruneError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {var} is not set; start several "
                                 "processes with `torchrun --nproc-per-node N -m flowprune ...`")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    t = timeout_seconds()
    _state["timeout"] = t
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=t))
    except Exception as e:  # noqa: BLE001 - a rendezvous failure is a user-facing problem
        raise FlowpruneError(f"could not join the torchrun job ({backend} at {os.environ.get('MASTER_ADDR')}:"
                             f"{os.environ.get('MASTER_PORT')}): {type(e).__name__}: {e}") from None
    _state["owned"] = True
    return True


def shutdown() -> None:
    """Destroy the process group if :func:`init_from_env` created it."""
    dist = _dist()
    if _state["owned"] and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    _state["owned"] = False


def is_initialized() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def active() -> bool:
    """True when collectives are in force: a process group of more than one rank, outside :func:`local`."""
    return _state["local"] == 0 and is_initialized() and _dist().get_world_size() > 1


def world_size() -> int:
    return _dist().get_world_size() if active() else 1


def rank() -> int:
    return _dist().get_rank() if active() else 0


def is_main() -> bool:
    """True on rank 0 (and in a single-process run): the rank that writes files and prints results."""
    return not is_initialized() or _dist().get_rank() == 0


@contextlib.contextmanager
def local():
    """Inside this block flowprune acts as one process (no collectives): for code that runs on one rank."""
    _state["local"] += 1
    try:
        yield
    finally:
        _state["local"] -= 1


def _comm_device() -> torch.device:
    if _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective(what: str, fn):
    try:
        return fn()
    except FlowpruneError:
        raise
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError / DistBackendError subclasses
        raise FlowpruneError(
            f"rank {_dist().get_rank()}: {what} failed: another process of the torchrun job stopped or did not "
            f"answer within {_state['timeout']:g} s ({type(e).__name__}: {str(e).splitlines()[0][:200]}); see that "
            "rank's error above (FLOWPRUNE_DIST_TIMEOUT sets the wait)") from None


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over the ranks (a new tensor on ``tensor``'s device and dtype).

    Single process: ``tensor`` itself.
    """
    if not active():
        return tensor
    buf = tensor.detach().clone(memory_format=torch.contiguous_format).to(_comm_device())
    _collective("all_reduce", lambda: _dist().all_reduce(buf, op=_dist().ReduceOp.SUM))
    return buf.to(tensor.device)


def broadcast_tensor(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s ``tensor`` on every rank (same shape and dtype on every rank required)."""
    if not active():
        return tensor
    buf = tensor.detach().clone(memory_format=torch.contiguous_format).to(_comm_device())
    _collective("broadcast", lambda: _dist().broadcast(buf, src=src))
    return buf.to(tensor.device)


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s picklable ``obj`` on every rank (what the others pass is ignored)."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    _collective("broadcast_object", lambda: _dist().broadcast_object_list(box, src=src,
                                                                         device=_comm_device()))
    return box[0]


def barrier() -> None:
    if active():
        _collective("barrier", lambda: _dist().barrier())


def shard(items: list, what: str = "calibration batches") -> list:
    """This rank's share ``items[rank::world]``; FlowpruneError if there are fewer items than ranks."""
    w = world_size()
    if w <= 1:
        return list(items)
    if len(items) < w:
        raise FlowpruneError(f"{len(items)} {what} cannot be shared by {w} processes: give at least {w} "
                             f"(e.g. --calib-batches {w}) or start fewer processes (torchrun --nproc-per-node)")
    return list(items)[rank()::w]


def batch_slice(n: int) -> slice:
    """This rank's contiguous slice of a global batch of ``n`` samples (``tensor_split`` sizes)."""
    w, r = world_size(), rank()
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into ``module`` on every rank, in place."""
    if not active():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            t.copy_(broadcast_tensor(t, src))
