"""results.json files and plain-text (Markdown) tables."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 1) == 0:
        return _clean(v.item())
    if isinstance(v, Path):
        return str(v)
    return v


def write_results(path: str | os.PathLike, results: dict) -> Path:
    """Write ``results`` as indented JSON (NaN/inf become null), atomically; returns the path."""
    p = Path(path)
    if p.is_dir() or p.suffix != ".json":
        p = p / "results.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(results), indent=2))
    os.replace(tmp, p)
    return p


def fmt(v: Any, digits: int = 2) -> str:
    """Human format: big integers with SI suffixes, floats with ``digits`` decimals."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
            if abs(v) >= div:
                return f"{v / div:.2f}{unit}"
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None, *, title: str | None = None,
                 digits: int = 2) -> str:
    """A Markdown table (pipes) of ``rows``; strings are kept, numbers formatted by :func:`fmt`."""
    if not rows:
        return "(no rows)"
    cols = list(columns) if columns else list(dict.fromkeys(k for r in rows for k in r))
    cells = [[fmt(r.get(c), digits) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = []
    if title:
        lines.append(title)
    lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")
    return "\n".join(lines)
