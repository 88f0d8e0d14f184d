"""How many CPU threads torch uses: never more than the cores other processes leave free.

torch's own default is one OpenMP thread per physical core. On a machine where another process
already keeps a core busy, those threads wait for each other at every parallel region (OpenMP
threads spin at the barrier, and one of them shares a core with the other process), and a run
gets many times slower, not 2x (measured in docs/robustness.md, "CPU threads").

The ``flowprune`` command sets the thread count once, before any work, from (first match wins):

1. ``--threads N``;
2. ``FLOWPRUNE_THREADS=N`` in the environment;
3. ``OMP_NUM_THREADS`` in the environment: torch already follows it, flowprune leaves it alone;
4. otherwise torch's count, lowered to the idle cores: the CPUs this process may run on minus
   the 1-minute load average (rounded), at least 1 (:func:`idle_cores`). It is never raised, so a
   caller that set fewer threads (a test suite calling ``flowprune.cli.main``) keeps them.

The count is read once, at the start of the command: a machine that gets busy later is not
followed (torch cannot change its OpenMP pool size cheaply mid-run).

The library (``import flowprune``) never changes the thread count; call :func:`configure` or
``torch.set_num_threads`` yourself.
"""

from __future__ import annotations

import os

from flowprune.errors import FlowpruneError

ENV_VAR = "FLOWPRUNE_THREADS"
MAX_THREADS = 1024


def check_threads(value: object, what: str = "--threads") -> int:
    """``value`` as an integer in [1, MAX_THREADS]; a FlowpruneError naming ``what`` otherwise."""
    try:
        v = int(str(value).strip())
    except ValueError:
        raise FlowpruneError(f"{what} must be an integer in [1, {MAX_THREADS}], got {value!r}") from None
    if not 1 <= v <= MAX_THREADS:
        raise FlowpruneError(f"{what} must be an integer in [1, {MAX_THREADS}], got {value!r}")
    return v


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def idle_cores(load: float | None = None, cpus: int | None = None) -> int:
    """``cpus`` minus the rounded 1-minute ``load`` average (both read from the OS by default), >= 1."""
    if cpus is None:
        cpus = usable_cpus()
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    return max(1, min(cpus, cpus - int(round(load))))


def choose(threads: int | None = None, environ: dict | None = None) -> tuple[int | None, str]:
    """``(count, why)``: the thread count to set (None: leave torch's, it follows OMP_NUM_THREADS)."""
    env = os.environ if environ is None else environ
    if threads is not None:
        return check_threads(threads), "--threads"
    if env.get(ENV_VAR, "").strip():
        return check_threads(env[ENV_VAR], ENV_VAR), ENV_VAR
    if env.get("OMP_NUM_THREADS", "").strip():
        return None, "OMP_NUM_THREADS"
    import torch

    return min(torch.get_num_threads(), idle_cores()), "idle cores (CPUs minus the load average)"


def configure(threads: int | None = None) -> int:
    """Set torch's intra-op thread count as :func:`choose` says; returns the count in use."""
    import torch

    n, _ = choose(threads)
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()
