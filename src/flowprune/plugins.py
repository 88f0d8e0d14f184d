"""Extensions that live outside the package: scores, routers and pruning procedures in your own files.

A score, router or procedure registers itself when its module is imported (``@register_score``,
``@register_router``, ``@register_procedure``). A file inside the package's ``scores/``,
``route/routers``/``procedures/`` folders is imported with the package; a file anywhere else is
imported by :func:`load_plugins`, which the ``flowprune`` command calls before it builds its
argument parser, so the new name appears in ``--method`` / ``--router`` / ``--methods`` choices
and in :func:`flowprune.compare` without another edit.

Where plugins come from (in this order, each imported once):

* the ``FLOWPRUNE_PLUGINS`` environment variable: module names (``mypkg.my_score``) or paths of
  ``.py`` files, separated by commas (or ``os.pathsep``);
* installed packages that declare an entry point in the group ``flowprune.plugins``.

This imports code the user named on purpose, like ``python -m``. It is unrelated to loading
a saved model, which never runs code from a file (:mod:`flowprune.io`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType

from flowprune.errors import FlowpruneError

ENV_VAR = "FLOWPRUNE_PLUGINS"
ENTRY_POINT_GROUP = "flowprune.plugins"
_LOADED: dict[str, ModuleType] = {}


def _import_file(path: Path) -> ModuleType:
    name = "flowprune_plugin_" + re.sub(r"\W", "_", str(path.resolve()))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FlowpruneError(f"plugin {str(path)!r} cannot be imported; give a .py file or a module name")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception as e:
        del sys.modules[name]
        raise _failed(str(path), e) from e
    return mod


def _failed(name: str, e: BaseException) -> FlowpruneError:
    """One line naming the plugin and what its import raised (the traceback stays in ``__cause__``)."""
    where = ""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None:
        where = f" at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return FlowpruneError(f"plugin {name!r} failed to import: {type(e).__name__}{': ' + msg if msg else ''}{where}; "
                          f"fix it or remove it from {ENV_VAR} (--debug shows the traceback)")


def load_plugin(spec: str) -> ModuleType:
    """Import one plugin: a module name or the path of a ``.py`` file. Returns the module."""
    spec = spec.strip()
    if not spec:
        raise FlowpruneError("an empty plugin name; give a module name or a .py file path")
    if spec in _LOADED:
        return _LOADED[spec]
    if spec.endswith(".py") or os.sep in spec or "/" in spec:
        path = Path(spec)
        if not path.is_file():
            raise FlowpruneError(f"plugin file {spec!r} does not exist (from {ENV_VAR} or load_plugin)")
        mod = _import_file(path)
    else:
        try:
            mod = importlib.import_module(spec)
        except ModuleNotFoundError as e:
            if e.name is not None and spec != e.name and not spec.startswith(e.name + "."):
                raise _failed(spec, e) from e  # the plugin exists; something it imports does not
            raise FlowpruneError(f"plugin module {spec!r} cannot be imported ({e}); check {ENV_VAR} or install "
                                 "the package that provides it") from None
        except Exception as e:
            raise _failed(spec, e) from e
    _LOADED[spec] = mod
    return mod


def load_plugins(specs: str | list[str] | None = None, *, entry_points: bool = True) -> list[ModuleType]:
    """Import every plugin named in ``specs`` (default: ``$FLOWPRUNE_PLUGINS``) and, with
    ``entry_points``, every installed ``flowprune.plugins`` entry point. Returns the modules."""
    if specs is None:
        specs = os.environ.get(ENV_VAR, "")
    if isinstance(specs, str):
        specs = [s for s in re.split("[," + re.escape(os.pathsep) + "]", specs) if s.strip()]
    mods = [load_plugin(s) for s in specs]
    if entry_points:
        from importlib.metadata import entry_points as eps

        for ep in eps(group=ENTRY_POINT_GROUP):
            if ep.value not in _LOADED:
                try:
                    _LOADED[ep.value] = ep.load()
                except Exception as e:
                    raise _failed(f"{ep.name} = {ep.value} (entry point)", e) from e
                mods.append(_LOADED[ep.value])
    return mods
