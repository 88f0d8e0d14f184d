"""Warnings of one run: each printed once and short, the full list kept for ``results.json``.

A library step that finds something the user should know (layers it cannot cut, channels left
intact) calls :func:`warn` with a message and the names it is about. Inside :func:`collect` (the
``flowprune`` command wraps every command in one; :func:`flowprune.prune` wraps itself too) the
same warning (same message, same names) is logged only the first time, as one short line -- the
count, the first few names and "full list in results.json" -- and recorded in full in the
collector: :func:`recorded` / the ``warnings`` list of ``results.json`` and of
``PruneResult.to_dict()``. Outside any collector each distinct warning is logged once per process.

Why not :mod:`warnings`: its "once" filters key on the call site and the text, and the text here
is the long list itself; the full list must also reach ``results.json``, which a filter cannot do.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator, Mapping, Sequence

SHOWN = 3  # names printed in the short line
SHORT_REASON = 100  # a reason up to this long is printed after its name (when all names are shown)
_CURRENT: contextvars.ContextVar[list[dict] | None] = contextvars.ContextVar("flowprune_notices", default=None)
_PROCESS: list[dict] = []  # what was warned outside any collector (deduplicated per process)


def short_text(message: str, items: Sequence[str], reasons: Mapping[str, str] | None = None) -> str:
    """``message: N (a; b; c; ... full list in results.json)`` -- the line that is printed. With at
    most :data:`SHOWN` names, a short reason (:data:`SHORT_REASON` characters at most) follows its name."""
    if not items:
        return message
    shown = list(items[:SHOWN])
    if len(items) <= SHOWN and reasons:
        shown = [f"{n}: {reasons[n]}" if len(str(reasons.get(n, ""))) in range(1, SHORT_REASON + 1) else n
                 for n in shown]
    head = "; ".join(shown)
    more = f"; ... {len(items) - SHOWN} more, full list in results.json" if len(items) > SHOWN else ""
    return f"{message}: {len(items)} ({head}{more})"


def warn(logger: logging.Logger, message: str, items: Sequence[str] = (),
         reasons: Mapping[str, str] | None = None) -> bool:
    """Log ``message`` about ``items`` (names) once per run, short; record it in full, with the
    ``reasons`` of each name when given. True when it was logged now, False for a repeat."""
    items = [str(i) for i in items]
    record = {"message": message, "count": len(items), "items": items}
    if reasons:
        record["reasons"] = {str(k): str(v) for k, v in reasons.items()}
    store = _CURRENT.get()
    if store is None:
        store = _PROCESS
    if record in store:
        return False
    store.append(record)
    logger.warning(short_text(message, items, record.get("reasons")))
    return True


def recorded() -> list[dict]:
    """The warnings of the innermost active collector (a copy), or ``[]`` outside one."""
    store = _CURRENT.get()
    return [dict(r) for r in store] if store is not None else []


@contextlib.contextmanager
def collect() -> Iterator[list[dict]]:
    """One run's warnings: yields the list the run's warnings go to. Nested: the outer run's list."""
    store = _CURRENT.get()
    if store is not None:
        yield store
        return
    store = []
    token = _CURRENT.set(store)
    try:
        yield store
    finally:
        _CURRENT.reset(token)
