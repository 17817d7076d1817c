"""Truncated start from a noised reference: early-stopped diffusion (ES-DDPM, Lyu et al. 2022,
arXiv 2205.12524) and SDEdit (Meng et al. 2022). Instead of drawing x_T ~ N(0, I), diffuse a
reference x_ref (a sample of a cheap generator, or an image to edit) to the first timestep ≤ t_start
with q(x_t | x_0) (DDPM eq. 4) and run any solver over the remaining timesteps:

    x, ts = truncated_start(denoiser, x_ref, timesteps, t_start=300, generator=g)
    x0 = get_solver("ddim")(denoiser, x, ts)

The solver then spends only len(ts) steps.
"""
from __future__ import annotations

import torch

from ..denoiser import Denoiser
from ..errors import UserError
from ..schedule import q_sample
from ._common import randn_like


def truncated_start(denoiser: Denoiser, x_ref: torch.Tensor, timesteps, t_start: float, *,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, the timesteps ≤ t_start) with x_t = α_t·x_ref + σ_t·ε at the first kept timestep t."""
    ts = torch.as_tensor(timesteps).flatten()
    kept = ts[ts <= t_start]
    if len(kept) == 0:
        raise UserError(f"no timestep <= t_start = {t_start} (timesteps run {ts.max().item()}..{ts.min().item()})")
    x = q_sample(denoiser.schedule, x_ref, float(kept[0]), randn_like(x_ref, generator))
    return x, kept
