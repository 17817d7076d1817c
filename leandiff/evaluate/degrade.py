"""Controlled degradations of real images, to check that a metric sees what it should: it must
grow monotonically with Gaussian noise and with blur, and with a missing class (mode dropping)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def add_noise(x: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """x + σ·ε with seeded ε, clamped to the data range [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with standard deviation σ pixels (kernel radius ⌈3σ⌉, border
    replicated); σ = 0 returns x unchanged."""
    if sigma <= 0:
        return x
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float64) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def drop_class(x: torch.Tensor, labels: torch.Tensor, cls: int) -> torch.Tensor:
    """The images of every class but ``cls``."""
    return x[labels != cls]
