"""Shared pieces of the solvers: the step pairs and small coefficient helpers."""
from __future__ import annotations

import torch

from ..denoiser import Denoiser
from ..errors import UserError
from ..schedule import alpha_sigma


def step_pairs(timesteps) -> list[tuple[float, float]]:
    """[(t_i, t_{i+1})] for a descending sequence, the last pair ending at t = -1 (clean data)."""
    ts = [float(t) for t in torch.as_tensor(timesteps).flatten().tolist()]
    if not ts:
        raise UserError("a solver needs at least one timestep")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise UserError(f"timesteps must be strictly decreasing, got {ts[:8]}...")
    return list(zip(ts, ts[1:] + [-1.0]))


def ab(denoiser: Denoiser, t: float) -> tuple[float, float]:
    """(ᾱ_t, 1 - ᾱ_t) as Python floats (float64 precision), ᾱ = 1 at t = -1."""
    a, s = alpha_sigma(denoiser.schedule, t)
    return a.item() ** 2, s.item() ** 2


def maybe_clip(x0: torch.Tensor, clip_x0: bool) -> torch.Tensor:
    return x0.clamp(-1, 1) if clip_x0 else x0


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
