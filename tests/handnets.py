"""Classifiers small enough to compute their outputs by hand."""

from __future__ import annotations

import torch
from torch import nn


class ConvGapLinear(nn.Module):
    """``conv`` (bias-free 1×1, weight (C, C_in)) -> global average pool -> ``fc`` (bias-free, weight (K, C)),
    so ``logit_k = Σ_j W_kj · mean(conv_j)``."""

    def __init__(self, conv_weight: torch.Tensor, fc_weight: torch.Tensor) -> None:
        super().__init__()
        self.conv = nn.Conv2d(conv_weight.shape[1], conv_weight.shape[0], 1, bias=False)
        self.fc = nn.Linear(fc_weight.shape[1], fc_weight.shape[0], bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(conv_weight[:, :, None, None])
            self.fc.weight.copy_(fc_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))
