"""Models shared by the offload tests."""

from __future__ import annotations

import torch


class Residual(torch.nn.Module):
    """``x + moe(x)`` blocks: consecutive layers see similar inputs, as in a decoder."""

    def __init__(self, layers):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x
