"""Recurrent sequence classifiers for 1-D signals (the zoo's ``lstm1d`` / ``gru1d``).

A signal ``(B, C, L)`` (MNIST-1D: ``C = 1``, ``L = 40``) is read as a sequence of ``L`` steps of ``C``
features by an ``nn.LSTM`` / ``nn.GRU`` (``batch_first``); the classifier reads the output
sequence averaged over time (both directions' hidden units when bidirectional). Its hidden units
are flowprune's ``recurrent`` units (:mod:`flowprune.recurrent`).
"""

from __future__ import annotations

import torch
from torch import nn

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


class SeqRNN(nn.Module):
    """``rnn`` (LSTM or GRU over the time axis) -> mean over time -> ``fc``."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, cell: str = "lstm", hidden: int = 64,
                 layers: int = 1, bidirectional: bool = False):
        super().__init__()
        self.rnn = CELLS[cell](in_channels, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(hidden * (2 if bidirectional else 1), num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x.transpose(1, 2))
        return out.mean(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
