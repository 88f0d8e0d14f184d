"""Hugging Face ``transformers`` models in and out of flowprune (the ``flowprune[hf]`` extra).

* :mod:`flowprune.hf.adapter` -- :class:`TensorIO`: ``model(x) -> logits`` for scores and measures;
* :mod:`flowprune.hf.units` -- attention heads (whole key/value groups) and MLP neurons by layout,
  each carrying its own surgery (registered with :mod:`flowprune.unit_providers`);
* :mod:`flowprune.hf.io` -- ``save_pretrained``-compatible directories plus a validated record of
  per-layer widths; :func:`from_pretrained` rebuilds them pickle-free, offline.

transformers itself is imported only when a model is saved or loaded.
"""

from __future__ import annotations

from flowprune.hf import units as _units  # noqa: F401 -- registers the unit provider
from flowprune.hf.adapter import TensorIO, as_tensor_model, is_hf_model, unwrap
from flowprune.hf.io import from_pretrained

__all__ = ["TensorIO", "as_tensor_model", "from_pretrained", "is_hf_model", "unwrap"]
