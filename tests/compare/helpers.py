"""Helpers shared by test_compare.py and test_report.py: a cheap feature extractor and weight damage."""

from __future__ import annotations

import torch
from torch import nn


class TinyFeatures(nn.Module):
    """A fixed, seeded conv feature extractor (uint8 in, 64 features out): FID/KID/KL's code path in a blink.

    The InceptionV3 path (`fid_features="fid-helper"`) runs in the notebook test (tests/test_report.py)."""

    num_features = 64
    label = "tiny random conv features"

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 32, 5, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.1)
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x.float() / 127.5 - 1))
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)


def damage(module: nn.Module, scale: float, seed: int = 1) -> nn.Module:
    """Add Gaussian noise of `scale` times each tensor's own spread to every weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.float().std().clamp(min=1e-3) if p.numel() > 1 else 0)
    return module
