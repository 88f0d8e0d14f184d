"""A guard around oneDNN (mkldnn) convolution backward for structurally pruned models.

Observed here with torch 2.14.1 on x86-64 CPUs: after a structural cut leaves convolutions
whose channel counts are not multiples of 8 (say 9 -> 19), oneDNN's
``jit_avx2_1x1_convolution_bwd_weights`` kernel can spin for many minutes in one backward pass,
and once crashed a process with "double free or corruption". The same shapes train normally on
PyTorch's native convolution path. Dense models (16/32/64 channels) are not affected, so the
guard switches oneDNN off only while a model with such irregular widths is differentiated.

``FLOWPRUNE_MKLDNN=1`` keeps oneDNN on regardless; ``FLOWPRUNE_MKLDNN=0`` always turns it off.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
from torch import nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def has_irregular_convs(model: nn.Module, multiple: int = 8) -> bool:
    """True if any convolution's in/out channel count is not a multiple of ``multiple``.

    The model's first convolution (whose input channels are the data's, e.g. 1 or 3) is not counted.
    """
    first = True
    for m in model.modules():
        if isinstance(m, _CONVS):
            chans = [m.out_channels] if first else [m.in_channels, m.out_channels]
            first = False
            if any(c % multiple for c in chans):
                return True
    return False


@contextlib.contextmanager
def safe_conv_backward(model: nn.Module):
    """Run the block with oneDNN convolutions disabled when ``model`` has irregular conv widths."""
    env = os.environ.get("FLOWPRUNE_MKLDNN")
    if env == "1" or (env != "0" and not has_irregular_convs(model)):
        yield
        return
    with warnings.catch_warnings():
        # torch warns about TF32 on Intel GPUs whenever the oneDNN flags are touched; irrelevant here
        warnings.filterwarnings("ignore", message=".*TF32 acceleration on top of oneDNN.*")
        with torch.backends.mkldnn.flags(enabled=False):
            yield
