"""DDPM ancestral sampling (Ho et al. 2020, Alg. 2), on any descending subsequence of timesteps."""
from __future__ import annotations

import torch

from ..denoiser import Denoiser
from ._common import ab, maybe_clip, randn_like, step_pairs


@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, x: torch.Tensor, timesteps, *, generator=None, callback=None,
                clip_x0: bool = False) -> torch.Tensor:
    """Ancestral sampling with the posterior q(x_s | x_t, x̂₀) (DDPM eq. 6–7) and σ² = β̃ ("fixed small").

    For a subsequence t > s the effective step is β_t = 1 − ᾱ_t/ᾱ_s, so that DDPM on fewer steps
    equals DDIM with η = 1.
    """
    for i, (t, s) in enumerate(step_pairs(timesteps)):
        abar_t, one_minus_t = ab(denoiser, t)
        abar_s, one_minus_s = ab(denoiser, s)
        beta_t = 1 - abar_t / abar_s
        _, x0 = denoiser.predict(x, t)
        x0 = maybe_clip(x0, clip_x0)
        # Posterior mean μ̃(x_t, x̂₀) (DDPM eq. 7).
        mean = (abar_s ** 0.5 * beta_t / one_minus_t) * x0 + ((1 - beta_t) ** 0.5 * one_minus_s / one_minus_t) * x
        if s >= 0:
            # Posterior variance β̃ = (1 − ᾱ_s)/(1 − ᾱ_t)·β_t; noise only before the last step.
            var = max(one_minus_s / one_minus_t * beta_t, 1e-20)
            x = mean + var ** 0.5 * randn_like(x, generator)
        else:
            x = mean
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x
