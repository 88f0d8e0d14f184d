"""What every registry package shares: importing each of its modules, so a file registers itself.

``flowprune.scores``, ``flowprune.procedures`` and ``flowprune.route.routers`` call
:func:`import_submodules` at the end of their ``__init__``: dropping ``my_thing.py`` (with its
``@register_...`` decorator) into the folder is all it takes for the name to exist.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable


def import_submodules(package: str, path: Iterable[str], skip: tuple[str, ...] = ("base",)) -> list[str]:
    """Import every module of ``package`` (found on ``path``, its ``__path__``) except ``skip`` and
    private ``_*`` ones, in name order. Returns the module names imported."""
    names = []
    for info in sorted(pkgutil.iter_modules(list(path)), key=lambda i: i.name):
        if info.name not in skip and not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
            names.append(info.name)
    return names
