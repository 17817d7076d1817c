"""DDPM ancestral sampling (Ho et al. 2020, Alg. 2), on any descending subsequence of timesteps."""
from __future__ import annotations

import torch

from ..denoiser import Denoiser
from ._common import ab, maybe_clip, randn_like, step_pairs


def ddpm_step(x: torch.Tensor, x0: torch.Tensor, abar_t: float, abar_s: float, s: float, generator) -> torch.Tensor:
    """One draw from the posterior q(x_s | x_t, x̂₀) (DDPM eq. 6–7) with σ² = β̃ ("fixed small").

    For a subsequence t > s the effective step is β_t = 1 − ᾱ_t/ᾱ_s; no noise on the last step (s = −1).
    """
    beta_t = 1 - abar_t / abar_s
    one_minus_t, one_minus_s = 1 - abar_t, 1 - abar_s
    # Posterior mean μ̃(x_t, x̂₀) (DDPM eq. 7).
    mean = (abar_s ** 0.5 * beta_t / one_minus_t) * x0 + ((1 - beta_t) ** 0.5 * one_minus_s / one_minus_t) * x
    if s < 0:
        return mean
    # Posterior variance β̃ = (1 − ᾱ_s)/(1 − ᾱ_t)·β_t.
    var = max(one_minus_s / one_minus_t * beta_t, 1e-20)
    return mean + var ** 0.5 * randn_like(x, generator)


@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, x: torch.Tensor, timesteps, *, generator=None, callback=None,
                clip_x0: bool = False) -> torch.Tensor:
    """Ancestral sampling; DDPM on fewer steps equals DDIM with η = 1."""
    for i, (t, s) in enumerate(step_pairs(timesteps)):
        abar_t, _ = ab(denoiser, t)
        abar_s, _ = ab(denoiser, s)
        _, x0 = denoiser.predict(x, t)
        x0 = maybe_clip(x0, clip_x0)
        x = ddpm_step(x, x0, abar_t, abar_s, s, generator)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x
