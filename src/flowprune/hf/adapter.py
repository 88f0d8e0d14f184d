"""The input adapter of Hugging Face models: a tensor in, a logits tensor out.

flowprune's scores, compensation and measures call ``model(x)`` with one tensor batch and read a
tensor of logits. A ``transformers`` model takes its main input by name (``input_ids``,
``pixel_values``, ``input_features``: ``model.main_input_name``) and returns a ``ModelOutput``.
:class:`TensorIO` bridges the two without renaming anything: it *shares* the wrapped model's
children, parameters and buffers (the same dicts), so its module names, ``state_dict`` keys and
units are exactly those of the Hugging Face model, a cut of one is a cut of the other, and a
deep copy of the adapter copies the model once.

Labels: a classifier's logits ``(B, C)`` go with class labels ``(B,)``; a language model's
``(B, T, V)`` with next-token labels ``(B, T)`` (:func:`flowprune.scores.base.cross_entropy_sum`
then scores every token).
"""

from __future__ import annotations

import torch
from torch import nn


def is_hf_model(model) -> bool:
    """True for a ``transformers`` ``PreTrainedModel`` (checked without importing transformers)."""
    for cls in type(model).__mro__:
        if cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers."):
            return True
    return False


class TensorIO(nn.Module):
    """``model(x) -> logits`` for a Hugging Face model ``hf`` (see the module docstring)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        object.__setattr__(self, "hf", hf)  # not a child: the children are hf's own
        self._modules = hf._modules
        self._parameters = hf._parameters
        self._buffers = hf._buffers

    def train(self, mode: bool = True):
        super().train(mode)
        self.hf.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hf = self.hf
        kw = {hf.main_input_name: x}
        if getattr(hf.config, "use_cache", None) is not None:
            kw["use_cache"] = False
        if getattr(hf.config, "is_encoder_decoder", False):
            kw["decoder_input_ids"] = x  # teacher forcing on the input itself: scores every decoder unit
        out = hf(**kw)
        for key in ("logits", "last_hidden_state"):
            t = getattr(out, key, None)
            if isinstance(t, torch.Tensor):
                return t
        return out[0]


def as_tensor_model(model: nn.Module) -> nn.Module:
    """``model`` itself, or a :class:`TensorIO` around it when it is a Hugging Face model."""
    return TensorIO(model) if is_hf_model(model) else model


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a :class:`TensorIO` (with its flowprune metadata), else ``model``."""
    if not isinstance(model, TensorIO):
        return model
    hf = model.hf
    meta = getattr(model, "flowprune_metadata", None)
    if meta is not None:
        hf.flowprune_metadata = meta
    return hf
