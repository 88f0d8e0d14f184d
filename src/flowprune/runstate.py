"""Checkpoint and resume for long runs: one helper shared by every procedure.

A :class:`RunState` owns a checkpoint directory. After every finished step a procedure calls
:meth:`RunState.save` with its state (a JSON-safe dict) and, optionally, the model: the model is
written first (flowprune.io format, atomic), then ``state.json`` (atomic rename), so a crash at
any point loses at most the step in flight. The model and the state stay a pair: a model saved
again under the same name goes to the other of two directories (``NAME`` / ``NAME.alt``) and
``state.json`` records which one belongs to it (``_models``), so a kill after the model's write
and before the state's leaves the state with its own model, not the newer one; the directory the
state no longer names is removed after the state is written. :meth:`RunState.load` returns the last saved state,
or ``None`` for a fresh directory, and refuses a directory written by a run with other settings
(the error names the file and the fix). Under torchrun only rank 0 writes.

``state.json`` is written by :func:`flowprune.report.write_results` (atomic, NaN-safe); the atomic
``torch.save`` writer the training loops use is here too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flowprune.config import jsonable
from flowprune.errors import FlowpruneError
from flowprune.report.results import write_results

ALT_SUFFIX = ".alt"  # the second directory of a model saved again under the same name


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` through a temporary file and an atomic rename."""
    import torch

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


class RunState:
    """The checkpoint directory of one run of ``procedure`` with settings ``config``."""

    def __init__(self, directory: str | os.PathLike, procedure: str, config: dict, *,
                 state_file: str = "state.json"):
        self.dir = Path(directory)
        self.procedure = procedure
        self.config = jsonable(config)
        self.file = self.dir / state_file
        self._models: dict[str, str] = {}  # model name -> the directory the saved state belongs with

    def load(self) -> dict | None:
        """The last saved state, or ``None`` when the directory holds none."""
        if not self.file.exists():
            return None
        try:
            state = json.loads(self.file.read_text())
        except (OSError, ValueError) as e:
            raise FlowpruneError(f"checkpoint state {self.file} cannot be read ({e}); delete it or use a "
                                 "fresh checkpoint directory") from None
        if not isinstance(state, dict) or state.get("config") != self.config:
            raise FlowpruneError(f"checkpoint {self.file} was written by a {self.procedure} run with other "
                                 "arguments (other settings); use a fresh checkpoint directory or the same arguments")
        models = state.pop("_models", {})
        self._models = {str(k): str(v) for k, v in models.items()} if isinstance(models, dict) else {}
        return state

    def save(self, state: dict, model=None, *, model_name: str = "model", metadata: dict | None = None) -> None:
        """Save ``model`` (if given) under ``model_name``, then ``state`` with the config, atomically."""
        from flowprune.distributed import is_main

        if not is_main():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        models = dict(self._models)
        if model is not None:
            from flowprune import io

            alt = model_name + ALT_SUFFIX
            target = alt if models.get(model_name) == model_name else model_name  # not the state's own copy
            io.save(model, self.dir / target, metadata=metadata or {"method": self.procedure, "checkpoint": True})
            models[model_name] = target
        write_results(self.file, {**jsonable(state), "config": self.config, "_models": models})
        self._models = models
        if model is not None:
            import shutil

            stale = self.dir / (model_name if models[model_name] != model_name else model_name + ALT_SUFFIX)
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)

    def load_model(self, model_name: str = "model"):
        """The model saved under ``model_name`` with the loaded state (flowprune.io format; no code
        runs from the file)."""
        from flowprune import io

        return io.load(self.dir / self._models.get(model_name, model_name))
